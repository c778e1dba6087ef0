"""SCE (Select, Calculate, Erase; Wan et al. 2024, mergekit's ``sce``).

With task vectors τ_k = θ_k − θ_0:

1. select: with ``select_topk`` < 1, keep only the ⌊select_topk · m⌋ entries of largest variance
   across the models (population variance per element; m = the entries whose variance is not 0),
   zeroing the others in every τ_k;
2. calculate: weights w_k = mean(τ_k²) over the tensor, normalised to sum 1 (equal weights when they
   sum to less than 1e-6);
3. erase: per element, the majority sign is the sign of Σ_k τ_k (≥ 0: +); entries of another sign
   (or 0) are dropped;

    merged = θ_0 + Σ_k w_k τ_k [sign agrees] / max(Σ_k w_k [sign agrees], 1e-6).

Among entries tied at the selection threshold, the lowest indices are kept (mergekit's top-k
leaves the choice to ``torch.topk``).

Nothing larger than K pieces of 2^20 elements is formed: :class:`SceSelection` reads the tensor in
index order (whole, or every row chunk when the engine streams it) to find the k-th largest
variance exactly (two radix passes, :class:`mergekernels.selection.ValueSelect`, over the variances
of the fused ``element_variance`` kernel), then the index that cuts its ties and each model's kept
energy; the merge then reads it once more.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .. import _ops
from ..selection import ValueSelect

_PIECE = 1 << 20


def _pieces(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor]
) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
    """(start, θ_0, [θ_k]) over flat pieces of 2^20 elements, as stored."""
    b = base.reshape(-1)
    fts = [x.reshape(-1) for x in finetuned]
    for start in range(0, b.numel(), _PIECE):
        yield start, b[start : start + _PIECE], [x[start : start + _PIECE] for x in fts]


def _task_vectors(base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """θ_0 and the [K, m] task vectors, in float32 (float64 for float64 inputs)."""
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(work)
    return b, torch.stack([x.to(work) - b for x in finetuned])


def _variance(base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """Population variance of the task vectors per element, float32 (what the selection ranks): the
    fused kernel (torch.var's float64 Welford order, the same bits); float64 inputs through torch.var
    itself, rounded."""
    if base.dtype == torch.float64:
        return _task_vectors(base, finetuned)[1].var(dim=0, unbiased=False).float()
    return _ops.element_variance(base, finetuned)


def _selected(variance: torch.Tensor, kth: float, cut: int, offset: int) -> torch.Tensor:
    """Entries of a piece starting at global index ``offset`` whose variance is above the k-th
    largest, or equal to it with an index below ``cut``."""
    threshold = torch.tensor(kth, dtype=variance.dtype, device=variance.device)
    if cut <= offset:  # no tie of this piece is kept
        return variance > threshold
    if cut >= offset + variance.numel():  # every tie of this piece is kept
        return variance >= threshold
    index = torch.arange(offset, offset + variance.numel(), device=variance.device)
    return (variance > threshold) | ((variance == threshold) & (index < cut))


class SceSelection:
    """SCE's passes over one tensor before its merge, fed in index order (``update``): with
    ``select_topk`` < 1, pass 0 counts the variances, pass 1 finds the k-th largest, pass 2 the index
    that cuts its ties and the kept energies; otherwise one pass sums the energies. ``params()`` is
    what :func:`sce` takes for a row chunk of the tensor."""

    def __init__(self, num_tasks: int, numel: int, select_topk: float, device: torch.device | str = "cpu"):
        self.numel, self.topk = numel, float(select_topk)
        self.passes = 3 if self.topk < 1 else 1
        self.select = ValueSelect(device)
        self.nonzero = 0
        self.kth: float | None = None  # None: nothing selected
        self.quota = 0  # ties at the k-th value still to keep, lowest index first
        self.cut = 0  # ties with a global index below this are kept
        self.energies = torch.zeros(num_tasks, dtype=torch.float64)

    def update(self, index: int, base, finetuned, element_offset: int) -> None:
        for start, b, fts in _pieces(base, finetuned):
            if self.passes == 1:
                taus = _task_vectors(b, fts)[1]
                self.energies += (taus * taus).sum(dim=1, dtype=torch.float64).cpu()
                continue
            if index == 1 and self.kth is None:
                continue
            variance = _variance(b, fts)
            if index == 0:
                self.select.count(variance)
                self.nonzero += int(torch.count_nonzero(variance))
            elif index == 1:
                self.select.refine(variance)
            elif self.kth is not None:
                self._walk_ties(variance, element_offset + start)
                keep = _selected(variance, self.kth, self.cut, element_offset + start)
                kept = _task_vectors(b, fts)[1] * keep
                self.energies += (kept * kept).sum(dim=1, dtype=torch.float64).cpu()

    def _walk_ties(self, variance: torch.Tensor, offset: int) -> None:
        """Moves the tie cut past the ties of this piece that are still within the quota (pass 2,
        pieces in index order)."""
        if self.quota <= 0:
            return
        tied = (variance == torch.tensor(self.kth, dtype=variance.dtype)).nonzero().squeeze(1)
        taken = tied[: self.quota]
        if taken.numel():
            self.cut = offset + int(taken[-1]) + 1
        self.quota -= int(taken.numel())

    def end_pass(self, index: int) -> None:
        if self.passes == 1:
            return
        if index == 0:
            k = int(self.nonzero * self.topk)
            if k > 0:
                self.select.set_ranks([k])
                self.kth = 0.0  # a placeholder until pass 1 ends
        elif index == 1 and self.kth is not None:
            value, within, _ = self.select.results()[0]
            self.kth, self.quota = value, within

    def params(self) -> dict:
        return {"selection": (self.kth, self.cut), "energies": self.energies, "numel": self.numel}


def sce_prepass(num_tasks: int, numel: int, params: dict, device: torch.device):
    if params.get("energies") is not None or float(params.get("select_topk", 1.0)) <= 0:
        return None
    return SceSelection(num_tasks, numel, params.get("select_topk", 1.0), device)


def sce(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    select_topk: float = 1.0,
    selection: tuple[float | None, int] | None = None,
    energies: torch.Tensor | None = None,
    element_offset: int = 0,
    numel: int | None = None,
) -> torch.Tensor:
    """SCE of one tensor; base's dtype.

    ``selection`` (the k-th largest variance, or None for none, and the tie cut), ``energies`` (Σ τ_k²
    over the kept entries), ``numel`` and ``element_offset`` describe the whole tensor when this call
    merges one row chunk of it (the engine's pre-pass, :class:`SceSelection`); computed here by
    default."""
    if not finetuned or select_topk <= 0:
        return base.clone()
    if energies is None:
        prepass = SceSelection(len(finetuned), base.numel(), select_topk, base.device)
        for index in range(prepass.passes):
            prepass.update(index, base, finetuned, 0)
            prepass.end_pass(index)
        params = prepass.params()
        selection, energies, element_offset, numel = params["selection"], params["energies"], 0, None
    weights = energies / (numel or base.numel())
    total = float(weights.sum())
    weights = torch.full_like(weights, 1 / len(finetuned)) if abs(total) < 1e-6 else weights / total
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    flat = out.reshape(-1)
    for start, b_raw, fts in _pieces(base, finetuned):
        b, taus = _task_vectors(b_raw, fts)
        if select_topk < 1:
            kth, cut = selection
            if kth is None:
                taus = torch.zeros_like(taus)
            else:
                taus = taus * _selected(_variance(b_raw, fts), kth, cut, element_offset + start)
        w = weights.to(taus.dtype).to(taus.device)[:, None]
        majority = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0).to(taus.dtype)
        kept = w * (torch.sign(taus) == majority)
        merged = (taus * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
        flat[start : start + b.numel()] = (b + merged).to(base.dtype)
    return out


__all__ = ["SceSelection", "sce", "sce_prepass"]
