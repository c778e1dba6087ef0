"""The Karcher mean (mergekit's ``karcher``): the weighted Riemannian mean of the models' directions
on the unit hypersphere, scaled by their mean norm.

Every model (the base too, when listed or given) is a point x_k with norm n_k and direction
u_k = x_k / n_k (points with n_k <= ``tol`` are left out of the mean); weights α_k = 1/K. Starting
from the normalised weighted mean of the u_k, the mean μ moves along the exponential map by the
weighted sum of the log maps, Σ α_k θ_k / sin θ_k (u_k − cos θ_k μ) with cos θ_k = <μ, u_k>, at most
``max_iter`` times, until that step is shorter than ``tol``; the result is (Σ α_k n_k) μ.

μ stays a linear combination of the u_k, so the iteration runs on its K coefficients and the K × K
Gram matrix of the models (float64); the tensors are read once for the Gram (the fused statistics
pass, summed over the row chunks first when the engine streams a tensor: ``gram``) and once for the
final fused combination (float32, rounded once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..stats import gram_matrix
from .ta import weighted_sum


def karcher_coefficients(gram: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> list[float]:
    """c with karcher mean = Σ c_k x_k, from the Gram matrix of the points x_k (float64)."""
    k = gram.shape[0]
    norms = torch.diagonal(gram).clamp_min(0).sqrt()
    alphas = torch.full((k,), 1.0 / k, dtype=torch.float64)
    valid = norms > tol
    if not bool(valid.any()):
        return [0.0] * k
    inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    units = gram * inv[:, None] * inv[None, :]  # Gram of the unit vectors
    weights = torch.where(valid, alphas, 0.0)
    weights = weights / weights.sum()

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ units @ c), 0.0))

    mean = weights.clone()
    length = norm(mean)
    if length < tol:
        mean = torch.zeros(k, dtype=torch.float64)
        mean[int(valid.nonzero()[0])] = 1.0
    else:
        mean = mean / length
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)  # <mu, u_j>
        tangent = torch.zeros(k, dtype=torch.float64)
        for j in range(k):
            if not bool(valid[j]):
                continue
            theta = math.acos(float(dots[j]))
            if theta < tol:
                continue
            factor = float(weights[j]) * theta / math.sin(theta)
            tangent[j] += factor
            tangent -= factor * float(dots[j]) * mean
        step = norm(tangent)
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * tangent / step
        length = norm(mean)
        if length > tol:
            mean = mean / length
    scale = float((alphas * norms).sum())
    return (scale * mean * inv).tolist()


def karcher(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    max_iter: int = 10,
    tol: float = 1e-5,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Karcher mean of ``base`` and ``finetuned`` (all points, equally weighted); base's dtype.
    ``gram``: the points' Gram matrix over the whole tensor when this call merges a row chunk."""
    points = [base, *finetuned]
    if len(points) == 1:
        return base.clone()
    if gram is None:
        gram = gram_matrix(points)
    return weighted_sum(points, karcher_coefficients(gram, max_iter, tol), base)


__all__ = ["karcher", "karcher_coefficients"]
