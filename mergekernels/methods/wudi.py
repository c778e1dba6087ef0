"""WUDI merging (Cheng et al. 2025): the merged task vector that best preserves every task's
response to its own task vector.

For one 2-D tensor (out x in) with task vectors tau_t, WUDI minimises the quadratic loss

    L(tau) = sum_t w_t ||(tau - tau_t) tau_t^T||_F^2,   w_t = 1 / ||tau_t||_F^2,

where a zero task vector gets w_t = 0 (it constrains nothing). The paper runs Adam on L
(``solver="adam"``, the iterative reference); L is quadratic, so its minimisers solve
tau R = P with R = sum_t w_t G_t, P = sum_t w_t tau_t G_t and G_t = tau_t^T tau_t.

Closed form (``solver="closed_form"``, the default). With u_t = tau_t / ||tau_t|| (the unit task
vectors) R = sum_t u_t^T u_t. When R is singular (always when T * out < in, and for low-rank or
repeated task vectors) the minimiser is not unique; we return the one closest (in Frobenius norm)
to Adam's starting point tau_0 = sum_t tau_t,

    tau* = tau_0 + (P - tau_0 R) R^+ = tau_0 + sum_t (tau_t - tau_0) u_t^T u_t R^+,

which is P R^{-1} when R is invertible. Because every row of tau_0 lies in the row space of the
stacked u_t, this is also the minimum-norm minimiser. Two equivalent systems are solved, whichever
is smaller (d x d with d = min(in, T * out)):

- primal (T * out >= in): R (in x in), built with ``sym_gram``;
- dual (T * out < in): K = S S^T ((T * out) x (T * out)) with S the u_t stacked by rows, so that
  R^+ = S^T K^+ K^+ S and tau* = tau_0 + Y S with Y = (block t: (tau_t - tau_0) u_t^T) K^+.
  Its blocks are u_s u_t^T, so the right-hand side comes from K itself. The dual turns the
  structurally singular case into a (generically) invertible one.

Either system is solved by :func:`pinv_solve`: a float64 Cholesky solve (``spd_solve``) when the
Gram is well conditioned, and otherwise an exact pseudo-inverse from a float64 eigendecomposition
restricted to the Gram's numerical range (eigenvalues above ``RANK_RTOL`` times the largest). A
ridge would move every answer; the pseudo-inverse changes nothing in the range and drops only the
directions the loss cannot see. Conditioning is detected without a factorisation of our own: a few
fixed random probe rows ride along in the Cholesky solve, and an entry whose probes grow by more
than ``COND_FLAG`` (an estimate of the condition number, right to within a factor of about
sqrt(d) either way), or whose Cholesky failed, takes the eigendecomposition route. Grams,
right-hand sides and solves are float64 (relative error about cond * 1e-16 on the Cholesky route,
so below ~1e-6 for d up to 1e4); the merged tensor is rounded once, to the output dtype. Memory:
float64 copies of the T task vectors of the batch, plus one d x d Gram per layer.

Tensors that are not 2-D merge as theta_0 + scale * mean_t tau_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ops
from ..precision import full_float32

SOLVERS = ("closed_form", "adam")
# Random probe rows appended to every Cholesky solve to estimate the condition number.
PROBES = 4
# Estimated condition numbers above this take the exact eigendecomposition route.
COND_FLAG = 1e8
# Eigenvalues at or below RANK_RTOL * largest count as zero (noise of a float64 Gram of float32
# data sits near 1e-14 of the largest).
RANK_RTOL = 1e-12
_PROBE_SEED = 0x5EED


# ----------------------------------------------------------------------------------------------
# Shared closed-form machinery (RegMean uses it too).
def psd_pinv(gram: torch.Tensor, rtol: float = RANK_RTOL) -> torch.Tensor:
    """Pseudo-inverse of a batch of symmetric positive semi-definite float64 matrices [..., d, d]
    from their eigendecomposition: eigenvalues <= rtol * the largest are treated as 0."""
    evals, evecs = torch.linalg.eigh(gram)
    cutoff = rtol * evals[..., -1:].clamp(min=0.0)
    inv = torch.where(evals > cutoff, 1.0 / torch.where(evals > cutoff, evals, 1.0), 0.0)
    return (evecs * inv[..., None, :]) @ evecs.mT


def pinv_solve(rhs: torch.Tensor, gram: torch.Tensor, *, what: str) -> torch.Tensor:
    """rhs @ gram^+ for a batch of symmetric positive semi-definite Grams, in float64.

    Args:
        rhs: [L, m, d] float64.
        gram: [L, d, d] float64, symmetric positive semi-definite.
        what: named in the warning ``spd_solve`` gives when a Cholesky factorisation fails.

    Returns:
        [L, m, d] float64. Well-conditioned entries come from the float64 Cholesky solve of
        ``spd_solve``; entries whose Cholesky failed or whose estimated condition number exceeds
        ``COND_FLAG`` are recomputed exactly from a float64 eigendecomposition (:func:`psd_pinv`),
        whatever ``spd_solve``'s own fallback (and warning) gave for them.
    """
    batch, m, d = rhs.shape
    if batch == 0 or m == 0 or d == 0:
        return rhs.new_zeros(rhs.shape)
    generator = torch.Generator().manual_seed(_PROBE_SEED)  # CPU stream: same probes on any device
    probes = torch.randn((batch, PROBES, d), generator=generator, dtype=torch.float64).to(rhs.device)
    solved, failed = _ops.spd_solve(torch.cat([rhs, probes], dim=-2), gram, what=what, warn=False)
    # ||z K^-1|| / ||z|| * ||K||_F lies within a factor sqrt(d) of cond(K) (for random z).
    growth = solved[:, m:].norm(dim=(-2, -1)) / probes.norm(dim=(-2, -1)) * gram.norm(dim=(-2, -1))
    ill = failed.to(rhs.device) | ~(growth <= COND_FLAG)  # NaN/inf growth counts as ill
    out = solved[:, :m].contiguous()
    if ill.any():
        index = ill.nonzero().squeeze(1)
        out[index] = rhs[index] @ psd_pinv(gram[index])
    return out


def mean_merge(prepared: _ops.Prepared, scale: float, out_dtype: torch.dtype | None) -> torch.Tensor:
    """theta_0 + scale * mean_t tau_t, accumulated in float32 (one fused pass)."""
    k = len(prepared.finetuned)
    return _ops.fused_merge(prepared, weights=[1.0] * k, scale=scale, reduce="mean", out_dtype=out_dtype)


def check_batched(base: torch.Tensor, finetuned: Sequence[torch.Tensor], op: str) -> _ops.Prepared:
    """Validated inputs of a batched matrix method: base [L, m, n], finetuned of base's shape."""
    p = _ops.prepare(base, finetuned, op)
    if p.base.ndim != 3:
        raise ValueError(f"{op}: base must have shape [L, m, n], got {tuple(base.shape)}")
    return p


