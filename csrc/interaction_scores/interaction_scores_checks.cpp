// Per-sample interaction scores: the argument checks shared by the CPU and CUDA kernels.
#include "interaction_scores/interaction_scores.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace dmil_fast {
namespace interaction {

namespace {

void check_device(const char* op, const char* name, const at::Tensor& t, c10::DeviceType type,
                  const at::Tensor& first) {
  TORCH_CHECK(t.device().type() == type, op, ": ", name, " must be a ", c10::DeviceTypeName(type),
              " tensor for this kernel, got one on ", t.device());
  TORCH_CHECK(t.device() == first.device(), op, ": ", name, " is on ", t.device(),
              " but logits_1 is on ", first.device());
}

void check_logits(const char* op, const at::Tensor& l1, const at::Tensor& l2,
                  const at::Tensor& l12, c10::DeviceType type) {
  TORCH_CHECK(l1.dim() == 2, op, ": logits_1 must be 2-D (B, C), got shape ", l1.sizes());
  TORCH_CHECK(at::isFloatingType(l1.scalar_type()), op,
              ": logits_1 must be a floating tensor, got ", l1.scalar_type());
  TORCH_CHECK(l1.size(1) >= 1, op, ": logits_1 must have at least one class, got shape ",
              l1.sizes());
  if (type == c10::DeviceType::CPU) {
    TORCH_CHECK(l1.scalar_type() == at::kFloat || l1.scalar_type() == at::kDouble, op,
                ": the CPU kernel supports float32 and float64 logits, got ", l1.scalar_type());
  }
  check_device(op, "logits_1", l1, type, l1);
  const at::Tensor* others[2] = {&l2, &l12};
  const char* names[2] = {"logits_2", "logits_12"};
  for (int k = 0; k < 2; ++k) {
    const at::Tensor& t = *others[k];
    TORCH_CHECK(t.sizes() == l1.sizes(), op, ": ", names[k], " must have the shape of logits_1 ",
                l1.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == l1.scalar_type(), op, ": ", names[k], " has dtype ",
                t.scalar_type(), " but logits_1 has ", l1.scalar_type());
    check_device(op, names[k], t, type, l1);
  }
}

void check_labels(const char* op, const at::Tensor& labels, const at::Tensor& l1,
                  c10::DeviceType type) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == l1.size(0), op,
              ": labels must be 1-D of length B = ", l1.size(0), ", got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              labels.scalar_type());
  check_device(op, "labels", labels, type, l1);
}

void check_entropies(const char* op, const std::optional<at::Tensor>& e1,
                     const std::optional<at::Tensor>& e2, int64_t redundancy,
                     const at::Tensor& l1, c10::DeviceType type) {
  TORCH_CHECK(redundancy == kLsmi || redundancy == kMmi, op,
              ": redundancy must be 0 (lsmi) or 1 (mmi), got ", redundancy);
  const auto acc = at::toOpMathType(l1.scalar_type());
  const std::optional<at::Tensor>* es[2] = {&e1, &e2};
  const char* names[2] = {"entropy_1", "entropy_2"};
  for (int k = 0; k < 2; ++k) {
    const bool given = es[k]->has_value() && (*es[k])->defined();
    if (redundancy == kLsmi) {
      TORCH_CHECK(given, op, ": redundancy 0 (lsmi) needs ", names[k], " (B,)");
    }
    if (!given) {
      continue;
    }
    const at::Tensor& t = **es[k];
    TORCH_CHECK(t.dim() == 1 && t.size(0) == l1.size(0), op, ": ", names[k],
                " must be 1-D of length B = ", l1.size(0), ", got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == acc, op, ": ", names[k], " must have dtype ", acc,
                " (the accumulation dtype of ", l1.scalar_type(), " logits), got ",
                t.scalar_type());
    check_device(op, names[k], t, type, l1);
  }
}

}  // namespace

Sizes check_forward_args(const at::Tensor& logits_1, const at::Tensor& logits_2,
                         const at::Tensor& logits_12, const at::Tensor& labels,
                         const std::optional<at::Tensor>& entropy_1,
                         const std::optional<at::Tensor>& entropy_2,
                         const std::optional<at::Tensor>& log_prior, int64_t redundancy,
                         c10::DeviceType device_type) {
  const char* op = kForwardName;
  check_logits(op, logits_1, logits_2, logits_12, device_type);
  check_labels(op, labels, logits_1, device_type);
  check_entropies(op, entropy_1, entropy_2, redundancy, logits_1, device_type);
  if (has(log_prior)) {
    const at::Tensor& lp = *log_prior;
    const auto acc = at::toOpMathType(logits_1.scalar_type());
    TORCH_CHECK(lp.dim() == 1 && lp.size(0) == logits_1.size(1), op,
                ": log_prior must be 1-D of length C = ", logits_1.size(1), ", got shape ",
                lp.sizes());
    TORCH_CHECK(lp.scalar_type() == acc, op, ": log_prior must have dtype ", acc, ", got ",
                lp.scalar_type());
    check_device(op, "log_prior", lp, device_type, logits_1);
  }
  return {logits_1.size(0), logits_1.size(1)};
}

Sizes check_backward_args(const at::Tensor& grad_scores, const at::Tensor& scores,
                          const at::Tensor& lse, const at::Tensor& logits_1,
                          const at::Tensor& logits_2, const at::Tensor& logits_12,
                          const at::Tensor& labels, const std::optional<at::Tensor>& entropy_1,
                          const std::optional<at::Tensor>& entropy_2, int64_t redundancy,
                          c10::DeviceType device_type) {
  const char* op = kBackwardName;
  check_logits(op, logits_1, logits_2, logits_12, device_type);
  check_labels(op, labels, logits_1, device_type);
  check_entropies(op, entropy_1, entropy_2, redundancy, logits_1, device_type);
  const int64_t batch = logits_1.size(0);
  const at::Tensor* ts[3] = {&grad_scores, &scores, &lse};
  const char* names[3] = {"grad_scores", "scores", "lse"};
  const int64_t cols[3] = {kNumScores, kNumScores, kNumRows};
  const at::ScalarType dtypes[3] = {logits_1.scalar_type(), logits_1.scalar_type(), at::kDouble};
  for (int k = 0; k < 3; ++k) {
    const at::Tensor& t = *ts[k];
    TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == cols[k], op, ": ", names[k],
                " must have shape (", batch, ", ", cols[k], "), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtypes[k], op, ": ", names[k], " must have dtype ", dtypes[k],
                ", got ", t.scalar_type());
    check_device(op, names[k], t, device_type, logits_1);
  }
  return {batch, logits_1.size(1)};
}

}  // namespace interaction
}  // namespace dmil_fast
