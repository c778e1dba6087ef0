"""Spherical linear interpolation between two models, tensor by tensor (mergekit's ``slerp``).

For the base tensor v0 and the other model's v1, both flattened, with cos θ = <v0, v1> / (|v0| |v1|)
(a norm at most ``eps`` counts as 1) clamped to [-1, 1]:

    slerp(v0, v1; t) = sin((1 - t) θ) / sin θ · v0 + sin(t θ) / sin θ · v1,

and the plain interpolation (1 - t) v0 + t v1 when |cos θ| > ``dot_threshold`` (nearly collinear
or antipodal: sin θ ≈ 0). t = 0 gives the base, t = 1 the other model; in configurations t is
usually a per-layer gradient. Two fused passes: the statistics pass accumulates the norms and the
dot product in float64 (over every row chunk first, when the engine streams a tensor: ``gram``),
then one fused combine writes (c0 + c1) v0 + c1 (v1 − v0) in float32, rounded once to the base's
dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..stats import gram_matrix
from .ta import weighted_sum

DOT_THRESHOLD = 0.9995


def slerp_coefficients(
    sq_norm0: float,
    sq_norm1: float,
    dot: float,
    t: float,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = 1e-8,
) -> tuple[float, float]:
    """(c0, c1) with slerp(v0, v1; t) = c0 v0 + c1 v1, from |v0|², |v1|² and <v0, v1>."""
    n0, n1 = math.sqrt(sq_norm0), math.sqrt(sq_norm1)
    n0 = n0 if n0 > eps else 1.0
    n1 = n1 if n1 > eps else 1.0
    cos = min(1.0, max(-1.0, dot / (n0 * n1)))
    if abs(cos) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin, math.sin(t * theta) / sin


def slerp(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    t: float = 0.5,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = 1e-8,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spherical interpolation from ``base`` (t = 0) to the one fine-tuned tensor (t = 1).

    Args:
        base: v0, the base model's tensor.
        finetuned: exactly one tensor v1 of base's shape.
        t: the interpolation position (mergekit's ``t``; any real number, usually in [0, 1]).
        dot_threshold: above this |cos θ| the inputs are treated as collinear (plain interpolation).
        eps: norms at most this count as 1 (a zero tensor does not divide by zero).
        gram: the 2 x 2 Gram matrix of (base, other) over the whole tensor, when this call merges one
            row chunk of it (the engine's pre-pass); computed here by default.

    Returns:
        The interpolated tensor, in base's dtype.
    """
    if len(finetuned) != 1:
        raise ValueError(
            f"slerp interpolates between the base and exactly one other model, got {len(finetuned)}"
        )
    v1 = finetuned[0]
    if v1.shape != base.shape:
        raise ValueError(f"slerp: shapes differ, base {list(base.shape)} and {list(v1.shape)}")
    if gram is None:
        gram = gram_matrix([base, v1])
    sq0, sq1, dot = float(gram[0, 0]), float(gram[1, 1]), float(gram[0, 1])
    c0, c1 = slerp_coefficients(sq0, sq1, dot, float(t), dot_threshold, eps)
    return weighted_sum([base, v1], [c0, c1], base)


__all__ = ["DOT_THRESHOLD", "slerp", "slerp_coefficients"]
