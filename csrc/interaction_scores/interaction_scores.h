// Per-sample interaction scores (LSMI / MMI): declarations shared by the CPU and CUDA kernels.
//
// Op contract (namespace dmil_fast):
//   interaction_scores(logits_1, logits_2, logits_12, labels, entropy_1?, entropy_2?, log_prior?,
//                      redundancy, save_lse=True)
//       -> (scores (B, 7) in the logits dtype, lse (B, 3) in double: the float maximum plus the
//           log-sum, exactly; (0, 3) and not written when save_lse is false: no backward follows)
//   interaction_scores_backward(grad_scores, scores, lse, logits_1, logits_2, logits_12, labels,
//                               entropy_1?, entropy_2?, redundancy)
//       -> (grad_logits_1, grad_logits_2, grad_logits_12, grad_entropy (B, 2))
// Score columns: pmi_1, pmi_2, pmi_12, redundancy, unique_1, unique_2, synergy.
// The accumulation dtype is float for half/bfloat16/float logits and double for double logits;
// entropies and the log prior are passed in that dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace dmil_fast {
namespace interaction {

enum Redundancy : int64_t { kLsmi = 0, kMmi = 1 };

// The instruction sets of the float CPU kernels this CPU runs, best first ("avx512", "avx2",
// "portable"); the first is used unless DMIL_FAST_CPU_ISA names another. Defined in
// interaction_scores_cpu.cpp.
std::vector<std::string> cpu_kernel_isas();
// The one a call uses now (an error when DMIL_FAST_CPU_ISA names one this CPU lacks).
std::string cpu_kernel_isa();

constexpr int kNumScores = 7;
constexpr int kNumRows = 3;
constexpr const char* kForwardName = "interaction_scores";
constexpr const char* kBackwardName = "interaction_scores_backward";

// Sizes shared by all inputs, returned by the argument checks.
struct Sizes {
  int64_t batch;
  int64_t num_classes;
};

// TORCH_CHECKs on the forward arguments (ranks, sizes, dtypes, devices); `device_type` is the
// device the calling kernel runs on. Defined in interaction_scores_checks.cpp.
Sizes check_forward_args(const at::Tensor& logits_1, const at::Tensor& logits_2,
                         const at::Tensor& logits_12, const at::Tensor& labels,
                         const std::optional<at::Tensor>& entropy_1,
                         const std::optional<at::Tensor>& entropy_2,
                         const std::optional<at::Tensor>& log_prior, int64_t redundancy,
                         c10::DeviceType device_type);

// The same for the backward arguments (grad_scores, scores and lse shapes and dtypes too).
Sizes check_backward_args(const at::Tensor& grad_scores, const at::Tensor& scores,
                          const at::Tensor& lse, const at::Tensor& logits_1,
                          const at::Tensor& logits_2, const at::Tensor& logits_12,
                          const at::Tensor& labels, const std::optional<at::Tensor>& entropy_1,
                          const std::optional<at::Tensor>& entropy_2, int64_t redundancy,
                          c10::DeviceType device_type);

// Optional tensor arguments, as the kernels take them.
inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The tensor's data, or null when absent.
template <typename T>
inline const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return has(t) ? t->data_ptr<T>() : nullptr;
}

// A contiguous copy (or the tensor itself) when present and `use`d, else absent.
inline std::optional<at::Tensor> opt_contiguous(const std::optional<at::Tensor>& t, bool use) {
  if (!use || !has(t)) {
    return std::nullopt;
  }
  return t->contiguous();
}

// The forward's inputs as every kernel reads them (after check_forward_args): contiguous (each
// a copy only where it was not), the entropies only for LSMI, the log prior when given.
struct ForwardInputs {
  at::Tensor logits[kNumRows];
  at::Tensor labels;
  std::optional<at::Tensor> entropy_1;
  std::optional<at::Tensor> entropy_2;
  std::optional<at::Tensor> log_prior;
};

inline ForwardInputs contiguous_forward_inputs(const at::Tensor& logits_1, const at::Tensor& logits_2,
                                               const at::Tensor& logits_12, const at::Tensor& labels,
                                               const std::optional<at::Tensor>& entropy_1,
                                               const std::optional<at::Tensor>& entropy_2,
                                               const std::optional<at::Tensor>& log_prior,
                                               int64_t redundancy) {
  const bool lsmi = redundancy == kLsmi;
  return {{logits_1.contiguous(), logits_2.contiguous(), logits_12.contiguous()},
          labels.contiguous(),
          opt_contiguous(entropy_1, lsmi),
          opt_contiguous(entropy_2, lsmi),
          opt_contiguous(log_prior, true)};
}

