// Per-sample interaction scores: CUDA kernels.
//
// One warp per sample, kWarpsPerBlock samples per block. A warp walks each of the sample's three
// logit rows once with an online log-sum-exp (every lane keeps a running max and sum over its
// strided elements, then the lanes are merged with shuffles), accumulating in float for
// half/bfloat16/float and in double for double. A label outside [0, C) is never used to read
// memory: that sample's outputs are NaN.
#include "interaction_scores/interaction_scores.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>  // the stream alone: no cuBLAS/cuSPARSE headers needed
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

namespace dmil_fast {
namespace interaction {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpSize * kWarpsPerBlock;
constexpr int kUnroll = 4;  // loads in flight per lane

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return static_cast<T>(-INFINITY);
}

// Adds one element to a lane's running (max, sum of exp(x - max)). -inf elements add nothing;
// a NaN element makes the sum NaN (the max never becomes NaN).
template <typename T>
__device__ __forceinline__ void online_add(T& run_max, T& run_sum, T x) {
  if (x > run_max) {
    run_sum = run_sum * dev_exp(run_max - x) + T(1);
    run_max = x;
  } else if (x != neg_inf<T>()) {
    run_sum += dev_exp(x - run_max);
  }
}

template <typename T>
__device__ __forceinline__ void merge(T& run_max, T& run_sum, T other_max, T other_sum) {
  const T new_max = run_max > other_max ? run_max : other_max;
  if (new_max == neg_inf<T>()) {
    run_sum = run_sum + other_sum;  // both empty (0), or NaN kept
  } else {
    run_sum = run_sum * dev_exp(run_max - new_max) + other_sum * dev_exp(other_max - new_max);
  }
  run_max = new_max;
}

// (max, sum) of one row over the whole warp; every lane gets the result.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void warp_row_stats(const scalar_t* __restrict__ row, int64_t n_cols,
                                               int lane, acc_t& row_max, acc_t& row_sum) {
  acc_t run_max = neg_inf<acc_t>();
  acc_t run_sum = acc_t(0);
  for (int64_t c0 = lane; c0 < n_cols; c0 += kWarpSize * kUnroll) {
    acc_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = c0 + u * kWarpSize;
      v[u] = j < n_cols ? static_cast<acc_t>(row[j]) : neg_inf<acc_t>();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      online_add(run_max, run_sum, v[u]);
    }
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const acc_t other_max = __shfl_xor_sync(0xffffffffu, run_max, offset);
    const acc_t other_sum = __shfl_xor_sync(0xffffffffu, run_sum, offset);
    merge(run_max, run_sum, other_max, other_sum);
  }
  row_max = run_max;
  row_sum = run_sum;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) interaction_scores_forward_kernel(
    scalar_t* __restrict__ scores, double* __restrict__ lse, const scalar_t* __restrict__ logits_1,
    const scalar_t* __restrict__ logits_2, const scalar_t* __restrict__ logits_12,
    const int64_t* __restrict__ labels, const acc_t* __restrict__ entropy_1,
    const acc_t* __restrict__ entropy_2, const acc_t* __restrict__ log_prior, acc_t log_c,
    int64_t redundancy, int64_t n_rows, int64_t n_cols) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (b >= n_rows) {
    return;  // the whole warp leaves together
  }
  const int64_t y = labels[b];
  if (y < 0 || y >= n_cols) {
    if (lane < kNumScores) {
      scores[b * kNumScores + lane] = static_cast<scalar_t>(NAN);
    }
    if (lse != nullptr && lane < kNumRows) {
      lse[b * kNumRows + lane] = static_cast<double>(NAN);
    }
    return;
  }
  const scalar_t* rows[kNumRows] = {logits_1 + b * n_cols, logits_2 + b * n_cols,
                                    logits_12 + b * n_cols};
  acc_t pmi[kNumRows];
  double row_lse[kNumRows];  // exact in double (see cpu_tiles.inc)
