"""mergekit's ``passthrough``: each output tensor is its one input, optionally scaled.

It is what frankenmerges and layer stacking use: slices of single models, concatenated. With
``scale`` set (per model in mergekit's configurations), the tensor is multiplied by it in float32
and rounded once to its dtype, as torch does for a 16-bit tensor times a Python number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def passthrough(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor] = (), scale: float | None = None
) -> torch.Tensor:
    """The input tensor (``base``: the slice's one source), times ``scale`` when given.

    Raises:
        ValueError: if fine-tuned tensors are given too (passthrough takes exactly one input).
    """
    if len(finetuned):
        raise ValueError(f"passthrough takes exactly one input tensor, got {1 + len(finetuned)}")
    if scale is None:
        return base.clone()
    return (base.float() * scale).to(base.dtype)
