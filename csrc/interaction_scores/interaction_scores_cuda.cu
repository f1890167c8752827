// Per-sample interaction scores: the CUDA ops (kernels in interaction_scores_cuda_kernels.cuh).
#include "interaction_scores/interaction_scores.h"
#include "interaction_scores/interaction_scores_cuda_kernels.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // the stream alone: no cuBLAS/cuSPARSE headers needed
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace dmil_fast {
namespace interaction {
namespace {

// Queues a kernel on the current stream and checks the launch.
struct StreamLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), unsigned int blocks, Args... args) const {
    kernel<<<blocks, cuda_kernels::kThreads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> interaction_scores_cuda(
    const at::Tensor& logits_1, const at::Tensor& logits_2, const at::Tensor& logits_12,
    const at::Tensor& labels, const std::optional<at::Tensor>& entropy_1,
    const std::optional<at::Tensor>& entropy_2, const std::optional<at::Tensor>& log_prior,
    int64_t redundancy, bool save_lse) {
  const Sizes sz = check_forward_args(logits_1, logits_2, logits_12, labels, entropy_1, entropy_2,
                                      log_prior, redundancy, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits_1.device());
  return cuda_kernels::scores_forward(sz, logits_1, logits_2, logits_12, labels, entropy_1,
                                      entropy_2, log_prior, redundancy, save_lse,
                                      StreamLaunch{c10::cuda::getCurrentCUDAStream()});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> interaction_scores_backward_cuda(
    const at::Tensor& grad_scores, const at::Tensor& scores, const at::Tensor& lse,
    const at::Tensor& logits_1, const at::Tensor& logits_2, const at::Tensor& logits_12,
    const at::Tensor& labels, const std::optional<at::Tensor>& entropy_1,
    const std::optional<at::Tensor>& entropy_2, int64_t redundancy) {
  const Sizes sz = check_backward_args(grad_scores, scores, lse, logits_1, logits_2, logits_12,
                                       labels, entropy_1, entropy_2, redundancy,
                                       c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits_1.device());
  return cuda_kernels::scores_backward(sz, grad_scores, scores, lse, logits_1, logits_2,
                                       logits_12, labels, entropy_1, entropy_2, redundancy,
                                       StreamLaunch{c10::cuda::getCurrentCUDAStream()});
}

}  // namespace
}  // namespace interaction
}  // namespace dmil_fast

TORCH_LIBRARY_IMPL(dmil_fast, CUDA, m) {
  m.impl("interaction_scores", &dmil_fast::interaction::interaction_scores_cuda);
  m.impl("interaction_scores_backward",
         &dmil_fast::interaction::interaction_scores_backward_cuda);
}