# ----------------------------------------------------------------------------------------------
def _unit_task_vectors(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_t = tau_t / ||tau_t||_F, ||tau_t||_F) for taus [T, L, m, n] float64; u_t = 0 where
    tau_t = 0 (w_t = 0)."""
    norms = taus.flatten(2).norm(dim=-1)  # [T, L]
    units = taus / torch.where(norms > 0, norms, 1.0)[..., None, None]
    return units, norms


def _closed_form(taus: torch.Tensor) -> torch.Tensor:
    """The minimiser closest to tau_0 for taus [T, L, m, n] float32; float64 [L, m, n]."""
    taus = taus.double()
    num_tasks, batch, m, n = taus.shape
    units, norms = _unit_task_vectors(taus)
    tau0 = taus.sum(0)
    if num_tasks * m >= n:  # primal: R is n x n
        gram = torch.zeros((batch, n, n), dtype=torch.float64, device=taus.device)
        rhs = torch.zeros_like(tau0)
        for t in range(num_tasks):
            gram_t = _ops.sym_gram(units[t])  # u_t^T u_t = w_t G_t
            gram += gram_t
            others = taus[t] - tau0
            # (tau_t - tau_0) u_t^T u_t, through the smaller intermediate
            rhs += others @ gram_t if m >= n else (others @ units[t].mT) @ units[t]
        # Entries where every task vector is zero: R = 0 and tau* = tau_0 = 0; any invertible R does.
        empty = norms.sum(0) == 0
        gram[empty] = torch.eye(n, dtype=torch.float64, device=gram.device)
        return tau0 + pinv_solve(rhs, gram, what="wudi")
    # dual: K = S S^T with S = [u_1; ...; u_T] stacked by rows, (T m) x (T m)
    stacked = units.permute(1, 0, 2, 3).reshape(batch, num_tasks * m, n)
    gram = _ops.sym_gram(stacked.mT)
    blocks = gram.view(batch, num_tasks, m, num_tasks, m)
    # rhs block t = (tau_t - tau_0) u_t^T = -sum_{s != t} ||tau_s|| u_s u_t^T
    coeff = -norms.T[:, :, None] * (1.0 - torch.eye(num_tasks, dtype=torch.float64, device=gram.device))
    rhs = torch.einsum("lst,lsitj->litj", coeff, blocks).reshape(batch, m, num_tasks * m)
    # A zero task has zero rows and columns in K; a unit diagonal block decouples it (its rhs
    # block and its rows of S are zero, so it contributes nothing).
    zero = (norms.T == 0)[:, :, None, None] * torch.eye(m, dtype=torch.float64, device=gram.device)
    blocks.diagonal(dim1=1, dim2=3).add_(zero.permute(0, 2, 3, 1))
    return tau0 + pinv_solve(rhs, gram, what="wudi") @ stacked


def _loss_terms(
    tau: torch.Tensor, taus: torch.Tensor, weights: torch.Tensor, grams: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_t w_t ||(tau - tau_t) tau_t^T||_F^2 per batch entry, in tau's dtype (autograd-friendly).
    taus [T, L, m, n], weights [T, L]; for out > in the n x n Grams G_t = tau_t^T tau_t ([T, L, n, n],
    computed here unless given) carry the product: ||D tau_t^T||^2 = <D G_t, D>."""
    m, n = tau.shape[-2:]
    if m > n and grams is None:
        grams = taus.mT @ taus
    total = tau.new_zeros(tau.shape[0])
    for t in range(taus.shape[0]):
        diff = tau - taus[t]
        if m <= n:
            sq = (diff @ taus[t].mT).square().sum((-2, -1))
        else:
            sq = ((diff @ grams[t]) * diff).sum((-2, -1))
        total = total + weights[t] * sq
    return total


