// The CUDA interaction-scoring kernels compiled as host code and run under warp_emulation.h, on
// CPU tensors of any floating dtype: the kernels and their host side exactly as the CUDA build
// has them (interaction_scores_cuda_kernels.cuh), the launch replaced by the emulation. The
// argument checks are not part of this module (they are the ones the C++ CPU op runs, tested
// there). Built by tests/ops/test_cuda_kernels_emulated.py.
#include <torch/extension.h>

#include "interaction_scores/interaction_scores.h"

#include <optional>
#include <tuple>

#include "warp_emulation.h"
// The kernels last: the emulation's macros stand in for CUDA's built-ins.
#include "interaction_scores/interaction_scores_cuda_kernels.cuh"

namespace {

namespace ik = dmil_fast::interaction::cuda_kernels;
using dmil_fast::interaction::Sizes;

struct EmulatedLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), unsigned int blocks, Args... args) const {
    dmil_emu::run_grid(blocks, ik::kThreads, [&] { kernel(args...); });
  }
};

Sizes sizes_of(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(),
              "the emulated kernels take 2-D CPU logits, got ", logits.sizes(), " on ",
              logits.device());
  return Sizes{logits.size(0), logits.size(1)};
}

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& logits_1, const at::Tensor& logits_2, const at::Tensor& logits_12,
    const at::Tensor& labels, const std::optional<at::Tensor>& entropy_1,
    const std::optional<at::Tensor>& entropy_2, const std::optional<at::Tensor>& log_prior,
    int64_t redundancy, bool save_lse) {
  return ik::scores_forward(sizes_of(logits_1), logits_1, logits_2, logits_12, labels, entropy_1,
                            entropy_2, log_prior, redundancy, save_lse, EmulatedLaunch{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_scores, const at::Tensor& scores, const at::Tensor& lse,
    const at::Tensor& logits_1, const at::Tensor& logits_2, const at::Tensor& logits_12,
    const at::Tensor& labels, const std::optional<at::Tensor>& entropy_1,
    const std::optional<at::Tensor>& entropy_2, int64_t redundancy) {
  return ik::scores_backward(sizes_of(logits_1), grad_scores, scores, lse, logits_1, logits_2,
                             logits_12, labels, entropy_1, entropy_2, redundancy,
                             EmulatedLaunch{});
}

// Checks of the emulation itself. Each lane of warp w in block b offers 100 * b + 32 * w + lane
// (as float) and keeps what lane (lane ^ offset) offered. Lanes from `exit_from` on leave before
// the shuffle, lanes from `detour_from` on take another shuffle first (offset 0): the emulation
// must report the first when a lane reads from them and the second always.
__global__ void shuffle_probe_kernel(float* out, int offset, int exit_from, int detour_from,
                                     unsigned int mask) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * 64 + threadIdx.x;
  if (lane >= exit_from) {
    out[t] = -1.0f;
    return;
  }
  float mine = static_cast<float>(100 * blockIdx.x + threadIdx.x);
  if (lane >= detour_from) {
    mine = __shfl_xor_sync(mask, mine, 0);
  }
  out[t] = __shfl_xor_sync(mask, mine, offset);
}

at::Tensor shuffle_probe(int64_t blocks, int64_t offset, int64_t exit_from, int64_t detour_from,
                         int64_t mask) {
  at::Tensor out = at::full({blocks * 64}, -2.0f, at::kFloat);
  dmil_emu::run_grid(static_cast<unsigned int>(blocks), 64, [&] {
    shuffle_probe_kernel(out.data_ptr<float>(), static_cast<int>(offset),
                         static_cast<int>(exit_from), static_cast<int>(detour_from),
                         static_cast<unsigned int>(mask));
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("interaction_scores", &forward);
  m.def("interaction_scores_backward", &backward);
  m.def("shuffle_probe", &shuffle_probe);
  m.def("lanes_per_row", &ik::lanes_per_row);
  m.attr("threads_per_block") = ik::kThreads;
}
