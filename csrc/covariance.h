// Closed-form covariance merges (ACE-Merging, WUDI, RegMean): the device-independent drivers.
//
// The drivers compose three kinds of work. Our kernels (covariance_moments, covariance_assemble;
// CPU in cpu/covariance.cpp, CUDA in cuda/covariance.cu) do the memory-bound parts in one pass
// each: task vectors, column means, centring and energies; the ridge, the rank-one prior and the
// float64 system. Dense linear algebra (Grams, products, Cholesky, triangular solves, the symmetric
// eigensolver of the refinement) goes through ATen, hence cuBLAS / cuSOLVER or the CPU BLAS/LAPACK.
// Every op works on a batch of same-shape layers [L, m, n] at once.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace mk {

// x^T x for x [..., m, n] (float32 or float64), exactly symmetric. Only the block-lower triangle is
// computed, in panels of whole block rows, so the work is (1 + 1/blocks) m n^2 instead of 2 m n^2.
at::Tensor sym_gram(const at::Tensor& x);

// X = b (r + 1 c^T)^{-1} for b [..., m, n], r [..., n, n] symmetric positive definite, c [..., n]
// or none, in float64: Cholesky of r, two triangular solves, and the Sherman-Morrison correction
// for the rank-one term. Batch entries whose Cholesky fails (or whose rank-one update is singular)
// fall back to the pseudo-inverse of the whole matrix; `what` names the caller in errors.
// Returns (X in b's dtype, fallback flags [...] bool).
std::tuple<at::Tensor, at::Tensor> spd_solve(const at::Tensor& b, const at::Tensor& r,
                                             const c10::optional<at::Tensor>& c, c10::string_view what);

// ACE-Merging of L same-shape layers (../shared/specs/ace.md). gate: 0 auto, 1 on, 2 off.
// Returns (merged [L, m, n] in base's dtype, het [L] bool, gamma [L] float64, energies [T, L]
// float64, fallback [L] bool, refined [L] bool).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ace_merge(
    const at::Tensor& base, at::TensorList finetuned, double eps, double tau, double k_frac, double scale,
    int64_t gate, double rank_rtol);

}  // namespace mk