def _task_weights(taus: torch.Tensor) -> torch.Tensor:
    """w_t = 1 / ||tau_t||_F^2 ([T, L], taus' dtype), 0 for a zero task vector."""
    sq = taus.double().flatten(2).square().sum(-1)
    return torch.where(sq > 0, 1.0 / torch.where(sq > 0, sq, 1.0), 0.0).to(taus.dtype)


def wudi_loss(merged_tau: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """The WUDI loss of merged task vectors [L, m, n] given task vectors [T, L, m, n], in float64
    ([L])."""
    taus = taus.double()
    return _loss_terms(merged_tau.double(), taus, _task_weights(taus))


def _adam(taus: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """The iterative reference: torch.optim.Adam on L in float32 from tau_0 = sum_t tau_t, every
    batch entry at once (the entries' losses are summed; Adam acts per element, so each entry
    follows its own trajectory)."""
    weights = _task_weights(taus)
    m, n = taus.shape[-2:]
    grams = taus.mT @ taus if m > n else None  # constant: formed once, not at every step
    tau = taus.sum(0).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([tau], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            _loss_terms(tau, taus, weights, grams).sum().backward()
            optimiser.step()
    return tau.detach()


@full_float32
def wudi_batched(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    solver: str = "closed_form",
    lr: float = 1e-5,
    steps: int = 300,
    return_loss: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """WUDI on a batch of same-shape 2-D tensors.

    Args:
        base: theta_0, [L, m, n] (L layers of out x in weights).
        finetuned: theta_1..theta_T, each [L, m, n].
        scale: lambda in theta_0 + lambda * tau* (default 1.0).
        solver: ``"closed_form"`` (default: the exact minimiser closest to sum_t tau_t, see the
            module docstring) or ``"adam"`` (the paper's iterative reference: torch.optim.Adam in
            float32 from tau_0 = sum_t tau_t).
        lr: Adam's learning rate (default 1e-5, the paper's); ignored by the closed form.
        steps: Adam steps (default 300; the paper uses 300-400); ignored by the closed form.
        return_loss: also return the loss each layer reaches: float64 [L], evaluated in float64 at
            the solver's merged task vector rounded to float32 (before scaling and before rounding
            to the output dtype).
        out_dtype: dtype of the result (default: base's dtype).

    Returns:
        The merged [L, m, n] tensor on base's device, or (merged, loss) with ``return_loss``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"wudi: solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "adam" and (not isinstance(steps, int) or steps < 0):
        raise ValueError(f"wudi: steps must be a non-negative int, got {steps!r}")
    p = check_batched(base, finetuned, "wudi_batched")
    base32 = p.base.float()
    taus = torch.stack([x.float() - base32 for x in p.finetuned])  # [T, L, m, n]
    if taus.numel() == 0:
        tau = torch.zeros_like(base32)
    elif solver == "closed_form":
        tau = _closed_form(taus)
    else:
        tau = _adam(taus, lr, steps)
    _, want = _ops._check_out_dtype(out_dtype, p.out_dtype)
    merged = (base32.double() + scale * tau.double()).to(want)
    if not return_loss:
        return merged
    loss = wudi_loss(tau.float(), taus) if taus.numel() else base32.new_zeros(base32.shape[0]).double()
    return merged, loss


def wudi(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    solver: str = "closed_form",
    lr: float = 1e-5,
    steps: int = 300,
    return_loss: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Merge one tensor by WUDI (see :func:`wudi_batched` for the arguments and defaults).

    2-D tensors are merged as a batch of one; any other tensor as theta_0 + scale * mean_t tau_t
    (accumulated in float32), with loss ``None`` when ``return_loss`` is set.
    """
    p = _ops.prepare(base, finetuned, "wudi")
    if p.base.ndim != 2:
        if solver not in SOLVERS:
            raise ValueError(f"wudi: solver must be one of {SOLVERS}, got {solver!r}")
        merged = mean_merge(p, scale, out_dtype)
        return (merged, None) if return_loss else merged
    result = wudi_batched(
        base[None],
        [x[None] for x in finetuned],
        scale=scale,
        solver=solver,
        lr=lr,
        steps=steps,
        return_loss=return_loss,
        out_dtype=out_dtype,
    )
    if return_loss:
        return result[0][0], result[1]
    return result[0]
