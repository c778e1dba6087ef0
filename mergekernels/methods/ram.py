"""RAM and RAM+ (Reinforced Agent Merging; mergekit's ``ram`` and ``ramplus_tl``).

Per element, a task vector τ_k = θ_k − θ_0 is active where |τ_k| > ε; c is the number of active
models there. RAM averages the active task vectors (an entry only one model changes keeps its full
value):

    merged = θ_0 + Σ_k [active_k] τ_k / max(c, 1).

RAM+ (tensor-local) scales the entries a model changes alone by λ_k = 1 + r · clamp(ρ_k, 0, α),
with ρ_k = (entries model k shares with others) / max(entries it changes alone, ε), counted over the
tensor; shared entries are averaged as in RAM.

Both merge in one fused pass (the kernels' strict trim at ε, then their ``active`` reduction: the
mean of the non-zero values, or λ_k times the one non-zero value). RAM+'s counts take one more pass
first, in pieces of 2^20 elements (over every row chunk when the engine streams a tensor: ``counts``).
ε is compared in float32, as mergekit does with ``dtype: float32``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ops
from ..stats import SumPrepass

_PIECE = 1 << 20


def _check_epsilon(epsilon: float) -> float:
    if not epsilon >= 0:
        raise ValueError(f"ram: epsilon must be >= 0, got {epsilon}")
    return float(epsilon)


def active_counts(base: torch.Tensor, finetuned: Sequence[torch.Tensor], epsilon: float) -> torch.Tensor:
    """[2, K] int64: per model, the entries it changes (|τ_k| > ε) together with another model (row 0)
    and alone (row 1), counted in pieces of 2^20 elements."""
    b = base.reshape(-1)
    fts = [x.reshape(-1) for x in finetuned]
    eps = torch.tensor(_check_epsilon(epsilon), dtype=torch.float32)
    counts = torch.zeros(2, len(fts), dtype=torch.int64)
    for start in range(0, b.numel(), _PIECE):
        piece = b[start : start + _PIECE].float()
        active = torch.stack([(x[start : start + _PIECE].float() - piece).abs() > eps for x in fts])
        alone = active.sum(dim=0) == 1
        counts[1] += (active & alone).sum(dim=1).cpu()
        counts[0] += (active & ~alone).sum(dim=1).cpu()
    return counts


def _active_mean(base, finetuned, epsilon: float, weights: list[float]) -> torch.Tensor:
    p = _ops.prepare(base, finetuned, "ram")
    k = len(p.finetuned)
    cut = torch.tensor([[epsilon] * k, [0.0] * k], dtype=torch.float32, device=p.base.device)
    # tie cuts at 0: entries equal to ε are not kept (strictly greater is active)
    return _ops.fused_merge(
        p, weights=weights, sparsify="trim", thresholds=cut, tie_cuts=[0] * (2 * k), reduce="active"
    )


def ram(base: torch.Tensor, finetuned: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """RAM of one tensor: the mean of the active task vectors per element; base's dtype."""
    if not finetuned:
        return base.clone()
    return _active_mean(base, finetuned, _check_epsilon(epsilon), [1.0] * len(finetuned))


def ramplus_scales(counts: torch.Tensor, r: float, alpha: float, epsilon: float) -> list[float]:
    """λ_k from the [2, K] counts of :func:`active_counts`."""
    shared, alone = counts[0].to(torch.float64), counts[1].to(torch.float64)
    rho = shared / alone.clamp(min=epsilon)
    return (1 + r * rho.clamp(min=0, max=alpha)).tolist()


def ramplus_tl(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """RAM+ of one tensor (entries changed by one model alone scaled by its λ_k); base's dtype.
    ``counts``: the [2, K] counts over the whole tensor when this call merges one row chunk of it."""
    if not finetuned:
        return base.clone()
    epsilon = _check_epsilon(epsilon)
    if counts is None:
        counts = active_counts(base, finetuned, epsilon)
    return _active_mean(base, finetuned, epsilon, ramplus_scales(counts, r, alpha, epsilon))


def ramplus_prepass(num_tasks: int, numel: int, params: dict, device: torch.device):
    if params.get("counts") is not None:
        return None
    epsilon = _check_epsilon(params.get("epsilon", 1e-5))
    return SumPrepass("counts", lambda base, finetuned, _: active_counts(base, finetuned, epsilon))


__all__ = ["active_counts", "ram", "ramplus_prepass", "ramplus_scales", "ramplus_tl"]
