"""Model Stock (Jang et al. 2024, mergekit's ``model_stock``): the average of the fine-tuned models,
pulled towards the base by how much their task vectors agree.

With K fine-tuned models, task vectors τ_k = θ_k − θ_0 and cos θ the mean over pairs k < l of
<τ_k, τ_l> / max(|τ_k| |τ_l|, 1e-6) (each clamped to [-1, 1]):

    t = K cos θ / (1 + (K − 1) cos θ),      merged = t · mean_k θ_k + (1 − t) θ_0 = θ_0 + (t / K) Σ_k τ_k,

with t = 0 (the base) where 1 + (K − 1) cos θ is within 1e-6 of 0. ``filter_wise`` computes cos θ and
t per row (over the last dimension; a 1-D tensor is one row). The whole-tensor version runs on the
fused kernels: one statistics pass (the Gram of the task vectors, float64; summed over the row
chunks first when the engine streams a tensor: ``gram``) and one task-arithmetic pass with scale
t / K. The per-row version is float32 torch ops with float64 moments, streamed in row chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..stats import task_vector_stats
from .ta import task_arithmetic


def stock_ratio(gram: torch.Tensor) -> torch.Tensor:
    """t from the Gram of the K task vectors ([..., K, K], float64): per row when batched."""
    k = gram.shape[-1]
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    pairs = [
        (gram[..., i, j] / (norms[..., i] * norms[..., j]).clamp_min(1e-6)).clamp(-1, 1)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    cos = torch.stack(pairs).mean(dim=0)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1.0, denominator))


def model_stock(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    filter_wise: bool = False,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model Stock of one tensor (at least two fine-tuned models); returns base's dtype. ``gram``:
    the task vectors' Gram over the whole tensor when this call merges a row chunk of it."""
    k = len(finetuned)
    if k < 2:
        raise ValueError(f"model_stock needs at least two fine-tuned models besides the base, got {k}")
    if not filter_wise:
        if gram is None:
            gram = task_vector_stats(base, finetuned).gram
        t = float(stock_ratio(gram))
        return task_arithmetic(base, finetuned, scale=t / k)
    rows = base.reshape(1, -1) if base.dim() <= 1 else base.reshape(-1, base.shape[-1])
    b = rows.float()
    taus = [x.reshape(rows.shape).float() - b for x in finetuned]
    gram = torch.empty(rows.shape[0], k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            gram[:, i, j] = gram[:, j, i] = (taus[i].double() * taus[j].double()).sum(-1)
    t = stock_ratio(gram).to(torch.float32).unsqueeze(-1)
    merged = b + (t / k) * sum(taus)
    return merged.reshape(base.shape).to(base.dtype)


__all__ = ["model_stock", "stock_ratio"]
