"""Float64 references for the closed-form methods (WUDI, RegMean), written from
../shared/specs/baselines.md and independent of mergekernels.

Task vectors are formed in float32 (tau = float32(theta_t) - float32(theta_0)) as the package
does; everything after that is float64, with dense pseudo-inverses (torch.linalg.pinv) where the
package uses Cholesky or a restricted eigendecomposition.
"""

from __future__ import annotations

import torch

# Relative tolerance of the references' pseudo-inverses. The singular test cases are exactly
# singular (a gap of ~1e12 or more), so any value between ~1e-13 and ~1e-4 gives the same answer.
PINV_RTOL = 1e-10


def task_vectors(base: torch.Tensor, finetuned) -> torch.Tensor:
    """[T, m, n] float64 task vectors of 2-D tensors."""
    b = base.detach().cpu().float()
    return torch.stack([x.detach().cpu().float() - b for x in finetuned]).double()


def wudi_weights(taus: torch.Tensor) -> torch.Tensor:
    """w_t = 1 / ||tau_t||_F^2, 0 for a zero task vector."""
    sq = taus.square().sum((-2, -1))
    return torch.where(sq > 0, 1.0 / sq.clamp(min=1e-300), 0.0)


def wudi_loss(tau: torch.Tensor, taus: torch.Tensor) -> float:
    """L(tau) = sum_t w_t ||(tau - tau_t) tau_t^T||_F^2, straight from the definition."""
    tau = tau.double()
    w = wudi_weights(taus)
    return sum(float(w[t] * ((tau - taus[t]) @ taus[t].T).square().sum()) for t in range(taus.shape[0]))


def wudi_normal_equations(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, P) = (sum_t w_t G_t, sum_t w_t tau_t G_t), G_t = tau_t^T tau_t."""
    w = wudi_weights(taus)
    grams = taus.transpose(-2, -1) @ taus
    r = (w[:, None, None] * grams).sum(0)
    p = (w[:, None, None] * (taus @ grams)).sum(0)
    return r, p


def wudi_gradient(tau: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """dL/dtau = 2 sum_t w_t (tau - tau_t) G_t."""
    r, p = wudi_normal_equations(taus)
    return 2.0 * (tau.double() @ r - p)


def wudi_minimiser(taus: torch.Tensor) -> torch.Tensor:
    """The minimiser of L closest to tau_0 = sum_t tau_t: tau_0 + (P - tau_0 R) R^+."""
    r, p = wudi_normal_equations(taus)
    tau0 = taus.sum(0)
    return tau0 + (p - tau0 @ r) @ torch.linalg.pinv(r, hermitian=True, rtol=PINV_RTOL)


def wudi(base: torch.Tensor, finetuned, scale: float = 1.0) -> torch.Tensor:
    """theta_0 + scale * tau* for a 2-D tensor, in base's dtype."""
    taus = task_vectors(base, finetuned)
    out = base.detach().cpu().float().double() + scale * wudi_minimiser(taus)
    return out.to(base.dtype)


def mean_of_task_vectors(base: torch.Tensor, finetuned, scale: float = 1.0) -> torch.Tensor:
    """theta_0 + scale * mean_t tau_t (the rule for tensors that are not 2-D)."""
    b = base.detach().cpu().float()
    taus = torch.stack([x.detach().cpu().float() - b for x in finetuned]).double()
    return (b.double() + scale * taus.mean(0)).to(base.dtype)


def adam(taus: torch.Tensor, lr: float, steps: int, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """Adam (Kingma & Ba 2015, with bias correction, as torch.optim.Adam's defaults) on L from
    tau_0 = sum_t tau_t, in float64 with the analytic gradient."""
    tau = taus.sum(0).clone()
    m = torch.zeros_like(tau)
    v = torch.zeros_like(tau)
    for step in range(1, steps + 1):
        g = wudi_gradient(tau, taus)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat = m / (1 - betas[0] ** step)
        v_hat = v / (1 - betas[1] ** step)
        tau = tau - lr * m_hat / (v_hat.sqrt() + eps)
    return tau


def regmean(base: torch.Tensor, finetuned, grams, reduction: float = 0.95) -> torch.Tensor:
    """W* = (sum_t W_t G~_t)(sum_t G~_t)^+ with G~ = r G + (1 - r) diag(G), taking, when the sum
    is singular, the minimiser closest to the mean of the W_t. Weights are out x in."""
    weights = torch.stack([x.detach().cpu().float() for x in finetuned]).double()
    shrunk = [
        reduction * g.detach().cpu().double()
        + (1 - reduction) * torch.diag(torch.diag(g.detach().cpu().double()))
        for g in grams
    ]
    total = sum(shrunk)
    rhs = sum(weights[t] @ shrunk[t] for t in range(len(shrunk)))
    mean = weights.mean(0)
    merged = mean + (rhs - mean @ total) @ torch.linalg.pinv(total, hermitian=True, rtol=PINV_RTOL)
    return merged.to(base.dtype)


def regmean_objective(weight: torch.Tensor, finetuned, grams, reduction: float = 0.95) -> float:
    """sum_t tr((W - W_t) G~_t (W - W_t)^T): RegMean's regression loss with shrunk Grams."""
    w = weight.detach().cpu().double()
    total = 0.0
    for x, g in zip(finetuned, grams, strict=True):
        g = g.detach().cpu().double()
        g = reduction * g + (1 - reduction) * torch.diag(torch.diag(g))
        d = w - x.detach().cpu().float().double()
        total += float((d @ g * d).sum())
    return total


def input_gram(inputs) -> torch.Tensor:
    """X^T X / #tokens over a list of inputs [..., in] (leading dimensions are tokens)."""
    rows = torch.cat([x.detach().cpu().double().reshape(-1, x.shape[-1]) for x in inputs])
    return rows.T @ rows / rows.shape[0]
