// Device-independent drivers of the closed-form covariance merges; see covariance.h. They run on
// whatever device their inputs live on: the kernels they call (covariance_moments,
// covariance_assemble) go through the dispatcher, everything else through ATen.
#include "covariance.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cholesky_solve.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/linalg_pinv.h>
#include <ATen/ops/log.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/tril.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace mk {
namespace {

constexpr double kDelta = 1e-12;  // the spec's delta: keeps logs and divisions finite

using Moments = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Assembled = std::tuple<at::Tensor, at::Tensor>;

Moments covariance_moments(const at::Tensor& base, at::TensorList finetuned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mergekernels::covariance_moments", "")
                       .typed<Moments(const at::Tensor&, at::TensorList)>();
  return op.call(base, finetuned);
}

Assembled covariance_assemble(const at::Tensor& gram_sum, const at::Tensor& ridge, const at::Tensor& prior_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mergekernels::covariance_assemble", "")
                       .typed<Assembled(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(gram_sum, ridge, prior_scale);
}

// Block rows of the Gram: each panel is one GEMM, wide enough to keep the device busy (a GPU needs
// far larger tiles than a CPU core), and at most 8 of them so the saving (1 - 1/blocks) / 2 is
// nearly all there.
int64_t gram_blocks(const at::Tensor& x) {
  const int64_t min_width = x.is_cpu() ? 256 : 1024;
  return std::clamp<int64_t>(x.size(-1) / min_width, 1, 8);
}

std::vector<int64_t> batch_shape(const at::Tensor& x, int64_t trailing) {
  auto s = x.sizes().vec();
  s.resize(s.size() - trailing);
  return s;
}

}  // namespace

at::Tensor sym_gram(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "sym_gram: x must have at least 2 dimensions, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "sym_gram: x must be float32 or float64, got ", x.scalar_type());
  const int64_t m = x.size(-2), n = x.size(-1);
  const auto xb = x.reshape({-1, m, n});
  const int64_t blocks = gram_blocks(x), width = (n + blocks - 1) / std::max<int64_t>(blocks, 1);
  // A GEMM need not round (i, j) and (j, i) alike, so the upper triangle is always the mirror of the
  // lower one: the result is exactly symmetric (Cholesky and eigensolvers read one triangle, products
  // both, and covariance_assemble takes row sums for column sums).
  const auto symmetrize_block = [](at::Tensor d) { d.copy_(at::tril(d).add_(at::tril(d, -1).mT())); };
  at::Tensor out;
  if (blocks == 1) {
    out = at::bmm(xb.mT(), xb);
    symmetrize_block(out);
  } else {
    out = at::empty({xb.size(0), n, n}, x.options());
    for (int64_t r0 = 0; r0 < n; r0 += width) {
      const int64_t r1 = std::min(n, r0 + width);
      auto panel = out.slice(1, r0, r1);
      panel.slice(2, 0, r1).copy_(at::bmm(xb.slice(2, r0, r1).mT(), xb.slice(2, 0, r1)));
      symmetrize_block(panel.slice(2, r0, r1));
      out.slice(1, 0, r0).slice(2, r0, r1).copy_(panel.slice(2, 0, r0).mT());
    }
  }
  auto shape = batch_shape(x, 2);
  shape.push_back(n);
  shape.push_back(n);
  return out.reshape(shape);
}

std::tuple<at::Tensor, at::Tensor> spd_solve(const at::Tensor& b, const at::Tensor& r,
                                             const c10::optional<at::Tensor>& c, c10::string_view what) {
  TORCH_CHECK(b.dim() >= 2, what, ": b must have at least 2 dimensions, got shape ", b.sizes());
  const int64_t m = b.size(-2), n = b.size(-1);
  TORCH_CHECK(r.dim() == b.dim() && r.size(-1) == n && r.size(-2) == n &&
                  batch_shape(r, 2) == batch_shape(b, 2),
              what, ": r must have shape [..., ", n, ", ", n, "] matching b ", b.sizes(), ", got ", r.sizes());
  TORCH_CHECK(b.scalar_type() == at::kFloat || b.scalar_type() == at::kDouble, what,
              ": b must be float32 or float64, got ", b.scalar_type());
  TORCH_CHECK(r.device() == b.device(), what, ": r is on ", r.device(), " but b is on ", b.device());
  const auto b64 = b.to(at::kDouble).reshape({-1, m, n});
  const auto r64 = r.to(at::kDouble).reshape({-1, n, n});
  const int64_t batch = b64.size(0);
  auto [chol, info] = at::linalg_cholesky_ex(r64, /*upper=*/false, /*check_errors=*/false);
  // X r = b  <=>  r X^T = b^T (r symmetric).
  at::Tensor x = at::cholesky_solve(b64.mT(), chol, /*upper=*/false).mT();
  at::Tensor bad = info.ne(0);
  at::Tensor c64;
  if (c.has_value()) {
    TORCH_CHECK(c->dim() == b.dim() - 1 && c->size(-1) == n && batch_shape(*c, 1) == batch_shape(b, 2), what,
                ": c must have shape [..., ", n, "] matching b ", b.sizes(), ", got ", c->sizes());
    TORCH_CHECK(c->device() == b.device(), what, ": c is on ", c->device(), " but b is on ", b.device());
    c64 = c->to(at::kDouble).reshape({batch, n, 1});
    // Sherman-Morrison: (r + 1 c^T)^{-1} = r^{-1} - r^{-1} 1 c^T r^{-1} / (1 + c^T r^{-1} 1), so
    // X = b r^{-1} - (b r^{-1} 1) z^T / (1 + 1^T z) with z = r^{-1} c (r symmetric).
    const auto z = at::cholesky_solve(c64, chol, /*upper=*/false);
    const auto denom = z.sum({1}, /*keepdim=*/true).add_(1.0);
    const auto scale = z.abs().sum({1, 2}).add_(1.0);
    bad = bad.logical_or(denom.reshape({batch}).abs().le(scale.mul(1e-12)));
    x = at::baddbmm(x, x.sum({2}, /*keepdim=*/true).div_(denom), z.mT(), /*beta=*/1.0, /*alpha=*/-1.0);
  }
  if (batch > 0 && bad.any().item<bool>()) {
    const auto idx = bad.nonzero().squeeze(1);
    auto a = r64.index_select(0, idx);
    if (c64.defined()) a = a.add(c64.index_select(0, idx).mT());  // every row gains c^T
    x = x.contiguous();
    x.index_copy_(0, idx, at::matmul(b64.index_select(0, idx), at::linalg_pinv(a)));
    // The Python wrappers warn from the returned flags (a C++ warning would bypass Python's filters).
  }
  return {x.to(b.scalar_type()).contiguous().reshape(b.sizes()), bad.reshape(batch_shape(b, 2))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ace_merge(
    const at::Tensor& base, at::TensorList finetuned, double eps, double tau, double k_frac, double scale,
    int64_t gate, double rank_rtol) {
  TORCH_CHECK(base.dim() == 3, "ace_merge: base must be [layers, rows, cols], got shape ", base.sizes());
  TORCH_CHECK(gate >= 0 && gate <= 2, "ace_merge: gate must be 0 (auto), 1 (on) or 2 (off), got ", gate);
  TORCH_CHECK(eps >= 0, "ace_merge: eps must be >= 0, got ", eps);
  TORCH_CHECK(k_frac >= 0 && k_frac <= 1, "ace_merge: k_frac must be in [0, 1], got ", k_frac);
  const int64_t T = static_cast<int64_t>(finetuned.size());
  const int64_t L = base.size(0), m = base.size(1), n = base.size(2);
  auto [centred, colmean, energy, centred_energy] = covariance_moments(base, finetuned);
  const auto f64 = energy.options();

  // 1. Heterogeneity gate on the log energies (the unbiased variance needs T >= 2).
  at::Tensor gamma, het;
  if (T >= 2) {
    const auto ell = at::log(energy + kDelta);
    const auto mean = ell.mean(0);
    gamma = (ell - mean).pow(2).sum(0).div_(static_cast<double>(T - 1)).div_(mean * mean + kDelta);
  } else {
    gamma = at::full({L}, std::numeric_limits<double>::quiet_NaN(), f64);
  }
  if (gate == 0)
    het = T >= 2 ? gamma.gt(tau) : at::zeros({L}, f64.dtype(at::kBool));
  else
    het = at::full({L}, gate == 1, f64.dtype(at::kBool));
  const bool any_het = L > 0 && het.any().item<bool>();

  // 2. Normalisation: het layers divide S_t and the ridge by s_t = tr(G_t) + delta.
  const auto s = centred_energy + kDelta;
  const auto norm = at::where(het.unsqueeze(0), s.reciprocal(), at::ones_like(s));  // [T, L]
  const auto ridge = norm * eps;
  const auto ridge32 = ridge.to(at::kFloat);

  // Accumulate over experts: gram_sum = sum_t S_t (ridge-free), products = B = sum_t W_t R_t, and
  // for the refinement ridged = sum_t eps_t W_t, w_sum = sum_t W_t, v = sum_t S_t mu_t.
  // Het layers are handled by scaling the centred vectors in place, Z_t = sqrt(a_t) W_t with
  // a_t = 1 / s_t, so that S_t = Z_t^T Z_t is a plain Gram and one layer's experts stacked, [T m, n],
  // give sum_t S_t in a single product.
  const auto root = norm.sqrt(), inv_root = root.reciprocal();  // [T, L]
  if (any_het) centred.mul_(root.t().to(at::kFloat).view({L, T, 1, 1}));
  const auto inv_root32 = inv_root.to(at::kFloat), ridge_w32 = (ridge * inv_root).to(at::kFloat);
  const auto f32 = centred.options();
  const auto per_layer = [&](const at::Tensor& x, int64_t t) { return x.select(0, t).view({L, 1, 1}); };
  at::Tensor gram_sum, products, ridged, w_sum, v;
  if (any_het) {
    ridged = at::zeros({L, m, n}, f32);
    w_sum = at::zeros({L, m, n}, f32);
    v = at::zeros({L, n, 1}, f32);
  }
  if (m < n) {
    // The n x n Gram only as the sum; the products as (W W^T) W with the m x m Grams.
    gram_sum = sym_gram(centred.view({L, T * m, n}));
    products = at::zeros({L, m, n}, f32);
  }
  for (int64_t t = 0; t < T; ++t) {
    const auto z = centred.select(1, t);  // sqrt(a_t) W_t, [L, m, n]
    const auto mu = colmean.select(0, t).unsqueeze(-1);
    if (m >= n) {
      auto S = sym_gram(z);
      if (any_het) v.baddbmm_(S, mu);
      gram_sum = t == 0 ? S.clone() : gram_sum.add_(S);
      S.diagonal(0, -2, -1).add_(per_layer(ridge32, t).view({L, 1}));  // R_t
      S.mul_(per_layer(inv_root32, t));                                 // W_t R_t = Z_t R_t / sqrt(a_t)
      products = t == 0 ? at::bmm(z, S) : products.baddbmm_(z, S);
    } else {
      // a_t W W^T W = (Z Z^T / sqrt(a_t)) Z
      products.baddbmm_(sym_gram(z.mT()).mul_(per_layer(inv_root32, t)), z);
      products.addcmul_(z, per_layer(ridge_w32, t));
      if (any_het) v.baddbmm_(z.mT(), at::bmm(z, mu));
    }
    if (any_het) {
      ridged.addcmul_(z, per_layer(ridge_w32, t));
      w_sum.addcmul_(z, per_layer(inv_root32, t));
    }
  }
  if (any_het) centred.mul_(inv_root.t().to(at::kFloat).view({L, T, 1, 1}));  // undo: callers may reuse it

  // 3-4. A = sum_t R_t + 1 c^T; W_pre = B A^{-1}.
  const auto prior_scale = at::where(het, energy.mean(0) + kDelta, at::ones_like(gamma));
  auto [system, prior] = covariance_assemble(gram_sum, ridge.sum(0), prior_scale);
  auto [w_pre, fallback] = spd_solve(products, system, prior, "ace_merge");

  // 5. Spectral refinement of the het layers.
  const int64_t k = static_cast<int64_t>(std::floor(k_frac * static_cast<double>(std::min(m, n))));
  auto refined = k > 0 ? het.clone() : at::zeros_like(het);
  if (any_het && k > 0) {
    const auto idx = het.nonzero().squeeze(1);
    const auto pick = [&](const at::Tensor& x) { return x.index_select(0, idx); };
    const int64_t lh = idx.numel();
    const auto r_bar = pick(system).div(static_cast<double>(T)).to(at::kFloat);  // ridge included
    const auto mu_sum = pick(colmean.sum(0)).unsqueeze(-1);                      // [lh, n, 1]
    // Delta_res = sum_t Delta_t S_t - (sum_t Delta_t) R_bar with Delta_t = W_t + 1 mu_t^T and
    // sum_t W_t S_t = B - ridged: (B - ridged) + 1 v^T - (w_sum R_bar + 1 (R_bar mu_sum)^T).
    auto f = pick(w_pre) + pick(products) - pick(ridged) + pick(v).mT() - at::bmm(pick(w_sum), r_bar) -
             at::bmm(r_bar, mu_sum).mT();
    // Top-k singular triplets from a float64 symmetric eigensolver on the smaller Gram of F (the Gram
    // squares the condition number, float64 keeps sigma_k accurate to ~1e-8 sigma_1).
    const auto f64m = f.to(at::kDouble);
    const bool column_side = n <= m;
    const auto [evals, evecs] = at::linalg_eigh(column_side ? sym_gram(f64m) : sym_gram(f64m.mT()));
    const int64_t side = std::min(m, n);
    const auto sigma = evals.narrow(-1, side - k, k).clamp_min(0.0).sqrt();  // ascending
    const auto vecs = evecs.narrow(-1, side - k, k);
    const auto sigma_iso = sigma.mean(-1).view({lh, 1, 1});
    // Directions with sigma_i <= rank_rtol sigma_1 are arbitrary in any SVD: they contribute nothing.
    const auto keep = sigma.gt(sigma.amax(-1, /*keepdim=*/true).mul(rank_rtol));
    const auto inv = at::where(keep, sigma.reciprocal(), at::zeros_like(sigma)).unsqueeze(-2);
    const auto uv = column_side ? at::bmm(at::bmm(f64m, vecs).mul_(inv), vecs.mT())   // F V S^-1 V^T
                                : at::bmm(vecs * inv, at::bmm(vecs.mT(), f64m));      // U S^-1 U^T F
    w_pre.index_copy_(0, idx, pick(w_pre).to(at::kDouble).add_(uv.mul_(sigma_iso)).to(at::kFloat));
  }

  // 6. theta_0 + scale * W.
  auto merged = base.to(at::kFloat).add(w_pre, scale).to(base.scalar_type());
  return {merged, het, gamma, energy, fallback, refined};
}

TORCH_LIBRARY_IMPL(mergekernels, CPU, m) {
  m.impl("sym_gram", &sym_gram);
  m.impl("spd_solve", &spd_solve);
  m.impl("ace_merge", &ace_merge);
}

}  // namespace mk