// The forward's outputs, uninitialised: scores (B, 7) in the logits dtype and the log-sum-exps
// (B, 3) in double, or (0, 3) when no backward follows (save_lse false).
inline std::tuple<at::Tensor, at::Tensor> empty_forward_outputs(const Sizes& sz,
                                                                const at::Tensor& logits,
                                                                bool save_lse) {
  return {at::empty({sz.batch, kNumScores}, logits.options()),
          at::empty({save_lse ? sz.batch : 0, kNumRows}, logits.options().dtype(at::kDouble))};
}

// The backward's inputs as every kernel reads them (after check_backward_args), as ForwardInputs.
struct BackwardInputs {
  at::Tensor grad_scores;
  at::Tensor scores;
  at::Tensor lse;
  at::Tensor logits[kNumRows];
  at::Tensor labels;
  std::optional<at::Tensor> entropy_1;
  std::optional<at::Tensor> entropy_2;
};

inline BackwardInputs contiguous_backward_inputs(
    const at::Tensor& grad_scores, const at::Tensor& scores, const at::Tensor& lse,
    const at::Tensor& logits_1, const at::Tensor& logits_2, const at::Tensor& logits_12,
    const at::Tensor& labels, const std::optional<at::Tensor>& entropy_1,
    const std::optional<at::Tensor>& entropy_2, int64_t redundancy) {
  const bool lsmi = redundancy == kLsmi;
  return {grad_scores.contiguous(),
          scores.contiguous(),
          lse.contiguous(),
          {logits_1.contiguous(), logits_2.contiguous(), logits_12.contiguous()},
          labels.contiguous(),
          opt_contiguous(entropy_1, lsmi),
          opt_contiguous(entropy_2, lsmi)};
}

// The backward's outputs, uninitialised: the three logits' gradients (contiguous, in the logits
// dtype) and the entropies' gradients (B, 2) in the accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_backward_outputs(
    const Sizes& sz, const BackwardInputs& in) {
  const at::Tensor& l = in.logits[0];
  return {at::empty_like(l), at::empty_like(in.logits[1]), at::empty_like(in.logits[2]),
          at::empty({sz.batch, 2}, l.options().dtype(at::toOpMathType(l.scalar_type())))};
}

// min(a, b) that takes `a` on ties; the gradient follows the chosen argument.
template <typename T>
C10_HOST_DEVICE inline T first_min(T a, T b) {
  return a <= b ? a : b;
}

// From the three pointwise mutual informations (and, for LSMI, the two pointwise entropies)
// to the seven score columns. Same operation order as the PyTorch reference.
template <typename T>
C10_HOST_DEVICE inline void decompose(T i1, T i2, T i12, T h1, T h2, int64_t redundancy,
                                      T* out) {
  T r;
  if (redundancy == kLsmi) {
    r = first_min(h1, h2) - first_min(h1 - i1, h2 - i2);
  } else {
    r = first_min(i1, i2);
  }
  const T u1 = i1 - r;
  const T u2 = i2 - r;
  out[0] = i1;
  out[1] = i2;
  out[2] = i12;
  out[3] = r;
  out[4] = u1;
  out[5] = u2;
  out[6] = i12 - r - u1 - u2;
}

// Gradient of `decompose`. With u1 = i1 - r, u2 = i2 - r and s = i12 - i1 - i2 + r, the
// redundancy r collects G = g_r - g_u1 - g_u2 + g_s, which then flows to whichever arguments
// the two first_min calls picked (selects, not products, so an unpicked branch gets exactly 0).
// Writes g_i[0..2] (i1, i2, i12) and g_h[0..1] (h1, h2).
template <typename T>
C10_HOST_DEVICE inline void decompose_backward(const T* g, T i1, T i2, T h1, T h2,
                                               int64_t redundancy, T* g_i, T* g_h) {
  const T zero = T(0);
  const T big_g = g[3] - g[4] - g[5] + g[6];
  T to_i1;
  T to_i2;
  g_h[0] = zero;
  g_h[1] = zero;
  if (redundancy == kLsmi) {
    // r = min(h1, h2) - min(h1 - i1, h2 - i2)
    const bool first_h = h1 <= h2;
    const bool first_d = (h1 - i1) <= (h2 - i2);
    to_i1 = first_d ? big_g : zero;
    to_i2 = first_d ? zero : big_g;
    if (first_h != first_d) {
      g_h[0] = first_h ? big_g : -big_g;
      g_h[1] = first_h ? -big_g : big_g;
    }
  } else {
    const bool first_i = i1 <= i2;
    to_i1 = first_i ? big_g : zero;
    to_i2 = first_i ? zero : big_g;
  }
  g_i[0] = g[0] + g[4] - g[6] + to_i1;
  g_i[1] = g[1] + g[5] - g[6] + to_i2;
  g_i[2] = g[2] + g[6];
}

}  // namespace interaction
}  // namespace dmil_fast
