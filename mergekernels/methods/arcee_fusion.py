"""Arcee Fusion (mergekit's ``arcee_fusion``): take the other model's values where they matter most.

For the base a and the other model b, the importance of each entry is |b − a| times the KL
divergence KL(softmax(b) || softmax(a)) of its row (softmax over the last dimension, with 1e-8 added
to both distributions); an entry is taken from b where its importance is at least
median + 1.5 (q3 − q1), the quartiles of the importances, and from a elsewhere:

    merged = a + (b − a) [importance ≥ threshold].

Quantiles are read as the ⌊q (n − 1)⌋-th smallest importance over all n entries; mergekit does the
same on a random sample of 10⁶ entries when a tensor has more, so on such tensors the two thresholds
differ by that sampling (ours is exact and deterministic).

The importances are formed a block of whole rows at a time (about 2^20 entries):
:class:`FusionThreshold` selects the three quartiles exactly in two radix passes
(:class:`mergekernels.selection.ValueSelect`), then the merge reads the tensor once more. A whole
tensor keeps its float32 importances between the passes; when the engine streams a large tensor in
row chunks, each pass forms them again, so memory stays bounded by the chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..selection import ValueSelect

QUARTILES = (0.25, 0.5, 0.75)
_PIECE = 1 << 20


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|b − a| · KL(softmax(b) || softmax(a)) per row (float32)."""
    a, b = base.float(), other.float()
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (b - a).abs() * kl


def _row_blocks(
    base: torch.Tensor, other: torch.Tensor
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(rows, a, b) over blocks of whole rows (vectors along the last dimension) of about 2^20 entries;
    a 0-d or 1-D tensor is one row."""
    row_len = base.shape[-1] if base.dim() else 1
    a = base.reshape(-1, row_len)
    b = other.reshape(-1, row_len)
    step = max(1, _PIECE // max(row_len, 1))
    for r0 in range(0, a.shape[0], step):
        rows = slice(r0, r0 + step)
        yield rows, a[rows], b[rows]


class FusionThreshold:
    """The importance threshold median + 1.5 (q3 − q1) of one tensor, from two passes over it (whole,
    or its row chunks in any order): ``params()`` is what :func:`arcee_fusion` takes for a chunk."""

    passes = 2

    def __init__(self, numel: int, device: torch.device | str = "cpu"):
        self.numel = numel
        self.select = ValueSelect(device)
        self.threshold: float | None = None

    def update(self, index: int, base: torch.Tensor, finetuned: Sequence[torch.Tensor], element_offset: int):
        for _, a, b in _row_blocks(base, finetuned[0]):
            self.feed(index, fusion_importance(a, b))

    def feed(self, index: int, importance: torch.Tensor) -> None:
        """Pass ``index`` over some of the tensor's importances."""
        if index == 0:
            self.select.count(importance)
        else:
            self.select.refine(importance)

    def end_pass(self, index: int) -> None:
        if index == 0:  # the k-th smallest is the (n - k + 1)-th largest
            self.select.set_ranks([self.numel - int(q * (self.numel - 1)) for q in QUARTILES])
            return
        q1, median, q3 = (torch.tensor(v, dtype=torch.float32) for v, _, _ in self.select.results())
        self.threshold = float(median + 1.5 * (q3 - q1))

    def params(self) -> dict:
        return {"threshold": self.threshold}


def fusion_prepass(num_tasks: int, numel: int, params: dict, device: torch.device):
    if params.get("threshold") is not None or num_tasks != 1 or numel == 0:
        return None
    return FusionThreshold(numel, device)


def arcee_fusion(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], threshold: float | None = None
) -> torch.Tensor:
    """Arcee Fusion of one tensor towards the one fine-tuned tensor; base's dtype. ``threshold``: the
    whole tensor's importance threshold when this call merges one row chunk of it (the engine's
    pre-pass); computed here by default."""
    if len(finetuned) != 1:
        raise ValueError(f"arcee_fusion takes the base and exactly one other model, got {len(finetuned)}")
    other = finetuned[0]
    if other.shape != base.shape:
        raise ValueError(f"arcee_fusion: shapes differ, base {list(base.shape)} and {list(other.shape)}")
    if base.numel() == 0:
        return base.clone()
    importance = None
    if threshold is None:  # the whole tensor here: its importances are formed once and kept (float32)
        importance = torch.cat([fusion_importance(a, b) for _, a, b in _row_blocks(base, other)])
        finder = FusionThreshold(base.numel(), base.device)
        for index in range(finder.passes):
            for piece in importance.reshape(-1).split(_PIECE):
                finder.feed(index, piece)
            finder.end_pass(index)
        threshold = finder.threshold
    limit = torch.tensor(threshold, dtype=torch.float32)
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    rows_out = out.reshape(-1, base.shape[-1] if base.dim() else 1)
    for rows, a, b in _row_blocks(base, other):
        block = fusion_importance(a, b) if importance is None else importance[rows]
        af, bf = a.float(), b.float()
        rows_out[rows] = (af + (bf - af) * (block >= limit)).to(base.dtype)
    return out


__all__ = ["FusionThreshold", "arcee_fusion", "fusion_importance", "fusion_prepass"]
