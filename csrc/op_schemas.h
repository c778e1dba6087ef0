// The op schemas of torch.ops.mergekernels, written once. csrc/ops.cpp declares them for the
// package; the emulated CUDA build of the tests (csrc/emulation/) declares the same schemas under
// its own namespace, so both are called with identical arguments.
#pragma once

#include <torch/library.h>

namespace mk {

inline void define_ops(torch::Library& m) {
  // One pass over base and finetuned: Gram matrix of the task vectors (float64, diagonal = squared
  // norms), per-task max |tau| and non-zero count, sign agreement counts [agree, any non-zero], and
  // optionally a per-task histogram of the IEEE exponent of |tau| (256 bins). Without a base, the
  // same statistics of the tensors themselves (tau_t = finetuned_t).
  m.def(
      "tv_stats(Tensor? base, Tensor[] finetuned, bool histogram) -> "
      "(Tensor gram, Tensor absmax, Tensor nnz, Tensor sign_counts, Tensor hist)");
  // Per element, the population variance of tau_1..tau_K (float32 values, float64 Welford recurrence,
  // rounded to float32): SCE's selection statistic, equal to torch.var over the stacked task vectors.
  m.def("element_variance(Tensor base, Tensor[] finetuned) -> Tensor");
  // Radix-select histogram over |tau| bit patterns, accumulated into `hist` ([K, 65536] at level 0,
  // [K, 32768] at level 1 counting only elements whose level-0 digit equals prefix[t]).
  m.def(
      "magnitude_histogram_(Tensor(a!) hist, Tensor base, Tensor[] finetuned, int level, "
      "Tensor? prefix) -> ()");
  // Fused merge: base + scale * reduce_t(sparsify(w_t * (finetuned_t - base))), one read of every
  // input and one write of the output. See csrc/common/merge_element.h for the modes. With
  // base_scale, a combination of the inputs themselves: base_scale * base + scale * reduce_t(w_t *
  // finetuned_t).
  m.def(
      "fused_merge(Tensor base, Tensor[] finetuned, float[] weights, float scale, int reduce, bool ties, "
      "bool weighted_election, int sparsify, Tensor? thresholds, int keep_source, float[] keep, "
      "float[] step, float[] post, bool rescale_inverse, Tensor? row_keep, Tensor[] ranks, int seed, "
      "int key, int element_offset, int row_len, ScalarType? out_dtype, int[] tie_cuts=[], "
      "float? base_scale=None, Tensor(a!)? nonfinite=None) -> Tensor");
  // The same, written into `out` (base's shape, contiguous, on base's device; its dtype is the
  // output dtype): the checkpoint engine hands in the tensor's place in a reused shard buffer.
  // Nothing is returned (torch.compile does not take custom ops whose outputs alias inputs).
  m.def(
      "fused_merge.out(Tensor base, Tensor[] finetuned, float[] weights, float scale, int reduce, bool ties, "
      "bool weighted_election, int sparsify, Tensor? thresholds, int keep_source, float[] keep, "
      "float[] step, float[] post, bool rescale_inverse, Tensor? row_keep, Tensor[] ranks, int seed, "
      "int key, int element_offset, int row_len, ScalarType? out_dtype, int[] tie_cuts=[], "
      "float? base_scale=None, Tensor(a!)? nonfinite=None, *, Tensor(b!) out) -> ()");
  // tie_cuts: [] or 2K element indices (tie_lo per task, then tie_hi): exact-k tie breaking at the
  // trim / band thresholds (see MergeConfig in csrc/common/merge_element.h). nonfinite: [K + 1]
  // int32 flags on base's device, set to 1 for each input (base first) that holds a NaN or an Inf.
  // The sparsified task vector of one expert (float32), with the same masks as fused_merge.
  m.def(
      "masked_drop(Tensor base, Tensor finetuned, int expert, int sparsify, Tensor? thresholds, "
      "int keep_source, float keep, float step, float post, bool rescale_inverse, Tensor? row_keep, "
      "Tensor? rank, int seed, int key, int element_offset, int row_len) -> Tensor");
  // Ascending rank of |tau| within each row of `row_len` elements (ties by position), int32 of base's
  // shape: DELLA's magnitude ranks.
  m.def("row_ranks(Tensor base, Tensor finetuned, int row_len) -> Tensor");
  // L1 norms of tau and of the Bernoulli-masked tau (no rescale), [2, K] float64: mergekit's
  // L1-matching rescale factor is row 0 / row 1.
  m.def(
      "drop_l1(Tensor base, Tensor[] finetuned, float[] keep, int seed, int key, int element_offset) -> Tensor");

  // Closed-form covariance merges (csrc/covariance.h), batched over L layers of one shape [L, m, n].
  // One pass over the inputs: centred task vectors W_t = Delta_t - 1 mu_t^T ([L, T, m, n] float32:
  // one layer's experts stack into a [T m, n] matrix),
  // column means mu_t ([T, L, n] float32), energies ||Delta_t||^2 and ||W_t||^2 ([T, L] float64).
  m.def(
      "covariance_moments(Tensor base, Tensor[] finetuned) -> "
      "(Tensor centred, Tensor colmean, Tensor energy, Tensor centred_energy)");
  // From sum_t S_t ([L, n, n] float32): the float64 system sum_t S_t + ridge I and the prior vector
  // c = column means of sum_t S_t / prior_scale ([L, n]); ridge, prior_scale: [L] float64.
  m.def("covariance_assemble(Tensor gram_sum, Tensor ridge, Tensor prior_scale) -> (Tensor system, Tensor prior)");
  // x^T x, exactly symmetric, half the work of a full product.
  m.def("sym_gram(Tensor x) -> Tensor");
  // b (r + 1 c^T)^{-1} in float64 by Cholesky + Sherman-Morrison; pseudo-inverse fallback flagged.
  m.def("spd_solve(Tensor b, Tensor r, Tensor? c, str what) -> (Tensor x, Tensor fallback)");
  // ACE-Merging of L same-shape layers; gate 0 auto, 1 on, 2 off.
  m.def(
      "ace_merge(Tensor base, Tensor[] finetuned, float eps, float tau, float k_frac, float scale, int gate, "
      "float rank_rtol) -> (Tensor merged, Tensor het, Tensor gamma, Tensor energies, Tensor fallback, "
      "Tensor refined)");
}

}  // namespace mk
