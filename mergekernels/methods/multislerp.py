"""Multi-SLERP (mergekit's ``multislerp``): a weighted mean of several models on the hypersphere.

The inputs x_k are the task vectors τ_k = θ_k − θ_0 when a base is given (``origin``), else the
models θ_k themselves. With weights w_k (normalised to sum 1 by default), norms n_k and unit vectors
u_k = x_k / (n_k + eps), the weighted mean of the unit vectors m = Σ w_k u_k is projected back onto
the sphere and given the weighted mean norm:

    merged = (Σ w_k n_k) · m / |m|   (+ θ_0 with a base).

(mergekit frames this as interpolating in the tangent space at m / |m|; the weighted tangent
vectors sum to zero there, so the exponential map returns m / |m| itself.) Everything is a linear
combination of the inputs, so it is computed from their K × K Gram matrix (float64) and one
combine: the fused task-arithmetic pass with per-model weights (a fused weighted sum without a
base). When the engine streams a tensor in row chunks, the Gram is summed over them first
(``gram``). A single input is returned as it is; |m| < eps is refused, except for two inputs, which
then mix linearly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _ops
from ..stats import gram_matrix, task_vector_stats
from .ta import task_arithmetic, weighted_sum


def multislerp(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: float | Sequence[float] | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    origin: bool = True,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-SLERP of one tensor.

    Args:
        base: θ_0, the origin of the sphere (``origin=True``), else the first of the points.
        finetuned: the other models' tensors.
        weights: one per point (the fine-tuned models; with ``origin=False`` base's first), default 1.
        normalize_weights: divide the weights by their sum.
        eps: added to the norms; the smallest |m| accepted.
        origin: whether ``base`` is the origin (mergekit: a ``base_model`` is given) or a point.
        gram: the Gram matrix of the inputs over the whole tensor, when this call merges one row chunk
            of it (the engine's pre-pass); computed here by default.
    """
    points = list(finetuned) if origin else [base, *finetuned]
    k = len(points)
    w = _ops.per_task(weights, k, "multislerp weights", 1.0)
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]
    if k == 1:
        return points[0].clone()
    if gram is None:
        gram = task_vector_stats(base, finetuned).gram if origin else gram_matrix(points)
    norms = torch.diagonal(gram).clamp_min(0).sqrt().tolist()
    a = torch.tensor([wk / (nk + eps) for wk, nk in zip(w, norms, strict=True)], dtype=torch.float64)
    mean_norm = math.sqrt(max(float(a @ gram @ a), 0.0))
    if mean_norm < eps:
        if k != 2:
            raise ValueError(
                "multislerp: the weighted mean of the unit inputs is zero (antipodal inputs whose weights "
                "cancel); use other weights"
            )
        coefficients = w
    else:
        scale = sum(wk * nk for wk, nk in zip(w, norms, strict=True)) / mean_norm
        coefficients = [scale * float(ak) for ak in a]
    if origin:
        return task_arithmetic(base, finetuned, weights=coefficients)
    return weighted_sum(points, coefficients, base)


__all__ = ["multislerp"]
