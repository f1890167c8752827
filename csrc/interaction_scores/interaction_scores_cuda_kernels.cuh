// Per-sample interaction scores: the CUDA kernels and the host side of their launch.
//
// A group of lanes per sample (one lane up to 16 classes, eight up to 128, a warp beyond; see
// lanes_per_row), kWarpsPerBlock warps per block. A group walks each of the sample's three logit
// rows once with an online log-sum-exp (every lane keeps a running max and sum over its strided
// elements, then the group's lanes are merged with shuffles), accumulating in float for
// half/bfloat16/float and in double for double. A label outside [0, C) is never used to read
// memory: that sample's outputs are NaN.
//
// Included by interaction_scores_cuda.cu, where nvcc compiles the kernels and `launch` queues
// them on the current stream, and by the tests' CPU build (tests/ops/cuda_emulation), which
// compiles the same kernels as host code and runs each warp's 32 lanes in lockstep, so that the
// device code is executed and checked on machines without a GPU. Only what both can compile
// goes here: the kernels use warp shuffles and no shared memory or block barriers.
#pragma once

#include "interaction_scores/interaction_scores.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

namespace dmil_fast {
namespace interaction {
namespace cuda_kernels {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpSize * kWarpsPerBlock;
constexpr int kUnroll = 4;  // loads in flight per lane

// Lanes per sample: a whole warp for wide rows and fewer for narrow ones, so that a lane's
// elements are worth its reads and shuffles (one lane per sample up to 16 classes, eight lanes
// up to 128, the warp beyond). A group of kLanes lanes holds one sample; a warp 32 / kLanes.
// Column indices within a row are int (cheaper compares); the loads' index may run kLanes * kUnroll
// past the last column.
constexpr int64_t kMaxClasses = 2147483647 - kWarpSize * kUnroll;

inline int lanes_per_row(int64_t n_cols) { return n_cols <= 16 ? 1 : n_cols <= 128 ? 8 : 32; }

// Calls f(std::integral_constant<int, lanes_per_row(n_cols)>).
template <typename F>
void with_lanes_per_row(int64_t n_cols, const F& f) {
  switch (lanes_per_row(n_cols)) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    default:
      f(std::integral_constant<int, 32>{});
  }
}

inline unsigned int num_blocks(int64_t n_rows, int lanes) {
  const int64_t rows_per_block = kThreads / lanes;
  return static_cast<unsigned int>((n_rows + rows_per_block - 1) / rows_per_block);
}

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return static_cast<T>(-INFINITY);
}

// Where a running maximum is -inf (nothing but -inf read so far) the sums are taken against 0
// instead, so that no -inf - -inf arises, and a NaN element still makes the sum NaN; a +inf
// element makes it NaN (inf - inf), as log_softmax gives.
template <typename T>
__device__ __forceinline__ T shift_of(T max) {
  return max == neg_inf<T>() ? T(0) : max;
}

template <typename T>
__device__ __forceinline__ T larger(T a, T b) {
  return b > a ? b : a;  // NaN never wins against a (a is never NaN here)
}

// (max, sum of exp(x - max)) of the three logit rows of one sample over its group of kLanes
// lanes (`sub` this lane's place in it); every lane of the group gets the results. The three
// rows are read in one loop, kUnroll loads of each in flight per lane, and each lane's running
// sums are updated without branches once per kUnroll elements (one rescaling exp per update).
// The group is then reduced in two passes: the maximum, then the sums rescaled to it (one exp per
// lane). Every lane of the warp that has not exited calls it (the shuffles name all 32 lanes): a
// group with nothing to read passes n_cols = 0 and gets (-inf, 0).
template <int kLanes, typename scalar_t, typename acc_t>
__device__ __forceinline__ void group_row_stats(const scalar_t* const* rows, int n_cols, int sub,
                                                acc_t* row_max, acc_t* row_sum) {
  acc_t run_max[kNumRows];
  acc_t run_sum[kNumRows];
#pragma unroll
  for (int k = 0; k < kNumRows; ++k) {
    run_max[k] = neg_inf<acc_t>();
    run_sum[k] = acc_t(0);
  }
  for (int c0 = sub; c0 < n_cols; c0 += kLanes * kUnroll) {
    acc_t v[kNumRows][kUnroll];
#pragma unroll
    for (int k = 0; k < kNumRows; ++k) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = c0 + u * kLanes;
        v[k][u] = j < n_cols ? static_cast<acc_t>(rows[k][j]) : neg_inf<acc_t>();
      }
    }
#pragma unroll
    for (int k = 0; k < kNumRows; ++k) {
      acc_t new_max = run_max[k];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        new_max = larger(new_max, v[k][u]);
      }
      const acc_t shift = shift_of(new_max);
      acc_t sum = run_sum[k] * dev_exp(run_max[k] - shift);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        sum += dev_exp(v[k][u] - shift);
      }
      run_max[k] = new_max;
      run_sum[k] = sum;
    }
  }
  // Offsets below kLanes stay inside the group (groups are aligned runs of kLanes lanes).
