"""RAM and RAM+ (Reinforced Agent Merging; mergekit's ``ram`` and ``ramplus_tl``).

Per element, a task vector τ_k = θ_k − θ_0 is active where |τ_k| > ε; c is the number of active
models there. RAM averages the active task vectors (an entry only one model changes keeps its full
value):

    merged = θ_0 + Σ_k [active_k] τ_k / max(c, 1).

RAM+ (tensor-local) scales the entries a model changes alone by λ_k = 1 + r · clamp(ρ_k, 0, α),
with ρ_k = (entries model k shares with others) / max(entries it changes alone, ε), counted over the
tensor; shared entries are averaged as in RAM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _active(base: torch.Tensor, finetuned: Sequence[torch.Tensor], epsilon: float):
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(work)
    taus = torch.stack([x.to(work) - b for x in finetuned])
    active = taus.abs() > epsilon
    counts = active.sum(dim=0)
    return b, taus * active, active, counts


def ram(base: torch.Tensor, finetuned: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """RAM of one tensor: the mean of the active task vectors per element; base's dtype."""
    if not finetuned:
        return base.clone()
    b, taus, _, counts = _active(base, finetuned, epsilon)
    return (b + taus.sum(dim=0) / counts.clamp(min=1)).to(base.dtype)


def ramplus_tl(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM+ of one tensor (entries changed by one model alone scaled by its λ_k); base's dtype."""
    if not finetuned:
        return base.clone()
    b, taus, active, counts = _active(base, finetuned, epsilon)
    alone = counts == 1
    shared_counts = (active & ~alone).reshape(len(finetuned), -1).sum(dim=1)
    alone_counts = (active & alone).reshape(len(finetuned), -1).sum(dim=1)
    rho = shared_counts.to(b.dtype) / alone_counts.to(b.dtype).clamp(min=epsilon)
    scale = (1 + r * rho.clamp(min=0, max=alpha)).reshape(-1, *([1] * base.dim()))
    merged = (taus * torch.where(alone, scale, 1 / counts.clamp(min=1))).sum(dim=0)
    return (b + merged).to(base.dtype)


__all__ = ["ram", "ramplus_tl"]
