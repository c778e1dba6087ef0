"""SCE (Select, Calculate, Erase; Wan et al. 2024, mergekit's ``sce``).

With task vectors τ_k = θ_k − θ_0:

1. select: with ``select_topk`` < 1, keep only the ⌊select_topk · m⌋ entries of largest variance
   across the models (population variance per element; m = the entries whose variance is not 0),
   zeroing the others in every τ_k;
2. calculate: weights w_k = mean(τ_k²) over the tensor, normalised to sum 1 (equal weights when they
   sum to less than 1e-6);
3. erase: per element, the majority sign is the sign of Σ_k τ_k (≥ 0: +); entries of another sign
   (or 0) are dropped;

    merged = θ_0 + Σ_k w_k τ_k [sign agrees] / max(Σ_k w_k [sign agrees], 1e-6).

Among entries tied at the selection threshold, the lowest indices are kept (mergekit's top-k
leaves the choice to ``torch.topk``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sce(base: torch.Tensor, finetuned: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE of one tensor; base's dtype."""
    if not finetuned:
        return base.clone()
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(work)
    taus = torch.stack([x.to(work) - b for x in finetuned])
    if select_topk <= 0:
        taus = torch.zeros_like(taus)
    elif select_topk < 1:
        variance = taus.var(dim=0, unbiased=False).reshape(-1)
        k = int(int(torch.count_nonzero(variance)) * select_topk)
        keep = torch.zeros_like(variance, dtype=torch.bool)
        if k > 0:  # the k largest: all above the k-th largest, then its ties by lowest index
            kth = torch.kthvalue(variance, variance.numel() - k + 1).values
            keep = variance > kth
            quota = k - int(keep.sum())
            if quota > 0:
                keep[(variance == kth).nonzero().squeeze(1)[:quota]] = True
        taus = taus * keep.reshape(base.shape)
    weights = taus.square().reshape(len(finetuned), -1).mean(dim=1)
    total = float(weights.sum())
    weights = torch.full_like(weights, 1 / len(finetuned)) if abs(total) < 1e-6 else weights / total
    weights = weights.reshape(-1, *([1] * base.dim()))
    majority = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0).to(work)
    agree = torch.sign(taus) == majority
    kept = weights * agree
    merged = (taus * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
    return (b + merged).to(base.dtype)


__all__ = ["sce"]
