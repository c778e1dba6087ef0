"""NearSwap (mergekit's ``nearswap``): take the other model's value where it is close to the base's.

Per element, with a the base's value and b the other model's:

    w = clamp(t / max(|a − b|, 1e-6), 0, 1),      merged = a + w (b − a),

so entries that differ by at most t become b, and larger differences move only t towards b.
Element-wise: tensors stream in row chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def nearswap(base: torch.Tensor, finetuned: Sequence[torch.Tensor], t: float) -> torch.Tensor:
    """NearSwap of one tensor towards the one fine-tuned tensor; returns base's dtype."""
    if len(finetuned) != 1:
        raise ValueError(f"nearswap takes the base and exactly one other model, got {len(finetuned)}")
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b = base.to(work), finetuned[0].to(work)
    diff = b - a
    weight = (t / diff.abs().clamp_min(1e-6)).clamp(0, 1)
    return (weight * b + (1 - weight) * a).to(base.dtype)


__all__ = ["nearswap"]
