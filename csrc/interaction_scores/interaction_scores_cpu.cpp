// Per-sample interaction scores: argument checks, CPU kernels and the operator schema.
//
// Each sample reads its three logit rows once: a row is walked in L1-sized chunks, each chunk
// giving its maximum and then its sum of exp(x - running max) (an online log-sum-exp over
// chunks), in loops the compiler vectorises (float uses a polynomial exp that vectorises; AVX2
// and a portable clone are compiled where GCC supports it). Rows are split across threads with
// at::parallel_for.
#include "interaction_scores/interaction_scores.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace dmil_fast {
namespace interaction {

namespace {

constexpr const char* kForwardName = "interaction_scores";
constexpr const char* kBackwardName = "interaction_scores_backward";

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

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// exp for float in a form GCC vectorises: Cody-Waite reduction, a degree-6 polynomial on
// [-ln2/2, ln2/2] (Cephes coefficients) and the 2^n scale built from bits. Arguments below the
// normal range give 0, above 88 are clamped (callers pass x - max <= ~0); NaN propagates.
C10_ALWAYS_INLINE float exp_f32(float x) {
  constexpr float kLo = -87.33654f;
  constexpr float kHi = 88.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const bool underflow = x < kLo;
  float xc = x > kHi ? kHi : x;
  xc = xc < kLo ? kLo : xc;
  float fn = xc * kLog2e + kRound;
  uint32_t bits;
  std::memcpy(&bits, &fn, sizeof(bits));
  fn -= kRound;
  const float r = (xc - fn * kLn2Hi) - fn * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // The low bits of fn's representation hold n + 2^22; the exponent field of 2^n is n + 127.
  const uint32_t scale_bits = (bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  const float y = p * scale;
  return underflow ? 0.0f : y;
}

C10_ALWAYS_INLINE float exp_acc(float x) { return exp_f32(x); }
C10_ALWAYS_INLINE double exp_acc(double x) { return std::exp(x); }

// The three loops over a row segment, written once for float and double. Each is its own
// function so that every one is vectorised on its own (reductions may be reordered: omp simd).
template <typename T>
C10_ALWAYS_INLINE T max_impl(const T* p, int64_t n, T init) {
  T m = init;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    m = p[j] > m ? p[j] : m;  // a NaN is skipped here and caught by the sum
  }
  return m;
}

template <typename T>
C10_ALWAYS_INLINE T sum_exp_impl(const T* p, int64_t n, T shift) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    s += exp_acc(p[j] - shift);
  }
  return s;
}

// out[j] = -g * exp(x[j] - lse): the softmax part of d(log softmax(x)[y]) / dx, times g.
template <typename T>
C10_ALWAYS_INLINE void neg_softmax_impl(const T* x, int64_t n, T lse, T g, T* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    out[j] = -(g * exp_acc(x[j] - lse));
  }
}

// GCC on x86-64 Linux: an AVX2 clone beside the portable one, picked by CPU features at load
// time. No trapping math in these loops, so that the clamps and selects of exp_f32 become vector
// blends instead of branches (NaN and infinity results are unchanged).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DMIL_FAST_CLONES \
  __attribute__((target_clones("avx2", "default"), optimize("no-trapping-math")))
#elif defined(__GNUC__) && !defined(__clang__)
#define DMIL_FAST_CLONES __attribute__((optimize("no-trapping-math")))
#else
#define DMIL_FAST_CLONES
#endif

DMIL_FAST_CLONES float segment_max(const float* p, int64_t n, float init) {
  return max_impl(p, n, init);
}
DMIL_FAST_CLONES float segment_sum_exp(const float* p, int64_t n, float shift) {
  return sum_exp_impl(p, n, shift);
}
DMIL_FAST_CLONES void row_neg_softmax(const float* x, int64_t n, float lse, float g, float* out) {
  neg_softmax_impl(x, n, lse, g, out);
}
double segment_max(const double* p, int64_t n, double init) { return max_impl(p, n, init); }
double segment_sum_exp(const double* p, int64_t n, double shift) {
  return sum_exp_impl(p, n, shift);
}
void row_neg_softmax(const double* x, int64_t n, double lse, double g, double* out) {
  neg_softmax_impl(x, n, lse, g, out);
}

constexpr int64_t kChunk = 2048;  // elements per chunk: stays in L1 between its two loops

template <typename T>
struct RowStats {
  T max;  // the row maximum (-inf for an all -inf row)
  T sum;  // sum of exp(x - max); NaN when the row holds a NaN or +inf
};