#pragma unroll
  for (int k = 0; k < kNumRows; ++k) {
    acc_t row_max;
    acc_t row_sum;
    warp_row_stats<scalar_t, acc_t>(rows[k], n_cols, lane, row_max, row_sum);
    const acc_t log_sum = dev_log(row_sum);
    const acc_t log_p = (static_cast<acc_t>(rows[k][y]) - row_max) - log_sum;
    pmi[k] = log_prior != nullptr ? log_p - log_prior[y] : log_p + log_c;
    row_lse[k] = static_cast<double>(row_max) + static_cast<double>(log_sum);
  }
  if (lane == 0) {
    const acc_t h1 = entropy_1 != nullptr ? entropy_1[b] : acc_t(0);
    const acc_t h2 = entropy_2 != nullptr ? entropy_2[b] : acc_t(0);
    acc_t out[kNumScores];
    decompose(pmi[0], pmi[1], pmi[2], h1, h2, redundancy, out);
#pragma unroll
    for (int c = 0; c < kNumScores; ++c) {
      scores[b * kNumScores + c] = static_cast<scalar_t>(out[c]);
    }
    if (lse != nullptr) {
#pragma unroll
      for (int k = 0; k < kNumRows; ++k) {
        lse[b * kNumRows + k] = row_lse[k];
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) interaction_scores_backward_kernel(
    scalar_t* __restrict__ grad_1, scalar_t* __restrict__ grad_2,
    scalar_t* __restrict__ grad_12, acc_t* __restrict__ grad_entropy,
    const scalar_t* __restrict__ grad_scores, const scalar_t* __restrict__ scores,
    const double* __restrict__ lse, const scalar_t* __restrict__ logits_1,
    const scalar_t* __restrict__ logits_2, const scalar_t* __restrict__ logits_12,
    const int64_t* __restrict__ labels, const acc_t* __restrict__ entropy_1,
    const acc_t* __restrict__ entropy_2, int64_t redundancy, int64_t n_rows, int64_t n_cols) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (b >= n_rows) {
    return;
  }
  scalar_t* outs[kNumRows] = {grad_1 + b * n_cols, grad_2 + b * n_cols, grad_12 + b * n_cols};
  const int64_t y = labels[b];
  if (y < 0 || y >= n_cols) {
#pragma unroll
    for (int k = 0; k < kNumRows; ++k) {
      for (int64_t j = lane; j < n_cols; j += kWarpSize) {
        outs[k][j] = static_cast<scalar_t>(NAN);
      }
    }
    if (lane < 2) {
      grad_entropy[2 * b + lane] = static_cast<acc_t>(NAN);
    }
    return;
  }
  // The min branches are re-decided from the pmis: for float and double the saved scores, the
  // forward's own values, so the same branches are taken; for half and bfloat16, whose saved
  // scores are rounded (near a tie both round alike), log p(y) rebuilt in acc_t from the label
  // logit and the lse. Without the prior, which shifts both alike: the branches compare
  // differences of them.
  acc_t g[kNumScores];
#pragma unroll
  for (int c = 0; c < kNumScores; ++c) {
    g[c] = static_cast<acc_t>(grad_scores[b * kNumScores + c]);
  }
  acc_t i1;
  acc_t i2;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    i1 = static_cast<acc_t>(scores[b * kNumScores]);
    i2 = static_cast<acc_t>(scores[b * kNumScores + 1]);
  } else {
    const double x1 = static_cast<acc_t>(logits_1[b * n_cols + y]);
    const double x2 = static_cast<acc_t>(logits_2[b * n_cols + y]);
    i1 = static_cast<acc_t>(x1 - lse[b * kNumRows]);
    i2 = static_cast<acc_t>(x2 - lse[b * kNumRows + 1]);
  }
  const acc_t h1 = entropy_1 != nullptr ? entropy_1[b] : acc_t(0);
  const acc_t h2 = entropy_2 != nullptr ? entropy_2[b] : acc_t(0);
  acc_t g_i[kNumRows];
  acc_t g_h[2];
  decompose_backward(g, i1, i2, h1, h2, redundancy, g_i, g_h);
  if (lane < 2) {
    grad_entropy[2 * b + lane] = lane == 0 ? g_h[0] : g_h[1];
  }
  const scalar_t* rows[kNumRows] = {logits_1 + b * n_cols, logits_2 + b * n_cols,
                                    logits_12 + b * n_cols};
#pragma unroll
  for (int k = 0; k < kNumRows; ++k) {
    // exp(x - lse) as exp(-lo) exp(x - hi), hi the lse rounded to acc_t (see cpu_tiles.inc).
    const double row_lse = lse[b * kNumRows + k];
    const acc_t hi = static_cast<acc_t>(row_lse);
    const acc_t lo = isfinite(row_lse) ? static_cast<acc_t>(row_lse - static_cast<double>(hi))
                                       : acc_t(0);
    const acc_t gk = g_i[k];
    const acc_t g_lo = gk * dev_exp(-lo);
    for (int64_t j = lane; j < n_cols; j += kWarpSize) {
      const acc_t neg = -(g_lo * dev_exp(static_cast<acc_t>(rows[k][j]) - hi));
      outs[k][j] = static_cast<scalar_t>(j == y ? gk + neg : neg);
    }
  }
}

