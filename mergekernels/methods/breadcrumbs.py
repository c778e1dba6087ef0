"""Model Breadcrumbs (Davari & Belilovsky 2024): per tensor and task, drop the largest-|tau|
fraction gamma and the smallest entries, keeping a band of `density` of the entries; then task
arithmetic (optionally with TIES sign election)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _ops
from ..selection import kth_largest_abs
from .ties import reduction, threshold_pair


def breadcrumbs(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    density: float | Sequence[float] = 0.9,
    gamma: float | Sequence[float] = 0.01,
    weights: float | Sequence[float] | None = None,
    scale: float = 1.0,
    consensus: str | None = None,
    merge: str | None = None,
    weighted_election: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor by Model Breadcrumbs.

    With n entries, the floor(gamma * n) largest |tau_t| are dropped and the next
    floor(density * n) are kept (mergekit's magnitude_outliers counts). Entries tied with the
    upper cut are dropped with it; entries tied with the lower cut are kept.

    Args:
        density: fraction of entries kept (default 0.9), gamma: fraction of the largest dropped
            (default 0.01); density + gamma <= 1.
        consensus: ``None`` (task arithmetic) or ``"ties"`` (sign election + disjoint merge).
        merge: reduction, default ``"sum"`` without consensus and ``"mean"`` with it.
    """
    p = _ops.prepare(base, finetuned, "breadcrumbs")
    k, n = len(p.finetuned), p.base.numel()
    reduce_args = reduction(
        k, weights=weights, scale=scale, consensus=consensus, merge=merge, weighted_election=weighted_election
    )
    densities = _ops.per_task(density, k, "density")
    gammas = _ops.per_task(gamma, k, "gamma")
    upper, lower = [], []
    for t, (d, g) in enumerate(zip(densities, gammas, strict=True)):
        if not (0.0 < d <= 1.0 and 0.0 <= g < 1.0 and d + g <= 1.0 + 1e-12):
            raise ValueError(
                f"breadcrumbs: need 0 < density <= 1, 0 <= gamma < 1 and density + gamma <= 1; "
                f"got density={d}, gamma={g} for model {t}"
            )
        top = math.floor(g * n)
        upper.append(top)
        lower.append(min(n, top + math.floor(d * n)))
    lo, hi = kth_largest_abs(p.base, p.finetuned, [lower, upper])
    return _ops.fused_merge(
        p,
        **reduce_args,
        sparsify="band",
        thresholds=threshold_pair(lo, hi),
        out_dtype=out_dtype,
    )
