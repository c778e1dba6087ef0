"""NuSLERP (mergekit's ``nuslerp``): spherical interpolation of two models (or of their task vectors),
over the whole tensor or per row / column.

The two inputs are the task vectors τ_1, τ_2 when a base is given (``origin``; the result is added
to θ_0), else the two models. t = w_2 / (w_1 + w_2) from the models' weights (0.5 when they sum to
~0). The vectors are the flattened tensors (``flatten``, the default), else the rows (vectors along
the last dimension) or, with ``row_wise``, the columns (along the first). For each pair of vectors
v0, v1 with cos θ = <v0, v1> / (max(|v0|, 1e-7) max(|v1|, 1e-7)) clamped to [-1, 1]:

    nuslerp = (sin((1 - t) θ) v0 + sin(t θ) v1) / sin θ,   or (1 - t) v0 + t v1 when 1 - cos² θ <= eps².

Flattened: the whole-tensor moments come from the fused statistics pass (float64; over every row
chunk first when the engine streams the tensor: ``gram``) and one fused combine writes the result.
Per row or column: float32 torch ops with float64 moments (the engine streams rows in chunks; the
column-wise version needs whole tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ops
from ..stats import gram_matrix, task_vector_stats
from .ta import task_arithmetic, weighted_sum


def _coefficients(sq0, sq1, dot, t: float, eps: float):
    """(c0, c1) per vector from |v0|², |v1|², <v0, v1> (float64 tensors)."""
    n0 = sq0.clamp_min(0).sqrt().clamp_min(1e-7)
    n1 = sq1.clamp_min(0).sqrt().clamp_min(1e-7)
    cos = (dot / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.where(colinear, 1.0, torch.sin(theta))
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    return c0, c1


def nuslerp(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: float | Sequence[float] | None = None,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
    origin: bool = True,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """NuSLERP of one tensor between two models.

    Args:
        base: θ_0 with ``origin`` (the two models are ``finetuned``), else the first model.
        finetuned: two models with ``origin``, else the second one.
        weights: the two models' weights (t = w_2 / (w_1 + w_2)); default equal.
        row_wise: without ``flatten``, interpolate columns (vectors along dimension 0) instead of rows.
        flatten: interpolate the whole tensors as single vectors (mergekit's default).
        eps: the collinearity tolerance.
        origin: whether ``base`` is the origin (mergekit: a ``base_model`` is given).
        gram: with ``flatten``, the 2 x 2 Gram matrix of the two vectors over the whole tensor, when
            this call merges one row chunk of it (the engine's pre-pass); computed here by default.
    """
    pair = list(finetuned) if origin else [base, *finetuned]
    if len(pair) != 2:
        raise ValueError(f"nuslerp interpolates between exactly two models, got {len(pair)}")
    w = _ops.per_task(weights, 2, "nuslerp weights", 1.0)
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    if flatten or base.dim() <= 1:
        if gram is None:
            gram = task_vector_stats(base, pair).gram if origin else gram_matrix(pair)
        c0, c1 = _coefficients(gram[0, 0], gram[1, 1], gram[0, 1], t, eps)
        if origin:
            return task_arithmetic(base, pair, weights=[float(c0), float(c1)])
        return weighted_sum(pair, [float(c0), float(c1)], base)
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(work)
    v0, v1 = (x.to(work) - b for x in pair) if origin else (x.to(work) for x in pair)
    dim = 0 if row_wise else -1
    sq0 = v0.double().square().sum(dim, keepdim=True)
    sq1 = v1.double().square().sum(dim, keepdim=True)
    dot = (v0.double() * v1.double()).sum(dim, keepdim=True)
    c0, c1 = _coefficients(sq0, sq1, dot, t, eps)
    out = c0.to(work) * v0 + c1.to(work) * v1
    return (b + out if origin else out).to(base.dtype)


__all__ = ["nuslerp"]