#pragma unroll
  for (int k = 0; k < kNumRows; ++k) {
    acc_t group_max = run_max[k];
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) {
      group_max = larger(group_max, __shfl_xor_sync(0xffffffffu, group_max, offset));
    }
    acc_t sum = run_sum[k] * dev_exp(run_max[k] - shift_of(group_max));
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    row_max[k] = group_max;
    row_sum[k] = sum;
  }
}

// Sample b of a thread: its group's place in the grid (thread t of the grid serves sample
// t / kLanes, lane t % kLanes of its group).
template <int kLanes>
__device__ __forceinline__ int64_t thread_row() {
  return (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kLanes;
}

template <typename scalar_t, typename acc_t, int kLanes>
__global__ void __launch_bounds__(kThreads) interaction_scores_forward_kernel(
    scalar_t* __restrict__ scores, double* __restrict__ lse, const scalar_t* __restrict__ logits_1,
    const scalar_t* __restrict__ logits_2, const scalar_t* __restrict__ logits_12,
    const int64_t* __restrict__ labels, const acc_t* __restrict__ entropy_1,
    const acc_t* __restrict__ entropy_2, const acc_t* __restrict__ log_prior, acc_t log_c,
    int64_t redundancy, int64_t n_rows, int64_t n_cols) {
  const int lane = threadIdx.x % kWarpSize;
  const int sub = lane % kLanes;
  const int64_t b = thread_row<kLanes>();
  if (b - lane / kLanes >= n_rows) {
    return;  // the warp's first sample is past the batch: the whole warp leaves together
  }
  // Groups of this warp with a sample past the batch or a bad label read nothing, but stay in
  // the shuffles until the stores: every lane of the warp takes the same shuffles.
  const bool in_batch = b < n_rows;
  const int64_t y = in_batch ? labels[b] : 0;
  const bool valid = in_batch && y >= 0 && y < n_cols;
  const int64_t row = valid ? b : 0;
  const scalar_t* rows[kNumRows] = {logits_1 + row * n_cols, logits_2 + row * n_cols,
                                    logits_12 + row * n_cols};
  acc_t row_max[kNumRows];
  acc_t row_sum[kNumRows];
  group_row_stats<kLanes, scalar_t, acc_t>(rows, valid ? static_cast<int>(n_cols) : 0, sub,
                                           row_max, row_sum);
  acc_t pmi[kNumRows];
  double row_lse[kNumRows];  // exact in double (see cpu_tiles.inc)
#pragma unroll
  for (int k = 0; k < kNumRows; ++k) {
    const acc_t log_sum = dev_log(row_sum[k]);
    const acc_t x_y = valid ? static_cast<acc_t>(rows[k][y]) : acc_t(0);
    const acc_t log_p = (x_y - row_max[k]) - log_sum;
    pmi[k] = log_prior != nullptr ? log_p - (valid ? log_prior[y] : acc_t(0)) : log_p + log_c;
    row_lse[k] = static_cast<double>(row_max[k]) + static_cast<double>(log_sum);
  }
  if (!in_batch) {
    return;
  }
  acc_t out[kNumScores];
  if (valid) {
    const acc_t h1 = entropy_1 != nullptr ? entropy_1[b] : acc_t(0);
    const acc_t h2 = entropy_2 != nullptr ? entropy_2[b] : acc_t(0);
    decompose(pmi[0], pmi[1], pmi[2], h1, h2, redundancy, out);
  }
  // The group's lanes share the stores: lane `sub` writes the columns c with c % kLanes == sub.
#pragma unroll
  for (int c = 0; c < kNumScores; ++c) {
    if (c % kLanes == sub) {
      scores[b * kNumScores + c] = static_cast<scalar_t>(valid ? out[c] : acc_t(NAN));
    }
  }
  if (lse != nullptr) {
#pragma unroll
    for (int k = 0; k < kNumRows; ++k) {
      if (k % kLanes == sub) {
        lse[b * kNumRows + k] = valid ? row_lse[k] : static_cast<double>(NAN);
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int kLanes>
__global__ void __launch_bounds__(kThreads) interaction_scores_backward_kernel(
    scalar_t* __restrict__ grad_1, scalar_t* __restrict__ grad_2,
    scalar_t* __restrict__ grad_12, acc_t* __restrict__ grad_entropy,
    const scalar_t* __restrict__ grad_scores, const scalar_t* __restrict__ scores,
    const double* __restrict__ lse, const scalar_t* __restrict__ logits_1,
    const scalar_t* __restrict__ logits_2, const scalar_t* __restrict__ logits_12,
    const int64_t* __restrict__ labels, const acc_t* __restrict__ entropy_1,
    const acc_t* __restrict__ entropy_2, int64_t redundancy, int64_t n_rows, int64_t n_cols) {
  const int sub = static_cast<int>(threadIdx.x % kWarpSize) % kLanes;
  const int64_t b = thread_row<kLanes>();
  if (b >= n_rows) {
    return;  // no shuffles here: each group leaves on its own
  }
  scalar_t* outs[kNumRows] = {grad_1 + b * n_cols, grad_2 + b * n_cols, grad_12 + b * n_cols};
  const int64_t y = labels[b];
  if (y < 0 || y >= n_cols) {
#pragma unroll
    for (int k = 0; k < kNumRows; ++k) {
      for (int64_t j = sub; j < n_cols; j += kLanes) {
        outs[k][j] = static_cast<scalar_t>(NAN);
      }
    }
    for (int c = sub; c < 2; c += kLanes) {
      grad_entropy[2 * b + c] = static_cast<acc_t>(NAN);
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
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    if (c % kLanes == sub) {
      grad_entropy[2 * b + c] = g_h[c];
    }
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
    for (int64_t j = sub; j < n_cols; j += kLanes) {
      const acc_t neg = -(g_lo * dev_exp(static_cast<acc_t>(rows[k][j]) - hi));
      outs[k][j] = static_cast<scalar_t>(j == y ? gk + neg : neg);
    }
  }
}

// The host side of the forward after the argument checks: contiguous inputs, the outputs, the
// dtype dispatch. `launch(kernel, blocks, args...)` runs `kernel` on `blocks` blocks of kThreads
// threads (the CUDA build queues it on the current stream).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> scores_forward(
    const Sizes& sz, const at::Tensor& logits_1, const at::Tensor& logits_2,
    const at::Tensor& logits_12, const at::Tensor& labels,
    const std::optional<at::Tensor>& entropy_1, const std::optional<at::Tensor>& entropy_2,
    const std::optional<at::Tensor>& log_prior, int64_t redundancy, bool save_lse,
    const Launch& launch) {
  TORCH_CHECK(sz.num_classes <= kMaxClasses, kForwardName, ": the CUDA kernel takes at most ",
              kMaxClasses, " classes, got ", sz.num_classes);
  const ForwardInputs in = contiguous_forward_inputs(logits_1, logits_2, logits_12, labels,
                                                     entropy_1, entropy_2, log_prior, redundancy);
  at::Tensor scores, lse;  // not structured bindings: the dispatch lambda captures them (C++17)
  std::tie(scores, lse) = empty_forward_outputs(sz, in.logits[0], save_lse);
  if (sz.batch == 0) {
    return {scores, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, logits_1.scalar_type(),
      "interaction_scores_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t log_c = static_cast<acc_t>(std::log(static_cast<double>(sz.num_classes)));
        with_lanes_per_row(sz.num_classes, [&](auto lanes) {
          constexpr int kLanes = decltype(lanes)::value;
          launch(&interaction_scores_forward_kernel<scalar_t, acc_t, kLanes>,
                 num_blocks(sz.batch, kLanes), scores.data_ptr<scalar_t>(),
                 save_lse ? lse.data_ptr<double>() : nullptr, in.logits[0].data_ptr<scalar_t>(),
                 in.logits[1].data_ptr<scalar_t>(), in.logits[2].data_ptr<scalar_t>(),
                 in.labels.data_ptr<int64_t>(), opt_ptr<acc_t>(in.entropy_1),
                 opt_ptr<acc_t>(in.entropy_2), opt_ptr<acc_t>(in.log_prior), log_c, redundancy,
                 sz.batch, sz.num_classes);
        });
      });
  return {scores, lse};
}

// The host side of the backward after the argument checks, as scores_forward.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scores_backward(
    const Sizes& sz, const at::Tensor& grad_scores, const at::Tensor& scores,
    const at::Tensor& lse, const at::Tensor& logits_1, const at::Tensor& logits_2,
    const at::Tensor& logits_12, const at::Tensor& labels,
    const std::optional<at::Tensor>& entropy_1, const std::optional<at::Tensor>& entropy_2,
    int64_t redundancy, const Launch& launch) {
  const BackwardInputs in = contiguous_backward_inputs(grad_scores, scores, lse, logits_1, logits_2,
                                                       logits_12, labels, entropy_1, entropy_2,
                                                       redundancy);
  at::Tensor grad_1, grad_2, grad_12, grad_entropy;
  std::tie(grad_1, grad_2, grad_12, grad_entropy) = empty_backward_outputs(sz, in);
  if (sz.batch == 0) {
    return {grad_1, grad_2, grad_12, grad_entropy};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, logits_1.scalar_type(),
      "interaction_scores_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_lanes_per_row(sz.num_classes, [&](auto lanes) {
          constexpr int kLanes = decltype(lanes)::value;
          launch(&interaction_scores_backward_kernel<scalar_t, acc_t, kLanes>,
                 num_blocks(sz.batch, kLanes), grad_1.data_ptr<scalar_t>(),
                 grad_2.data_ptr<scalar_t>(), grad_12.data_ptr<scalar_t>(),
                 grad_entropy.data_ptr<acc_t>(), in.grad_scores.data_ptr<scalar_t>(),
                 in.scores.data_ptr<scalar_t>(), in.lse.data_ptr<double>(),
                 in.logits[0].data_ptr<scalar_t>(), in.logits[1].data_ptr<scalar_t>(),
                 in.logits[2].data_ptr<scalar_t>(), in.labels.data_ptr<int64_t>(),
                 opt_ptr<acc_t>(in.entropy_1), opt_ptr<acc_t>(in.entropy_2), redundancy, sz.batch,
                 sz.num_classes);
        });
      });
  return {grad_1, grad_2, grad_12, grad_entropy};
}

}  // namespace cuda_kernels
}  // namespace interaction
}  // namespace dmil_fast
