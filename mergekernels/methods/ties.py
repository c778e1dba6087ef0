"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

The trim threshold is the exact k-th largest |tau_t| (k = max(1, floor(density * n))) from the
radix selection of :mod:`mergekernels.selection`; entries >= it are kept. Election and the
disjoint merge run in one fused pass over the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _ops
from ..selection import (
    NO_CUT,
    ThresholdPrepass,
    TieLocator,
    kth_largest_abs,
    magnitude_threshold,
    rank_for_density,
)

MERGE_MODES = ("mean", "sum", "weighted")


def _check_merge(merge: str) -> str:
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
    return merge


def reduction(
    k: int,
    *,
    weights: float | Sequence[float] | None,
    scale: float,
    consensus: str | None,
    merge: str | None,
    weighted_election: bool,
) -> dict:
    """Validated reduction arguments of the fused merge for the methods that may add TIES
    consensus (DARE, Breadcrumbs, DELLA): ``merge`` defaults to ``"sum"`` without consensus and
    ``"mean"`` with it."""
    if consensus not in (None, "ties"):
        raise ValueError(f"consensus must be None or 'ties', got {consensus!r}")
    return {
        "weights": _ops.per_task(weights, k, "weights", 1.0),
        "scale": scale,
        "reduce": _check_merge(merge or ("mean" if consensus else "sum")),
        "ties": consensus == "ties",
        "weighted_election": weighted_election,
    }


def threshold_pair(lo: torch.Tensor, hi: torch.Tensor | None = None) -> torch.Tensor:
    """[2, K] float32 thresholds for the kernels: keep lo <= |tau| < hi (hi = +inf: no upper cut)."""
    lo = lo.to(torch.float32)
    hi = torch.full_like(lo, math.inf) if hi is None else hi.to(torch.float32)
    return torch.stack([lo, hi]).contiguous()


def ties(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    density: float | Sequence[float] = 0.2,
    weights: float | Sequence[float] | None = None,
    scale: float = 1.0,
    merge: str = "mean",
    weighted_election: bool = False,
    thresholds: torch.Tensor | None = None,
    exact_k: bool = False,
    tie_cuts: Sequence[int] | None = None,
    element_offset: int = 0,
    out_dtype: torch.dtype | None = None,
    nonfinite: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one tensor by TIES.

    Args:
        density: fraction of entries of each tau_t kept (per model if a list), in (0, 1].
        weights: per-model weights w_t (default 1).
        scale: lambda applied to the merged task vector.
        merge: ``"mean"`` (paper: disjoint mean of the agreeing entries), ``"sum"`` (FusionBench's
            default) or ``"weighted"`` (mergekit's ``normalize``: sum of w*tau / sum of w over the
            agreeing entries).
        weighted_election: elect the sign of sum_t w_t * trimmed tau_t (mergekit) rather than of
            sum_t trimmed tau_t (paper). An election sum of exactly 0 elects +.
        thresholds: per-task trim thresholds ([K] float32) computed elsewhere, e.g. a model-wide
            threshold from :class:`mergekernels.selection.MagnitudeThreshold`; overrides density.
        exact_k: keep exactly k entries per task (mergekit's count): among the entries equal to the
            threshold, the lowest indices first, as a stable descending sort would; by default every
            entry tied with the threshold is kept.
        tie_cuts: exact-k cuts computed elsewhere (the engine's chunked pre-pass), with thresholds.
        element_offset: the global index of this tensor's first element (a row chunk's), which the
            tie cuts refer to.
        out_dtype: dtype of the result (default: base's dtype).
        nonfinite: int32 [K + 1] flags set to 1 for each input (base first) that holds a NaN or an
            Inf, from the merge pass itself (see :func:`mergekernels._ops.fused_merge`).
        out: a contiguous tensor of base's shape to write the result into (its dtype is the
            output dtype); returned.
    """
    _check_merge(merge)
    p = _ops.prepare(base, finetuned, "ties")
    k = len(p.finetuned)
    w = _ops.per_task(weights, k, "weights", 1.0)
    if thresholds is None and exact_k:
        ranks = [rank_for_density(d, p.base.numel()) for d in _ops.per_task(density, k, "density")]
        found = kth_largest_abs(p.base, p.finetuned, [ranks], ties=True)[0]
        locator = TieLocator(trim_requests(found))
        locator.update(p.base, p.finetuned, 0)
        thresholds, tie_cuts = found[0], trim_cuts(found, locator.cuts())
    elif thresholds is None:
        thresholds = magnitude_threshold(p.base, p.finetuned, density)
    elif thresholds.numel() != k:
        raise ValueError(f"ties: thresholds has {thresholds.numel()} entries for {k} fine-tuned tensors")
    thr = threshold_pair(thresholds.to(p.base.device).reshape(k))
    return _ops.fused_merge(
        p,
        weights=w,
        scale=scale,
        reduce=merge,
        ties=True,
        weighted_election=weighted_election,
        sparsify="trim",
        thresholds=thr,
        tie_cuts=tie_cuts or (),
        element_offset=element_offset,
        out_dtype=out_dtype,
        nonfinite=nonfinite,
        out=out,
    )


def trim_requests(found) -> list[list[tuple[float, int]]]:
    """Exact k for TIES: per task, locate the q-th entry equal to the threshold (q: the ties within
    the top k), unless every tie is kept. ``found``: (values, within, equal) of the threshold."""
    values, within, equal = (x.tolist() for x in found)
    return [[(v, int(q))] if q < e else [] for v, q, e in zip(values, within, equal, strict=True)]


def trim_cuts(found, cuts: list[list[int]]) -> list[int]:
    """The fused merge's tie_cuts for trim: keep ties with index < cut (NO_CUT: all); no upper."""
    lower = [c[0] if c else NO_CUT for c in cuts]
    return lower + [0] * len(lower)


def ties_prepass(num_tasks: int, numel: int, params: dict, device: torch.device, *, all_reduce=None):
    """The threshold of a tensor merged in chunks, or (numel of the whole model, with ``all_reduce``
    summing counts over torch.distributed ranks) the model-wide one; ``None`` when the caller already
    holds thresholds."""
    if params.get("thresholds") is not None:
        return None
    densities = _ops.per_task(params.get("density", 0.2), num_tasks, "density")
    ranks = [rank_for_density(d, numel) for d in densities]
    if params.get("exact_k") and all_reduce is None:  # exact k per tensor: one more pass, for the ties
        return ThresholdPrepass(
            num_tasks,
            [ranks],
            device,
            lambda found, cuts: {"thresholds": found[0][0], "tie_cuts": trim_cuts(found[0], cuts)},
            tie_requests=lambda found: trim_requests(found[0]),
        )
    return ThresholdPrepass(
        num_tasks, [ranks], device, lambda found: {"thresholds": found[0]}, all_reduce=all_reduce
    )