// Online log-sum-exp over chunks: each chunk is read from memory once (its second loop hits L1).
template <typename T>
RowStats<T> row_stats(const T* x, int64_t n_cols) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T run_max = neg_inf;
  T run_sum = T(0);
  for (int64_t c0 = 0; c0 < n_cols; c0 += kChunk) {
    const int64_t n = n_cols - c0 < kChunk ? n_cols - c0 : kChunk;
    const T new_max = segment_max(x + c0, n, run_max);
    // An all -inf prefix keeps a zero sum; shifting by 0 then still turns a NaN into a NaN sum.
    const T shift = new_max == neg_inf ? T(0) : new_max;
    if (new_max != run_max) {
      run_sum *= exp_acc(run_max - new_max);
    }
    run_sum += segment_sum_exp(x + c0, n, shift);
    run_max = new_max;
  }
  return {run_max, run_sum};
}

int64_t grain_rows(int64_t n_cols) {
  return std::max<int64_t>(1, 32768 / (kNumRows * n_cols));
}

void check_labels_in_range(const char* op, const at::Tensor& labels, int64_t n_cols) {
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t b = 0; b < labels.numel(); ++b) {
    TORCH_CHECK(y[b] >= 0 && y[b] < n_cols, op, ": labels[", b, "] = ", y[b],
                " is outside [0, ", n_cols, ")");
  }
}

template <typename T>
void forward_rows(T* scores, T* lse, const T* const* logits, const int64_t* labels,
                  const T* h1, const T* h2, const T* log_prior, int64_t redundancy,
                  int64_t n_rows, int64_t n_cols) {
  const T log_c = static_cast<T>(std::log(static_cast<double>(n_cols)));
  at::parallel_for(0, n_rows, grain_rows(n_cols), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t y = labels[b];
      T pmi[kNumRows];
      for (int k = 0; k < kNumRows; ++k) {
        const T* row = logits[k] + b * n_cols;
        const RowStats<T> st = row_stats(row, n_cols);
        const T log_sum = std::log(st.sum);
        const T log_p = (row[y] - st.max) - log_sum;
        pmi[k] = log_prior != nullptr ? log_p - log_prior[y] : log_p + log_c;
        lse[b * kNumRows + k] = st.max + log_sum;
      }
      const T e1 = h1 != nullptr ? h1[b] : T(0);
      const T e2 = h2 != nullptr ? h2[b] : T(0);
      decompose(pmi[0], pmi[1], pmi[2], e1, e2, redundancy, scores + b * kNumScores);
    }
  });
}

