"""Arcee Fusion (mergekit's ``arcee_fusion``): take the other model's values where they matter most.

For the base a and the other model b, the importance of each entry is |b − a| times the KL
divergence KL(softmax(b) || softmax(a)) of its row (softmax over the last dimension, with 1e-8 added
to both distributions); an entry is taken from b where its importance is at least
median + 1.5 (q3 − q1), the quartiles of the importances, and from a elsewhere:

    merged = a + (b − a) [importance ≥ threshold].

Quantiles are read as the ⌊q (n − 1)⌋-th smallest importance over all n entries; mergekit does the
same on a random sample of 10⁶ entries when a tensor has more, so on such tensors the two thresholds
differ by that sampling (ours is exact and deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|b − a| · KL(softmax(b) || softmax(a)) per row (float32)."""
    a, b = base.float(), other.float()
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (b - a).abs() * kl


def arcee_fusion(base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """Arcee Fusion of one tensor towards the one fine-tuned tensor; base's dtype."""
    if len(finetuned) != 1:
        raise ValueError(f"arcee_fusion takes the base and exactly one other model, got {len(finetuned)}")
    importance = fusion_importance(base, finetuned[0])
    flat = importance.reshape(-1)
    n = flat.numel()
    q1, median, q3 = (torch.kthvalue(flat, int(q * (n - 1)) + 1).values for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    a, b = base.float(), finetuned[0].float()
    return (a + (b - a) * (importance >= threshold)).to(base.dtype)


__all__ = ["arcee_fusion", "fusion_importance"]
