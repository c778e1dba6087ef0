"""Float64 references for TSV-M, Iso-C and Iso-CTS, written from ../shared/specs/baselines.md.

One matrix at a time, with plain torch float64 SVDs. The task vectors are formed as the methods
form them (tau = float32(theta_t) - float32(theta_0), or in float64 when asked), everything after
that is float64. Each function returns theta_0 + alpha * merged as a float64 tensor of base's shape;
tensors that are not 2-D get theta_0 + alpha * mean_t tau_t.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import torch

F64 = torch.float64


def taus(base, finetuned, tau_dtype=torch.float32) -> list[torch.Tensor]:
    b = base.detach().cpu().to(tau_dtype)
    return [(x.detach().cpu().to(tau_dtype) - b).to(F64) for x in finetuned]


def polar(x: torch.Tensor) -> torch.Tensor:
    """P Q^T from the thin SVD x = P diag(sigma) Q^T."""
    p, _, qh = torch.linalg.svd(x.to(F64), full_matrices=False)
    return p @ qh


def _result(base, merged, alpha):
    return base.detach().cpu().to(F64) + alpha * merged


def _mean(ts):
    return sum(ts) / len(ts)


def tsv_keep(m: int, n: int, num_tasks: int) -> int:
    """k = floor(min(m, n) / T); 1 where that is 0 (the implementation's documented extension)."""
    return max(1, min(m, n) // num_tasks)


def tsv_m(base, finetuned, alpha=1.0, tau_dtype=torch.float32):
    ts = taus(base, finetuned, tau_dtype)
    if base.ndim != 2:
        return _result(base, _mean(ts), alpha)
    k = tsv_keep(*base.shape, len(ts))
    left, values, right = [], [], []
    for tau in ts:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        left.append(u[:, :k])
        values.append(s[:k])
        right.append(vh[:k].T)
    u_hat = polar(torch.cat(left, dim=1))
    v_hat = polar(torch.cat(right, dim=1))
    merged = u_hat @ torch.diag(torch.cat(values)) @ v_hat.T
    return _result(base, merged, alpha)


def iso_c(base, finetuned, alpha=1.0, tau_dtype=torch.float32):
    ts = taus(base, finetuned, tau_dtype)
    if base.ndim != 2:
        return _result(base, _mean(ts), alpha)
    u, s, vh = torch.linalg.svd(sum(ts), full_matrices=False)
    return _result(base, s.mean() * u @ vh, alpha)


def cts_split(r: int, num_tasks: int, common_fraction: float = 0.8) -> tuple[int, int]:
    """(k_c, d): k0 = floor(fraction * r) on the fraction's decimal value; d = the nearest integer
    (half to even) to (r - k0) / T, at most floor(r / T); k_c = r - T d."""
    k0 = math.floor(Decimal(str(common_fraction)) * r)
    d = min(r // num_tasks, round(Fraction(r - k0, num_tasks)))
    return r - num_tasks * d, d


def iso_cts_parts(base, finetuned, common_fraction=0.8, tau_dtype=torch.float32, side="left"):
    """The stacked (U, sigma, V) of Iso-CTS before orthogonalisation, for one 2-D tensor.

    ``side="right"`` projects tau_t (I - V_c V_c^T) instead: not the method, only for tests that
    show they can tell the two apart."""
    ts = taus(base, finetuned, tau_dtype)
    m, n = base.shape
    kc, d = cts_split(min(m, n), len(ts), common_fraction)
    u, s, vh = torch.linalg.svd(sum(ts), full_matrices=False)
    uc, vc = u[:, :kc], vh[:kc].T
    left, values, right = [uc], [s[:kc]], [vc]
    for tau in ts:
        if side == "left":
            projected = (torch.eye(m, dtype=F64) - uc @ uc.T) @ tau
        else:
            projected = tau @ (torch.eye(n, dtype=F64) - vc @ vc.T)
        ut, st, vht = torch.linalg.svd(projected, full_matrices=False)
        left.append(ut[:, :d])
        values.append(st[:d])
        right.append(vht[:d].T)
    return torch.cat(left, dim=1), torch.cat(values), torch.cat(right, dim=1)


def iso_cts(base, finetuned, alpha=1.0, common_fraction=0.8, tau_dtype=torch.float32):
    if base.ndim != 2:
        return _result(base, _mean(taus(base, finetuned, tau_dtype)), alpha)
    u, s, v = iso_cts_parts(base, finetuned, common_fraction, tau_dtype)
    merged = s.mean() * polar(u) @ polar(v).T
    return _result(base, merged, alpha)
