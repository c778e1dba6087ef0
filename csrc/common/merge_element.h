// Per-element arithmetic of the fused merges, shared by the CPU and CUDA kernels.
//
// A fused merge reads, for each element, the base value and the K fine-tuned values once, forms
// tau_t = theta_t - theta_0 in float32, sparsifies it (trim / band / random drop), and reduces
// over tasks. TIES consensus is done in the same single pass: positive and negative contributions
// are accumulated separately next to the election sum, and the elected sign picks one side at
// the end. So no per-task values are kept per element, whatever K is.
#pragma once

#include "mk_common.h"
#include "philox.h"

namespace mk {

// kSparsifyClip (mergekit's nearswap): tau * clamp(d / max(|tau|, 1e-6), 0, 1) with d the task's lower
// threshold, so |tau| <= d passes whole and larger entries move only d.
enum Sparsify : int32_t {
  kSparsifyNone = 0,
  kSparsifyTrim = 1,
  kSparsifyBand = 2,
  kSparsifyDrop = 3,
  kSparsifyClip = 4
};
enum KeepSource : int32_t { kKeepConstant = 0, kKeepPerRow = 1, kKeepRank = 2 };
// kReduceActive (RAM): the mean of the non-zero values, except that an element with exactly one
// non-zero value gets that value times its task's weight (RAM+'s lambda; 1 for plain RAM).
enum Reduce : int32_t { kReduceSum = 0, kReduceMean = 1, kReduceWeighted = 2, kReduceActive = 3 };

// mergekit's rule for a vanishing normaliser: divide by 1 instead.
constexpr float kMinDivisor = 1e-8f;

// Correctly rounded float ops; on the device the _rn intrinsics also forbid FMA contraction.
MK_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MK_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
MK_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MK_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// One step of Welford's recurrence in float64 (n: the count including x), the order torch.var
// takes on the CPU, so element_variance equals torch.var(stack(tau), 0, unbiased=False) bit for bit.
// Plain double operations: host builds do not contract them (-ffp-contract=off), nor does nvcc
// (--fmad=false).
MK_HD void welford_add(double& mean, double& m2, int n, double x) {
  const double d = x - mean;
  mean = mean + d / static_cast<double>(n);
  m2 = m2 + d * (x - mean);
}

// Everything a fused merge needs besides the tensors' data pointers. Plain data, passed by value
// to CUDA kernels.
struct MergeConfig {
  int32_t num_experts;
  int32_t sparsify;     // Sparsify
  int32_t keep_source;  // KeepSource (kSparsifyDrop only)
  int32_t reduce;       // Reduce
  int32_t expert_offset;  // expert index of task 0 in the RNG counter (masked_drop uses it)
  bool ties;              // TIES sign election + disjoint merge
  bool weighted_election;  // elect on w_t * tau_t (mergekit) instead of tau_t (paper)
  bool rescale_inverse;    // divide kept values by their keep probability
  float scale;             // lambda
  // A linear combination of the inputs themselves, base_scale * x_0 + reduce_t(w_t * x_t): the
  // fine-tuned values enter as they are instead of as tau_t = x_t - x_0 (slerp, karcher, ...).
  bool points;
  float base_scale;
  PhiloxKey key;
  int64_t element_offset;  // global index of the first element of this call (chunking)
  int64_t row_len;         // elements per row, for per-row keep rates
  int64_t num_rows;        // rows per task in row_keep
  const float* thresholds;  // [2, K] on the data's device: keep |tau| >= row 0 and < row 1
  // Host copies of the thresholds for the CPU kernels: by-value fields let the compiler hoist them
  // out of vectorised loops (a load through `thresholds` might alias the accumulators).
  float lower[kMaxExperts];
  float upper[kMaxExperts];
  // Exact-k at the thresholds (mergekit's sort, made stable): by global element index, which of the
  // entries equal to a threshold are kept. Trim keeps ties at the lower threshold with index <
  // tie_lo (default: all); band keeps ties at the lower threshold with index >= tie_lo (default 0:
  // all) and ties at the upper threshold with index < tie_hi (default 0: none).
  int64_t tie_lo[kMaxExperts];
  int64_t tie_hi[kMaxExperts];
  const float* row_keep;    // [K, num_rows] keep probabilities (kKeepPerRow)
  const int32_t* ranks[kMaxExperts];  // per-row magnitude ranks of this call's elements (kKeepRank)
  float weight[kMaxExperts];
  float keep[kMaxExperts];  // constant keep probability, or the rank-0 probability (kKeepRank)
  float step[kMaxExperts];  // keep-probability increment per rank (kKeepRank)
  float post[kMaxExperts];  // multiplier applied to kept values (L1 matching); 1 otherwise
  // [K + 1] flags on the data's device, or nullptr: entry 0 (the base) and 1 + t (task t) are set
  // to 1 when that input holds a NaN or an Inf. The merge reads every input element anyway, so the
  // check costs no second read (the checkpoint engine names the tensor from these flags).
  int32_t* nonfinite;
};

// NaN or +-Inf: the exponent bits all ones, tested on the bits (the same on the host and device).
MK_HD bool is_nonfinite(float v) { return abs_key(v) >= kInfKey; }

template <int kSource>
MK_HD float keep_probability_as(const MergeConfig& c, int t, int64_t global, int64_t local) {
  if constexpr (kSource == kKeepPerRow) {
    return c.row_keep[static_cast<int64_t>(t) * c.num_rows + global / c.row_len];
  } else if constexpr (kSource == kKeepRank) {
    return fadd(c.keep[t], fmul(c.step[t], static_cast<float>(c.ranks[t][local])));
  } else {
    return c.keep[t];
  }
}

MK_HD float keep_probability(const MergeConfig& c, int t, int64_t global, int64_t local) {
  switch (c.keep_source) {
    case kKeepPerRow:
      return keep_probability_as<kKeepPerRow>(c, t, global, local);
    case kKeepRank:
      return keep_probability_as<kKeepRank>(c, t, global, local);
    default:
      return keep_probability_as<kKeepConstant>(c, t, global, local);
  }
}

// A random keep decision and rescale for a given keep probability q. Branch-free (the division
// is done for dropped entries too and discarded) so the CPU loops vectorise.
MK_HD float drop_with(const MergeConfig& c, int t, float tau, float q, uint32_t word) {
  const bool keep = uniform24(word) < q;
  const float kept = fmul(c.rescale_inverse ? fdiv(tau, q) : tau, c.post[t]);
  return keep ? kept : 0.0f;
}

// nearswap's move towards the other model: all of tau within `limit`, else `limit` of it (selects
// only; a NaN tau stays NaN).
MK_HD float clip_to(float tau, float limit) {
  const float m = abs_f(tau);
  const float w = fdiv(limit, m > 1e-6f ? m : 1e-6f);
  return fmul(tau, w < 0.0f ? 0.0f : (w > 1.0f ? 1.0f : w));
}

// The CUDA kernels read the thresholds through the device pointer (so does their host emulation,
// csrc/cuda/emulation.h, so the tests run that path); the CPU kernels read the by-value copies.
#if defined(__CUDA_ARCH__) || defined(MK_CUDA_EMULATION)
#define MK_THRESHOLDS_BY_POINTER 1
#else
#define MK_THRESHOLDS_BY_POINTER 0
#endif

MK_HD float lower_threshold(const MergeConfig& c, int t) {
#if MK_THRESHOLDS_BY_POINTER
  return c.thresholds[t];
#else
  return c.lower[t];
#endif
}

MK_HD float upper_threshold(const MergeConfig& c, int t) {
#if MK_THRESHOLDS_BY_POINTER
  return c.thresholds[c.num_experts + t];
#else
  return c.upper[t];
#endif
}

// Sparsified task vector of task t at one element, for a mode known at compile time (the CPU
// kernels specialise their loops on it; kSource only matters for kSparsifyDrop). `word` is the
// element's Philox word for task t; only kSparsifyDrop reads it.
template <int kMode, int kSource = kKeepConstant>
MK_HD float sparsify_as(const MergeConfig& c, int t, int64_t global, int64_t local, float tau, uint32_t word) {
  if constexpr (kMode == kSparsifyTrim) {
    const float m = abs_f(tau), lo = lower_threshold(c, t);
    return (m > lo) | ((m == lo) & (global < c.tie_lo[t])) ? tau : 0.0f;
  } else if constexpr (kMode == kSparsifyBand) {
    const float m = abs_f(tau), lo = lower_threshold(c, t), hi = upper_threshold(c, t);
    const bool above = (m > lo) | ((m == lo) & (global >= c.tie_lo[t]));
    const bool below = (m < hi) | ((m == hi) & (global < c.tie_hi[t]));
    return above & below ? tau : 0.0f;
  } else if constexpr (kMode == kSparsifyDrop) {
    return drop_with(c, t, tau, keep_probability_as<kSource>(c, t, global, local), word);
  } else if constexpr (kMode == kSparsifyClip) {
    return clip_to(tau, lower_threshold(c, t));
  } else {
    return tau;
  }
}

MK_HD float sparsify(const MergeConfig& c, int t, int64_t global, int64_t local, float tau, uint32_t word) {
  switch (c.sparsify) {
    case kSparsifyTrim:
      return sparsify_as<kSparsifyTrim>(c, t, global, local, tau, word);
    case kSparsifyBand:
      return sparsify_as<kSparsifyBand>(c, t, global, local, tau, word);
    case kSparsifyDrop:
      return drop_with(c, t, tau, keep_probability(c, t, global, local), word);
    case kSparsifyClip:
      return sparsify_as<kSparsifyClip>(c, t, global, local, tau, word);
    default:
      return tau;
  }
}

// Running sums of one element over tasks.
struct ElementAccumulator {
  float elect = 0.0f;                          // election sum
  float pos = 0.0f, neg = 0.0f;                // sum of w*v over v > 0, v < 0
  float count_pos = 0.0f, count_neg = 0.0f;    // number of such tasks
  float weight_pos = 0.0f, weight_neg = 0.0f;  // sum of their weights
  float all = 0.0f, weight_all = 0.0f;         // sum of w*v and of w over every task
  float plain = 0.0f, count_all = 0.0f;        // sum of v and number of non-zero v (kReduceActive)
};

// Weight sums of the weighted reduction (kept apart so the CPU kernels can run them as a
// separate, simpler loop).
template <bool kTies>
MK_HD void accumulate_weights(const MergeConfig& c, ElementAccumulator& a, int t, float v) {
  const float w = c.weight[t];
  if constexpr (kTies) {
    a.weight_pos = fadd(a.weight_pos, v > 0.0f ? w : 0.0f);
    a.weight_neg = fadd(a.weight_neg, v < 0.0f ? w : 0.0f);
  } else {
    a.weight_all = fadd(a.weight_all, w);
  }
}

// Adds task t's sparsified value v. Only the fields the merge reads are updated: the consensus
// sums with TIES, the plain sum without; weight sums only for the weighted reduction. The CPU
// kernels instantiate the variant they need so unused fields cost nothing.
template <bool kTies, bool kWeights, bool kActive = false>
MK_HD void accumulate_as(const MergeConfig& c, ElementAccumulator& a, int t, float v) {
  const float w = c.weight[t];
  const float wv = fmul(w, v);
  if constexpr (kActive) {
    a.all = fadd(a.all, wv);
    a.plain = fadd(a.plain, v);
    a.count_all = fadd(a.count_all, v != 0.0f ? 1.0f : 0.0f);
    return;
  }
  if constexpr (kTies) {
    // 1 * v == v exactly, so a multiplier keeps the loop branch-free without changing the sum.
    a.elect = fadd(a.elect, fmul(c.weighted_election ? w : 1.0f, v));
    // Adding 0 instead of skipping keeps the loop branch-free and gives the same bits (the
    // sums start at +0 and 0 is added only where nothing would have been).
    const bool positive = v > 0.0f, negative = v < 0.0f;
    a.pos = fadd(a.pos, positive ? wv : 0.0f);
    a.neg = fadd(a.neg, negative ? wv : 0.0f);
    a.count_pos = fadd(a.count_pos, positive ? 1.0f : 0.0f);
    a.count_neg = fadd(a.count_neg, negative ? 1.0f : 0.0f);
  } else {
    a.all = fadd(a.all, wv);
  }
  if constexpr (kWeights) accumulate_weights<kTies>(c, a, t, v);
}

MK_HD void accumulate(const MergeConfig& c, ElementAccumulator& a, int t, float v) {
  const bool weights = c.reduce == kReduceWeighted;
  if (c.reduce == kReduceActive) {
    accumulate_as<false, false, true>(c, a, t, v);
  } else if (c.ties) {
    if (weights) accumulate_as<true, true>(c, a, t, v);
    else accumulate_as<true, false>(c, a, t, v);
  } else {
    if (weights) accumulate_as<false, true>(c, a, t, v);
    else accumulate_as<false, false>(c, a, t, v);
  }
}

MK_HD float normalise(float sum, float divisor) {
  return abs_f(divisor) < kMinDivisor ? sum : fdiv(sum, divisor);
}

// The merged task vector of one element. Written with selects only (every candidate is computed
// and one is kept) so the CPU output loops vectorise; the kept value is the same either way.
MK_HD float finish(const MergeConfig& c, const ElementAccumulator& a) {
  const bool positive = a.elect >= 0.0f;  // an election sum of exactly 0 elects +
  const float sum = c.ties ? (positive ? a.pos : a.neg) : a.all;
  const float count = c.ties ? (positive ? a.count_pos : a.count_neg) : static_cast<float>(c.num_experts);
  const float weight = c.ties ? (positive ? a.weight_pos : a.weight_neg) : a.weight_all;
  const float mean = count > 0.0f ? fdiv(sum, count) : 0.0f;
  const float weighted = normalise(sum, weight);
  const float active =
      a.count_all == 1.0f ? a.all : (a.count_all > 0.0f ? fdiv(a.plain, a.count_all) : 0.0f);
  return c.reduce == kReduceMean       ? mean
         : c.reduce == kReduceWeighted ? weighted
         : c.reduce == kReduceActive   ? active
                                       : sum;
}

// The value a fine-tuned input contributes: tau = x - x_0, or x itself for a combination of points
// (x - 0 would give the same bits; the select keeps the CPU loops vectorised).
MK_HD float task_value(const MergeConfig& c, float x, float base) { return c.points ? x : fsub(x, base); }

// Every NaN a kernel writes is this one (sign clear, quiet, no payload): CPUs and GPUs make different
// NaN bit patterns (x86 0xFFC00000 for an invalid operation, CUDA 0x7FFFFFFF; CUDA's fp16 / bf16
// conversions 0x7FFF, the CPU's 0x7E00 / 0x7FC0), so canonical NaNs keep outputs equal bit for bit.
constexpr uint32_t kCanonicalNaN = 0x7FC00000u;
MK_HD float canonical_nan(float v) { return v != v ? bits_float(kCanonicalNaN) : v; }

MK_HD float merged_output(const MergeConfig& c, float base, const ElementAccumulator& a) {
  return canonical_nan(fadd(c.points ? fmul(c.base_scale, base) : base, fmul(c.scale, finish(c, a))));
}

}  // namespace mk
