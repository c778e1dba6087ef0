"""NearSwap (mergekit's ``nearswap``): take the other model's value where it is close to the base's.

Per element, with a the base's value and b the other model's:

    w = clamp(t / max(|a − b|, 1e-6), 0, 1),      merged = a + w (b − a),

so entries that differ by at most t become b, and larger differences move only t towards b. One fused
pass (the kernels' ``clip`` mode: a + (b − a) w in float32, rounded once); element-wise, so tensors
stream in row chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ops


def nearswap(base: torch.Tensor, finetuned: Sequence[torch.Tensor], t: float) -> torch.Tensor:
    """NearSwap of one tensor towards the one fine-tuned tensor; returns base's dtype."""
    if len(finetuned) != 1:
        raise ValueError(f"nearswap takes the base and exactly one other model, got {len(finetuned)}")
    p = _ops.prepare(base, finetuned, "nearswap")
    limit = torch.tensor([[float(t)], [0.0]], dtype=torch.float32, device=p.base.device)
    return _ops.fused_merge(p, weights=[1.0], sparsify="clip", thresholds=limit)


__all__ = ["nearswap"]