unsigned int num_blocks(int64_t n_rows) {
  return static_cast<unsigned int>((n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

std::tuple<at::Tensor, at::Tensor> interaction_scores_cuda(
    const at::Tensor& logits_1, const at::Tensor& logits_2, const at::Tensor& logits_12,
    const at::Tensor& labels, const std::optional<at::Tensor>& entropy_1,
    const std::optional<at::Tensor>& entropy_2, const std::optional<at::Tensor>& log_prior,
    int64_t redundancy, bool save_lse) {
  const Sizes sz = check_forward_args(logits_1, logits_2, logits_12, labels, entropy_1, entropy_2,
                                      log_prior, redundancy, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits_1.device());
  const at::Tensor l1 = logits_1.contiguous();
  const at::Tensor l2 = logits_2.contiguous();
  const at::Tensor l12 = logits_12.contiguous();
  const at::Tensor y = labels.contiguous();
  const bool lsmi = redundancy == kLsmi;
  const std::optional<at::Tensor> h1 = opt_contiguous(entropy_1, lsmi);
  const std::optional<at::Tensor> h2 = opt_contiguous(entropy_2, lsmi);
  const std::optional<at::Tensor> lp = opt_contiguous(log_prior, true);
  at::Tensor scores = at::empty({sz.batch, kNumScores}, logits_1.options());
  at::Tensor lse = at::empty({save_lse ? sz.batch : 0, kNumRows}, logits_1.options().dtype(at::kDouble));
  if (sz.batch == 0) {
    return {scores, lse};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, logits_1.scalar_type(),
      "interaction_scores_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t log_c = static_cast<acc_t>(std::log(static_cast<double>(sz.num_classes)));
        interaction_scores_forward_kernel<scalar_t, acc_t>
            <<<num_blocks(sz.batch), kThreads, 0, stream>>>(
                scores.data_ptr<scalar_t>(), save_lse ? lse.data_ptr<double>() : nullptr,
                l1.data_ptr<scalar_t>(),
                l2.data_ptr<scalar_t>(), l12.data_ptr<scalar_t>(), y.data_ptr<int64_t>(),
                opt_ptr<acc_t>(h1), opt_ptr<acc_t>(h2), opt_ptr<acc_t>(lp), log_c, redundancy,
                sz.batch, sz.num_classes);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {scores, lse};
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
  const at::Tensor l1 = logits_1.contiguous();
  const at::Tensor l2 = logits_2.contiguous();
  const at::Tensor l12 = logits_12.contiguous();
  const at::Tensor y = labels.contiguous();
  const at::Tensor g = grad_scores.contiguous();
  const at::Tensor s = scores.contiguous();
  const at::Tensor m = lse.contiguous();
  const bool lsmi = redundancy == kLsmi;
  const std::optional<at::Tensor> h1 = opt_contiguous(entropy_1, lsmi);
  const std::optional<at::Tensor> h2 = opt_contiguous(entropy_2, lsmi);
  const auto acc = at::toOpMathType(logits_1.scalar_type());
  at::Tensor grad_1 = at::empty_like(l1);
  at::Tensor grad_2 = at::empty_like(l2);
  at::Tensor grad_12 = at::empty_like(l12);
  at::Tensor grad_entropy = at::empty({sz.batch, 2}, logits_1.options().dtype(acc));
  if (sz.batch == 0) {
    return {grad_1, grad_2, grad_12, grad_entropy};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, logits_1.scalar_type(),
      "interaction_scores_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        interaction_scores_backward_kernel<scalar_t, acc_t>
            <<<num_blocks(sz.batch), kThreads, 0, stream>>>(
                grad_1.data_ptr<scalar_t>(), grad_2.data_ptr<scalar_t>(),
                grad_12.data_ptr<scalar_t>(), grad_entropy.data_ptr<acc_t>(),
                g.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), m.data_ptr<double>(),
                l1.data_ptr<scalar_t>(), l2.data_ptr<scalar_t>(), l12.data_ptr<scalar_t>(),
                y.data_ptr<int64_t>(), opt_ptr<acc_t>(h1), opt_ptr<acc_t>(h2), redundancy,
                sz.batch, sz.num_classes);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_1, grad_2, grad_12, grad_entropy};
}

}  // namespace
}  // namespace interaction
}  // namespace dmil_fast

TORCH_LIBRARY_IMPL(dmil_fast, CUDA, m) {
  m.impl("interaction_scores", &dmil_fast::interaction::interaction_scores_cuda);
  m.impl("interaction_scores_backward",
         &dmil_fast::interaction::interaction_scores_backward_cuda);
}
