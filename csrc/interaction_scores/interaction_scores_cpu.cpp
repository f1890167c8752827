// Per-sample interaction scores: CPU kernels and the operator schema.
//
// Samples are processed in tiles of kTile. For each of its three logit rows a tile first gets
// every row's maximum and sum of exp(x - max):
// - few classes (C <= kSmallCols): the tile is transposed into a (C, kTile) buffer, so that the
//   lanes of a vector hold different samples and every loop runs over whole vectors;
// - more classes: row by row along the columns, a log-sum-exp over chunks of up to kChunk
//   columns in one pass each: exp(x - shift) summed under a shift taken from the row's first
//   vector while the chunk's maximum is taken alongside, and the chunk summed again under that
//   maximum only when it lies far above the shift; the loop prefetches the next row, and the
//   ragged end of a row is read as one vector overlapping the last one.
// The logs of the tile's 3 kTile sums are taken in one vector loop, then each sample is finished
// (label logit, prior, decomposition). The backward writes -g exp(x - lse) over the rows, for few
// classes over a whole tile as one flat array, then adds g at the label.
// The kernels (cpu_tiles.inc over cpu_vec_math.inc: float vectors, std::exp and std::log for
// double) are compiled portable (8 lanes) and, on x86-64, for AVX2 + FMA (8 lanes) and AVX-512
// (16 lanes); the best clone the CPU runs is picked once per call (DMIL_FAST_CPU_ISA can name
// another), and a thread runs a whole block of rows in it. Blocks of rows are split across
// threads with at::parallel_for.
#include "interaction_scores/interaction_scores.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__GNUC__)
#define DMIL_FAST_VECTOR_EXT 1  // GCC/Clang vector extension
#endif
#if defined(DMIL_FAST_VECTOR_EXT) && defined(__x86_64__)
#include <immintrin.h>  // the AVX-512 clone's intrinsics (each carries its own target)
#endif
#if defined(__GNUC__) && !defined(__clang__)
// 32- and 64-byte vectors passed by value between always-inline helpers: no call, so no ABI to
// change.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace dmil_fast {
namespace interaction {

namespace {

constexpr int64_t kTile = 64;  // samples per tile
// Up to this many classes the forward transposes a tile, and the backward takes a tile as one
// flat array (measured crossover with the row loops: ~32 to 48 classes).
constexpr int64_t kSmallCols = 32;
constexpr int64_t kFlatCols = 32;
constexpr int64_t kChunk = 2048;  // columns per log-sum-exp step: a re-summed chunk stays in L1
static_assert(kSmallCols >= 16 && kFlatCols >= 16, "the row loops need rows of >= 16 columns");
static_assert(kTile % 16 == 0, "a tile is whole vectors of samples");

template <typename T>
struct ForwardArgs {
  T* scores;    // (B, 7)
  double* lse;  // (B, 3): exact sums of the float maximum and log-sum (see cpu_tiles.inc); or
                // null: not saved (a forward without a backward)
  const T* logits[kNumRows];  // (B, C) each
  const int64_t* labels;
  const T* h1;         // (B,) or null (mmi)
  const T* h2;         // (B,) or null (mmi)
  const T* log_prior;  // (C,) or null: log(1/C)
  T log_c;
  int64_t redundancy;
  int64_t n_cols;
};

template <typename T>
struct BackwardArgs {
  T* grad_logits[kNumRows];  // (B, C) each
  T* grad_entropy;           // (B, 2)
  const T* grad_scores;      // (B, 7)
  const T* scores;           // (B, 7)
  const double* lse;         // (B, 3)
  const T* logits[kNumRows];
  const int64_t* labels;
  const T* h1;
  const T* h2;
  int64_t redundancy;
  int64_t n_cols;
};

#define DMIL_FAST_LANES 8
namespace portable {
#include "interaction_scores/cpu_vec_math.inc"
#include "interaction_scores/cpu_tiles.inc"
}  // namespace portable

// x86-64: the same kernels compiled for AVX2 + FMA, picked at run time once per op call.
#if defined(DMIL_FAST_VECTOR_EXT) && defined(__x86_64__)
#define DMIL_FAST_AVX2_CLONE 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")
#endif
namespace avx2 {
#define DMIL_FAST_AVX2_BODY 1  // lets cpu_vec_math.inc use AVX builtins
#include "interaction_scores/cpu_vec_math.inc"
#include "interaction_scores/cpu_tiles.inc"
#undef DMIL_FAST_AVX2_BODY
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// The AVX-512 clone: 16 lanes, the same exp and log lane by lane.
#undef DMIL_FAST_LANES
#define DMIL_FAST_LANES 16
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#pragma GCC optimize("fp-contract=fast")
#endif
namespace avx512 {
#define DMIL_FAST_AVX512_BODY 1  // lets cpu_vec_math.inc use AVX-512 intrinsics
#include "interaction_scores/cpu_vec_math.inc"
#include "interaction_scores/cpu_tiles.inc"
#undef DMIL_FAST_AVX512_BODY
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
#undef DMIL_FAST_LANES

// The instruction sets of the float kernels, best first.
enum class Isa { kAvx512, kAvx2, kPortable };
constexpr const char* kIsaEnv = "DMIL_FAST_CPU_ISA";

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

// The clones this CPU runs, best first (portable always).
const std::vector<Isa>& supported_isas() {
  static const std::vector<Isa> isas = [] {
    std::vector<Isa> found;
#ifdef DMIL_FAST_AVX2_CLONE
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f")) {
      found.push_back(Isa::kAvx512);
    }
    if (avx2) {
      found.push_back(Isa::kAvx2);
    }
#endif
    found.push_back(Isa::kPortable);
    return found;
  }();
  return isas;
}

template <typename T>
using ForwardBlock = void (*)(const ForwardArgs<T>&, int64_t, int64_t);
template <typename T>
using BackwardBlock = void (*)(const BackwardArgs<T>&, int64_t, int64_t);

// The clone of this call: the best one, or the one DMIL_FAST_CPU_ISA names (read at every call,
// so that a test or a benchmark can compare the clones in one process; set it before other
// threads call the op, as getenv does not guard against a concurrent change of the environment).
Isa chosen_isa() {
  const std::vector<Isa>& isas = supported_isas();
  const char* env = std::getenv(kIsaEnv);
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) {
    return isas.front();
  }
  std::string known;
  for (const Isa isa : isas) {
    if (std::strcmp(env, isa_name(isa)) == 0) {
      return isa;
    }
    known += std::string(", ") + isa_name(isa);
  }
  TORCH_CHECK(false, kIsaEnv, "=", env, " is not an instruction set of the CPU kernels that this "
              "CPU runs; expected auto", known);
}

// The float kernel of clone `isa` among the three given.
template <typename Fn>
Fn pick_clone(Isa isa, Fn with_avx512, Fn with_avx2, Fn portable_fn) {
  switch (isa) {
    case Isa::kAvx512:
      return with_avx512;
    case Isa::kAvx2:
      return with_avx2;
    default:
      return portable_fn;
  }
}

// The variable is checked for every dtype (double has the portable build only), so that a name
// this CPU lacks is an error whatever the inputs.
template <typename T>
ForwardBlock<T> pick_forward() {
  const Isa isa = chosen_isa();
#ifdef DMIL_FAST_AVX2_CLONE
  if constexpr (std::is_same_v<T, float>) {
    return pick_clone<ForwardBlock<float>>(isa, &avx512::forward_block<float>,
                                           &avx2::forward_block<float>,
                                           &portable::forward_block<float>);
  }
#endif
  (void)isa;
  return &portable::forward_block<T>;
}

template <typename T>
BackwardBlock<T> pick_backward() {
  const Isa isa = chosen_isa();
#ifdef DMIL_FAST_AVX2_CLONE
  if constexpr (std::is_same_v<T, float>) {
    return pick_clone<BackwardBlock<float>>(isa, &avx512::backward_block<float>,
                                            &avx2::backward_block<float>,
                                            &portable::backward_block<float>);
  }
#endif
  (void)isa;
  return &portable::backward_block<T>;
}

// Samples per task: about 48K elements of work, and at least one tile.
int64_t grain_samples(int64_t n_cols) {
  return std::max<int64_t>(kTile, 49152 / (kNumRows * n_cols + 64));
}

void check_labels_in_range(const char* op, const at::Tensor& labels, int64_t n_cols) {
  const int64_t* y = labels.data_ptr<int64_t>();
  const int64_t n = labels.numel();
  bool bad = false;
  for (int64_t b = 0; b < n; ++b) {
    bad |= static_cast<uint64_t>(y[b]) >= static_cast<uint64_t>(n_cols);  // negatives too
  }
  for (int64_t b = 0; bad && b < n; ++b) {
    TORCH_CHECK(y[b] >= 0 && y[b] < n_cols, op, ": labels[", b, "] = ", y[b],
                " is outside [0, ", n_cols, ")");
  }
}

std::tuple<at::Tensor, at::Tensor> interaction_scores_cpu(
    const at::Tensor& logits_1, const at::Tensor& logits_2, const at::Tensor& logits_12,
    const at::Tensor& labels, const std::optional<at::Tensor>& entropy_1,
    const std::optional<at::Tensor>& entropy_2, const std::optional<at::Tensor>& log_prior,
    int64_t redundancy, bool save_lse) {
  const Sizes sz = check_forward_args(logits_1, logits_2, logits_12, labels, entropy_1, entropy_2,
                                      log_prior, redundancy, c10::DeviceType::CPU);
  const ForwardInputs in = contiguous_forward_inputs(logits_1, logits_2, logits_12, labels,
                                                     entropy_1, entropy_2, log_prior, redundancy);
  check_labels_in_range(kForwardName, in.labels, sz.num_classes);
  at::Tensor scores, lse;  // not structured bindings: the dispatch lambda captures them (C++17)
  std::tie(scores, lse) = empty_forward_outputs(sz, in.logits[0], save_lse);
  if (sz.batch == 0) {
    return {scores, lse};
  }
  AT_DISPATCH_FLOATING_TYPES(logits_1.scalar_type(), kForwardName, [&] {
    const ForwardArgs<scalar_t> args{
        scores.data_ptr<scalar_t>(), save_lse ? lse.data_ptr<double>() : nullptr,
        {in.logits[0].data_ptr<scalar_t>(), in.logits[1].data_ptr<scalar_t>(),
         in.logits[2].data_ptr<scalar_t>()},
        in.labels.data_ptr<int64_t>(), opt_ptr<scalar_t>(in.entropy_1),
        opt_ptr<scalar_t>(in.entropy_2), opt_ptr<scalar_t>(in.log_prior),
        static_cast<scalar_t>(std::log(static_cast<double>(sz.num_classes))), redundancy,
        sz.num_classes};
    const ForwardBlock<scalar_t> block = pick_forward<scalar_t>();
    at::parallel_for(0, sz.batch, grain_samples(sz.num_classes),
                     [&](int64_t begin, int64_t end) { block(args, begin, end); });
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
  const BackwardInputs in = contiguous_backward_inputs(grad_scores, scores, lse, logits_1, logits_2,
                                                       logits_12, labels, entropy_1, entropy_2,
                                                       redundancy);
  check_labels_in_range(kBackwardName, in.labels, sz.num_classes);
  at::Tensor grad_1, grad_2, grad_12, grad_entropy;
  std::tie(grad_1, grad_2, grad_12, grad_entropy) = empty_backward_outputs(sz, in);
  if (sz.batch > 0) {
    AT_DISPATCH_FLOATING_TYPES(logits_1.scalar_type(), kBackwardName, [&] {
      const BackwardArgs<scalar_t> args{
          {grad_1.data_ptr<scalar_t>(), grad_2.data_ptr<scalar_t>(), grad_12.data_ptr<scalar_t>()},
          grad_entropy.data_ptr<scalar_t>(), in.grad_scores.data_ptr<scalar_t>(),
          in.scores.data_ptr<scalar_t>(), in.lse.data_ptr<double>(),
          {in.logits[0].data_ptr<scalar_t>(), in.logits[1].data_ptr<scalar_t>(),
           in.logits[2].data_ptr<scalar_t>()},
          in.labels.data_ptr<int64_t>(), opt_ptr<scalar_t>(in.entropy_1),
          opt_ptr<scalar_t>(in.entropy_2), redundancy, sz.num_classes};
      const BackwardBlock<scalar_t> block = pick_backward<scalar_t>();
      at::parallel_for(0, sz.batch, grain_samples(sz.num_classes),
                       [&](int64_t begin, int64_t end) { block(args, begin, end); });
    });
  }
  return {grad_1, grad_2, grad_12, grad_entropy};
}

}  // namespace

std::string cpu_kernel_isa() { return isa_name(chosen_isa()); }

std::vector<std::string> cpu_kernel_isas() {
  std::vector<std::string> names;
  for (const Isa isa : supported_isas()) {
    names.emplace_back(isa_name(isa));
  }
  return names;
}

}  // namespace interaction
}  // namespace dmil_fast

// A fragment, so that every op folder can add its own definitions to the dmil_fast namespace.
TORCH_LIBRARY_FRAGMENT(dmil_fast, m) {
  m.def(
      "interaction_scores(Tensor logits_1, Tensor logits_2, Tensor logits_12, Tensor labels, "
      "Tensor? entropy_1, Tensor? entropy_2, Tensor? log_prior, int redundancy, "
      "bool save_lse=True) -> (Tensor scores, Tensor lse)");
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
