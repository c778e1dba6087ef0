"""Model Breadcrumbs (Davari & Belilovsky 2024): per tensor and task, drop the largest-|tau|
fraction gamma and the smallest entries, keeping a band of `density` of the entries; then task
arithmetic (optionally with TIES sign election)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _ops
from ..selection import ThresholdPrepass, TieLocator, kth_largest_abs
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
    exact_k: bool = False,
    tie_cuts: Sequence[int] | None = None,
    element_offset: int = 0,
    out_dtype: torch.dtype | None = None,
    nonfinite: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
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
        exact_k: keep exactly the band's count, cutting the entries tied with either end as a
            stable ascending sort of |tau| would (mergekit's order made stable): at the lower end
            the highest indices are kept, at the upper end the lowest.
        tie_cuts: exact-k cuts computed elsewhere (the engine's chunked pre-pass), with thresholds.
        element_offset: the global index of this tensor's first element, which tie cuts refer to.
        nonfinite: int32 [K + 1] flags set to 1 for each input (base first) that holds a NaN or an
            Inf, from the merge pass itself (see :func:`mergekernels._ops.fused_merge`).
        out: a contiguous tensor of base's shape to write the result into (its dtype is the
            output dtype); returned.
    """
    p = _ops.prepare(base, finetuned, "breadcrumbs")
    k, n = len(p.finetuned), p.base.numel()
    reduce_args = reduction(
        k, weights=weights, scale=scale, consensus=consensus, merge=merge, weighted_election=weighted_election
    )
    if thresholds is None and exact_k:
        found = kth_largest_abs(p.base, p.finetuned, band_ranks(k, n, density, gamma), ties=True)
        locator = TieLocator(band_requests(found))
        locator.update(p.base, p.finetuned, 0)
        thresholds, tie_cuts = threshold_pair(found[0][0], found[1][0]), band_cuts(found, locator.cuts())
    elif thresholds is None:
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
        tie_cuts=tie_cuts or (),
        element_offset=element_offset,
        out_dtype=out_dtype,
        nonfinite=nonfinite,
        out=out,
    )


def band_requests(found) -> list[list[tuple[float, int]]]:
    """Exact k for the band (a stable ascending sort): per task, the ties at the lower end that fall
    below the band are the first s by index; at the upper end (the smallest dropped value) the
    first (ties - dropped ones) by index are kept. Requests: (lower value, s) and (upper value,
    kept), each only when it is not 0. ``found``: the two queries' (values, within, equal)."""
    (lv, lq, le), (uv, uq, ue) = ([x.tolist() for x in q] for q in found)
    requests = []
    for t in range(len(lv)):
        skip, kept = int(le[t] - lq[t]), int(ue[t] - uq[t])
        requests.append([(lv[t], skip)] * (skip > 0) + [(uv[t], kept)] * (kept > 0 and ue[t] > 0))
    return requests


def band_cuts(found, cuts: list[list[int]]) -> list[int]:
    """The fused merge's tie_cuts for the band: ties at the lower end kept from index tie_lo on,
    ties at the upper end below index tie_hi."""
    (lv, lq, le), (uv, uq, ue) = ([x.tolist() for x in q] for q in found)
    lower, upper = [], []
    for t, task_cuts in enumerate(cuts):
        skip, kept = int(le[t] - lq[t]), int(ue[t] - uq[t])
        it = iter(task_cuts)
        lower.append(next(it) if skip > 0 else 0)
        upper.append(next(it) if kept > 0 and ue[t] > 0 else 0)
    return lower + upper


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
    if params.get("exact_k"):  # one more pass, for the ties at both ends
        return ThresholdPrepass(
            num_tasks,
            queries,
            device,
            lambda found, cuts: {
                "thresholds": threshold_pair(found[0][0], found[1][0]),
                "tie_cuts": band_cuts(found, cuts),
            },
            tie_requests=band_requests,
        )
    return ThresholdPrepass(num_tasks, queries, device, lambda found: {"thresholds": threshold_pair(*found)})
