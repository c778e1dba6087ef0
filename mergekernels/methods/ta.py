"""Task arithmetic (Ilharco et al. 2023): theta_0 + lambda * sum_t w_t tau_t, in one fused pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ops


def task_arithmetic(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    weights: float | Sequence[float] | None = None,
    scale: float = 1.0,
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
    nonfinite: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one tensor by task arithmetic.

    Args:
        base: theta_0.
        finetuned: theta_1..theta_K, each of base's shape.
        weights: per-model weights w_t (default 1).
        scale: lambda (mergekit's default 1.0; FusionBench uses 0.3).
        normalize: divide by sum_t w_t (mergekit's ``linear`` / ``normalize: true``).
        out_dtype: dtype of the result (default: base's dtype).
        nonfinite: int32 [K + 1] flags set to 1 for each input (base first) that holds a NaN or an
            Inf, from the merge pass itself (see :func:`mergekernels._ops.fused_merge`).
        out: a contiguous tensor of base's shape to write the result into (its dtype is the
            output dtype); returned.

    Returns:
        The merged tensor on base's device.
    """
    p = _ops.prepare(base, finetuned, "task_arithmetic")
    w = _ops.per_task(weights, len(p.finetuned), "weights", 1.0)
    return _ops.fused_merge(
        p,
        weights=w,
        scale=scale,
        reduce="weighted" if normalize else "sum",
        out_dtype=out_dtype,
        nonfinite=nonfinite,
        out=out,
    )


def weighted_sum(
    points: Sequence[torch.Tensor], coefficients: Sequence[float], like: torch.Tensor
) -> torch.Tensor:
    """sum_k c_k x_k of whole tensors (no base: the methods whose result is a combination of the
    models themselves) in one fused pass: c_0 x_0 + (c_1 x_1 + c_2 x_2 + ...) in float32, each
    product rounded, rounded once more to ``like``'s dtype (float64 tensors: torch ops in float64)."""
    coefficients = [float(c) for c in coefficients]
    if len(points) != len(coefficients):
        raise ValueError(f"weighted_sum: {len(coefficients)} coefficients for {len(points)} tensors")
    if len(points) == 1 or len(points) > 1 + _ops.MAX_EXPERTS or like.dtype == torch.float64:
        work = torch.float64 if like.dtype == torch.float64 else torch.float32
        out = torch.zeros(like.shape, dtype=work, device=like.device)
        for c, x in zip(coefficients, points, strict=True):
            out.add_(x.to(work), alpha=c)
        return out.to(like.dtype)
    p = _ops.prepare(points[0], points[1:], "weighted_sum")
    return _ops.fused_merge(p, weights=coefficients[1:], base_scale=coefficients[0], out_dtype=like.dtype)
