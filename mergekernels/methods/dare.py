"""DARE (Yu et al. 2024): random drop with rescale, then task arithmetic or TIES consensus.

Masks come from the counter-based generator of the kernels, keyed by (seed, tensor key, expert,
element index): the same on CPU and GPU, in any chunking or order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ops
from ..stats import SumPrepass
from .ties import reduction

_L1_MIN = 1e-8  # mergekit's guard: leave the scale alone when either norm is below it


def _rescale_mode(rescale: bool | str | None) -> str:
    if rescale is True or rescale == "inverse":
        return "inverse"
    if rescale is False or rescale is None or rescale == "none":
        return "none"
    if rescale == "l1":
        return "l1"
    raise ValueError(f"rescale must be True/'inverse', 'l1' or False/'none', got {rescale!r}")


def dare(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    drop: float | Sequence[float] = 0.9,
    weights: float | Sequence[float] | None = None,
    scale: float = 1.0,
    seed: int = 0,
    key: int | str = 0,
    rescale: bool | str = True,
    consensus: str | None = None,
    merge: str | None = None,
    weighted_election: bool = False,
    element_offset: int = 0,
    l1_norms: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    nonfinite: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one tensor by DARE.

    Args:
        drop: drop probability p per entry (per model if a list), in [0, 1). Paper default 0.9 for
            LLM deltas; FusionBench uses 0.5.
        seed, key: the random stream. ``key`` is an int or the tensor's name (hashed with
            :func:`mergekernels.tensor_key`); use the name so masks do not depend on tensor order.
        rescale: ``True``/``"inverse"`` divides kept entries by 1 - p (paper); ``"l1"`` instead
            matches the L1 norm of each tau_t (mergekit's rescale); ``False`` keeps them as they are.
        consensus: ``None`` (dare_linear: weighted sum) or ``"ties"`` (dare_ties: sign election and
            disjoint merge, no trim).
        merge: reduction; default ``"sum"`` without consensus and ``"mean"`` with it (see
            :func:`mergekernels.ties`); ``"weighted"`` divides by the summed weights (mergekit's
            normalize).
        element_offset: global index of this tensor's first element when it is a chunk of a
            larger tensor (masks stay those of the whole tensor).
        l1_norms: with ``rescale="l1"`` on a chunk, the whole tensor's [2, K] L1 norms (before and
            after the drop) from :func:`dare_prepass`, so the rescale is that of the whole tensor.
        nonfinite: int32 [K + 1] flags set to 1 for each input (base first) that holds a NaN or an
            Inf, from the merge pass itself (see :func:`mergekernels._ops.fused_merge`).
        out: a contiguous tensor of base's shape to write the result into (its dtype is the
            output dtype); returned.
    """
    mode = _rescale_mode(rescale)
    p = _ops.prepare(base, finetuned, "dare")
    k = len(p.finetuned)
    reduce_args = reduction(
        k, weights=weights, scale=scale, consensus=consensus, merge=merge, weighted_election=weighted_election
    )
    drops = _ops.per_task(drop, k, "drop")
    for t, d in enumerate(drops):
        if not 0.0 <= d < 1.0:
            raise ValueError(f"dare: drop must be in [0, 1), got {d} for model {t}")
    keep = [1.0 - d for d in drops]
    post = [1.0] * k
    if mode == "l1":
        if l1_norms is None:
            l1_norms = _ops.drop_l1(p, keep, seed, key, element_offset)
        l1 = l1_norms.cpu().tolist()
        post = [f / m if f >= _L1_MIN and m >= _L1_MIN else 1.0 for f, m in zip(l1[0], l1[1], strict=True)]
    return _ops.fused_merge(
        p,
        **reduce_args,
        sparsify="drop",
        keep_source="constant",
        keep=keep,
        post=post,
        rescale_inverse=mode == "inverse",
        seed=seed,
        key=key,
        element_offset=element_offset,
        out_dtype=out_dtype,
        nonfinite=nonfinite,
        out=out,
    )


def dare_prepass(num_tasks: int, numel: int, params: dict, device: torch.device):
    """DARE needs a pre-pass over a chunked tensor only for mergekit's L1 rescale."""
    if _rescale_mode(params.get("rescale", True)) != "l1" or params.get("l1_norms") is not None:
        return None
    keep = [1.0 - d for d in _ops.per_task(params.get("drop", 0.9), num_tasks, "drop")]
    seed, key = int(params.get("seed", 0)), params.get("key", 0)
    return SumPrepass(
        "l1_norms",
        lambda base, finetuned, offset: _ops.drop_l1(
            _ops.prepare(base, finetuned, "dare"), keep, seed, key, offset
        ),
    )