template <typename T>
void backward_rows(T* const* grad_logits, T* grad_entropy, const T* grad_scores, const T* scores,
                   const T* lse, const T* const* logits, const int64_t* labels, const T* h1,
                   const T* h2, int64_t redundancy, int64_t n_rows, int64_t n_cols) {
  at::parallel_for(0, n_rows, grain_rows(n_cols), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t y = labels[b];
      const T* s = scores + b * kNumScores;
      const T e1 = h1 != nullptr ? h1[b] : T(0);
      const T e2 = h2 != nullptr ? h2[b] : T(0);
      T g_i[kNumRows];
      T g_h[2];
      decompose_backward(grad_scores + b * kNumScores, s[0], s[1], e1, e2, redundancy, g_i, g_h);
      grad_entropy[2 * b] = g_h[0];
      grad_entropy[2 * b + 1] = g_h[1];
      for (int k = 0; k < kNumRows; ++k) {
        T* out = grad_logits[k] + b * n_cols;
        row_neg_softmax(logits[k] + b * n_cols, n_cols, lse[b * kNumRows + k], g_i[k], out);
        out[y] = g_i[k] + out[y];
      }
    }
  });
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return has(t) ? t->data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> interaction_scores_cpu(
    const at::Tensor& logits_1, const at::Tensor& logits_2, const at::Tensor& logits_12,
    const at::Tensor& labels, const std::optional<at::Tensor>& entropy_1,
    const std::optional<at::Tensor>& entropy_2, const std::optional<at::Tensor>& log_prior,
    int64_t redundancy) {
  const Sizes sz = check_forward_args(logits_1, logits_2, logits_12, labels, entropy_1, entropy_2,
                                      log_prior, redundancy, c10::DeviceType::CPU);
  const at::Tensor l[kNumRows] = {logits_1.contiguous(), logits_2.contiguous(),
                                  logits_12.contiguous()};
  const at::Tensor y = labels.contiguous();
  check_labels_in_range(kForwardName, y, sz.num_classes);
  const bool lsmi = redundancy == kLsmi;
  const std::optional<at::Tensor> h1 = lsmi ? std::optional<at::Tensor>(entropy_1->contiguous())
                                            : std::nullopt;
  const std::optional<at::Tensor> h2 = lsmi ? std::optional<at::Tensor>(entropy_2->contiguous())
                                            : std::nullopt;
  const std::optional<at::Tensor> lp =
      has(log_prior) ? std::optional<at::Tensor>(log_prior->contiguous()) : std::nullopt;
  at::Tensor scores = at::empty({sz.batch, kNumScores}, logits_1.options());
  at::Tensor lse = at::empty({sz.batch, kNumRows}, logits_1.options());
  if (sz.batch == 0) {
    return {scores, lse};
  }
  AT_DISPATCH_FLOATING_TYPES(logits_1.scalar_type(), kForwardName, [&] {
    const scalar_t* rows[kNumRows] = {l[0].data_ptr<scalar_t>(), l[1].data_ptr<scalar_t>(),
                                      l[2].data_ptr<scalar_t>()};
    forward_rows<scalar_t>(scores.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), rows,
                           y.data_ptr<int64_t>(), opt_ptr<scalar_t>(h1), opt_ptr<scalar_t>(h2),
                           opt_ptr<scalar_t>(lp), redundancy, sz.batch, sz.num_classes);
  });
  return {scores, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> interaction_scores_backward_cpu(
    const at::Tensor& grad_scores, const at::Tensor& scores, const at::Tensor& lse,
    const at::Tensor& logits_1, const at::Tensor& logits_2, const at::Tensor& logits_12,
    const at::Tensor& labels, const std::optional<at::Tensor>& entropy_1,
    const std::optional<at::Tensor>& entropy_2, int64_t redundancy) {
  const Sizes sz = check_backward_args(grad_scores, scores, lse, logits_1, logits_2, logits_12,
                                       labels, entropy_1, entropy_2, redundancy,
                                       c10::DeviceType::CPU);
  const at::Tensor l[kNumRows] = {logits_1.contiguous(), logits_2.contiguous(),
                                  logits_12.contiguous()};
  const at::Tensor y = labels.contiguous();
  check_labels_in_range(kBackwardName, y, sz.num_classes);
  const at::Tensor g = grad_scores.contiguous();
  const at::Tensor s = scores.contiguous();
  const at::Tensor m = lse.contiguous();
  const bool lsmi = redundancy == kLsmi;
  const std::optional<at::Tensor> h1 = lsmi ? std::optional<at::Tensor>(entropy_1->contiguous())
                                            : std::nullopt;
  const std::optional<at::Tensor> h2 = lsmi ? std::optional<at::Tensor>(entropy_2->contiguous())
                                            : std::nullopt;
  at::Tensor out[kNumRows] = {at::empty_like(l[0]), at::empty_like(l[1]), at::empty_like(l[2])};
  at::Tensor grad_entropy = at::empty({sz.batch, 2}, logits_1.options());
  if (sz.batch > 0) {
    AT_DISPATCH_FLOATING_TYPES(logits_1.scalar_type(), kBackwardName, [&] {
      const scalar_t* rows[kNumRows] = {l[0].data_ptr<scalar_t>(), l[1].data_ptr<scalar_t>(),
                                        l[2].data_ptr<scalar_t>()};
      scalar_t* grads[kNumRows] = {out[0].data_ptr<scalar_t>(), out[1].data_ptr<scalar_t>(),
                                   out[2].data_ptr<scalar_t>()};
      backward_rows<scalar_t>(grads, grad_entropy.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                              s.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), rows,
                              y.data_ptr<int64_t>(), opt_ptr<scalar_t>(h1),
                              opt_ptr<scalar_t>(h2), redundancy, sz.batch, sz.num_classes);
    });
  }
  return {out[0], out[1], out[2], grad_entropy};
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
  const auto acc = at::toOpMathType(logits_1.scalar_type());
  const at::Tensor* ts[3] = {&grad_scores, &scores, &lse};
  const char* names[3] = {"grad_scores", "scores", "lse"};
  const int64_t cols[3] = {kNumScores, kNumScores, kNumRows};
  const at::ScalarType dtypes[3] = {logits_1.scalar_type(), logits_1.scalar_type(), acc};
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

// A fragment, so that every op folder can add its own definitions to the dmil_fast namespace.
TORCH_LIBRARY_FRAGMENT(dmil_fast, m) {
  m.def(
      "interaction_scores(Tensor logits_1, Tensor logits_2, Tensor logits_12, Tensor labels, "
      "Tensor? entropy_1, Tensor? entropy_2, Tensor? log_prior, int redundancy) "
      "-> (Tensor scores, Tensor lse)");
  m.def(
      "interaction_scores_backward(Tensor grad_scores, Tensor scores, Tensor lse, "
      "Tensor logits_1, Tensor logits_2, Tensor logits_12, Tensor labels, Tensor? entropy_1, "
      "Tensor? entropy_2, int redundancy) "
      "-> (Tensor grad_logits_1, Tensor grad_logits_2, Tensor grad_logits_12, "
      "Tensor grad_entropy)");
}

TORCH_LIBRARY_IMPL(dmil_fast, CPU, m) {
  m.impl("interaction_scores", &dmil_fast::interaction::interaction_scores_cpu);
  m.impl("interaction_scores_backward",
         &dmil_fast::interaction::interaction_scores_backward_cpu);
}
