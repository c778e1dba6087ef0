"""Model Breadcrumbs (Davari & Belilovsky 2024): per tensor and task, drop the largest-|tau|
fraction gamma and the smallest entries, keeping a band of `density` of the entries; then task
arithmetic (optionally with TIES sign election)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _ops
from ..selection import ThresholdPrepass, kth_largest_abs
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
    thresholds: torch.Tensor | None = None,
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
        thresholds: the band's [2, K] (lower, upper) |tau| cuts computed elsewhere (the checkpoint
            engine's chunked pre-pass); overrides density and gamma.
    """
    p = _ops.prepare(base, finetuned, "breadcrumbs")
    k, n = len(p.finetuned), p.base.numel()
    reduce_args = reduction(
        k, weights=weights, scale=scale, consensus=consensus, merge=merge, weighted_election=weighted_election
    )
    if thresholds is None:
        lo, hi = kth_largest_abs(p.base, p.finetuned, band_ranks(k, n, density, gamma))
        thresholds = threshold_pair(lo, hi)
    elif tuple(thresholds.shape) != (2, k):
        raise ValueError(
            f"breadcrumbs: thresholds must be [2, {k}] (lower, upper), got {list(thresholds.shape)}"
        )
    return _ops.fused_merge(
        p,
        **reduce_args,
        sparsify="band",
        thresholds=thresholds.to(p.base.device, torch.float32),
        out_dtype=out_dtype,
    )


def band_ranks(
    num_tasks: int, numel: int, density: float | Sequence[float], gamma: float | Sequence[float]
) -> list[list[int]]:
    """The two rank queries of the band: [lower cut ranks, upper cut ranks] (1-based, 0 = none)."""
    densities = _ops.per_task(density, num_tasks, "density")
    gammas = _ops.per_task(gamma, num_tasks, "gamma")
    upper, lower = [], []
    for t, (d, g) in enumerate(zip(densities, gammas, strict=True)):
        if not (0.0 < d <= 1.0 and 0.0 <= g < 1.0 and d + g <= 1.0 + 1e-12):
            raise ValueError(
                f"breadcrumbs: need 0 < density <= 1, 0 <= gamma < 1 and density + gamma <= 1; "
                f"got density={d}, gamma={g} for model {t}"
            )
        top = math.floor(g * numel)
        upper.append(top)
        lower.append(min(numel, top + math.floor(d * numel)))
    return [lower, upper]


def breadcrumbs_prepass(num_tasks: int, numel: int, params: dict, device: torch.device):
    """The band's cuts of a tensor merged in chunks."""
    if params.get("thresholds") is not None:
        return None
    queries = band_ranks(num_tasks, numel, params.get("density", 0.9), params.get("gamma", 0.01))
    return ThresholdPrepass(num_tasks, queries, device, lambda found: {"thresholds": threshold_pair(*found)})
