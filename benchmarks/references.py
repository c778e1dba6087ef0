"""Plain-torch reference merges, written the way common merging toolkits compute them.

They are the baselines of the benchmarks: every one materialises the task vectors in float32 and
uses stock ATen ops (``kthvalue``, ``argsort``, ``bernoulli``), so their cost is what a user pays
without fused kernels. All take ``base`` and a list of fine-tuned tensors of base's shape and
return the merged tensor in base's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MERGE_MODES = ("mean", "sum")


def _check_merge(merge: str) -> None:
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")


def _task_vectors(base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """The K x N float32 matrix of flattened task vectors tau_t = theta_t - theta_0."""
    flat = base.float().reshape(-1)
    return torch.stack([ft.float().reshape(-1) - flat for ft in finetuned])


def _finish(base: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """base + merged task vector (flat float32), back in base's shape and dtype."""
    return (base.float().reshape(-1) + merged).reshape(base.shape).to(base.dtype)


def _elect_and_merge(tv: torch.Tensor, mask: torch.Tensor, merge: str) -> torch.Tensor:
    """TIES sign election (sign of the sum of the trimmed vectors, 0 elects +) and the disjoint
    merge over the kept entries that are non-zero and agree with the elected sign."""
    trimmed = tv * mask
    sign = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0)
    agree = trimmed * sign > 0
    selected = trimmed * agree
    total = selected.sum(dim=0)
    if merge == "sum":
        return total
    return total / agree.sum(dim=0).clamp(min=1)


def ta_torch(base: torch.Tensor, finetuned: Sequence[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """Task arithmetic: base + scale * sum_t (ft_t - base), in float32, cast back."""
    flat = base.float()
    total = torch.zeros_like(flat)
    for ft in finetuned:
        total += ft.float() - flat
    return (flat + scale * total).to(base.dtype)


def ties_kthvalue(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], density: float, merge: str = "mean"
) -> torch.Tensor:
    """TIES as FusionBench (and the TIES authors' code) computes it.

    The task vectors are stacked into a K x N float32 matrix; per row, the threshold is
    ``kthvalue`` of |tau| at index N - int(N * density) (clamped to >= 1) and entries with
    |tau| >= it are kept. That index keeps int(N * density) + 1 entries, plus any ties.
    """
    _check_merge(merge)
    tv = _task_vectors(base, finetuned)
    n = tv.shape[1]
    index = max(1, n - int(n * density))
    mags = tv.abs()
    kth = mags.kthvalue(index, dim=1, keepdim=True).values
    return _finish(base, _elect_and_merge(tv, mags >= kth, merge))


def ties_argsort(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], density: float, merge: str = "mean"
) -> torch.Tensor:
    """TIES as mergekit computes it: per task vector, the indices of the k = int(density * N)
    largest |tau| from a full descending ``argsort`` form the keep mask (exactly k entries; ties
    at the cut are broken by the sort), then the same election and disjoint merge."""
    _check_merge(merge)
    tv = _task_vectors(base, finetuned)
    n = tv.shape[1]
    k = max(1, int(density * n))
    mask = torch.zeros(tv.shape, dtype=torch.bool, device=tv.device)
    for t in range(tv.shape[0]):
        top = torch.argsort(tv[t].abs(), descending=True)[:k]
        mask[t, top] = True
    return _finish(base, _elect_and_merge(tv, mask, merge))


def dare_bernoulli(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    drop: float,
    merge: str = "sum",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE with ``torch.bernoulli`` masks: each entry of each tau_t is kept with probability
    1 - drop and rescaled by 1 / (1 - drop); the rescaled vectors are summed (or averaged)."""
    _check_merge(merge)
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    flat = base.float()
    total = torch.zeros_like(flat)
    keep = 1.0 - drop
    for ft in finetuned:
        tau = ft.float() - flat
        mask = torch.bernoulli(torch.full_like(tau, keep), generator=generator)
        total += tau * mask / keep
    if merge == "mean":
        total /= len(finetuned)
    return (flat + total).to(base.dtype)
