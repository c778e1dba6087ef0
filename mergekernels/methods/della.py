"""DELLA (Deep et al. 2024): magnitude-ranked random drop (MagPrune), then TIES consensus.

Per row of each tau_t, entries are ranked by |tau| (ascending, ties by position, rank r in
0..m-1 for a row of m entries); entry r is kept with probability
p_r = (density - epsilon) + 2 * epsilon * r / (m - 1) (p = density when m = 1) and a survivor is
divided by p_r. Rows are the first dimension (a 1-D tensor is one row). Ranks come from the
``row_ranks`` op (a per-row radix sort on the CPU, ATen's segmented sort on the GPU) over a bounded
chunk of rows; the drop, election and merge are one fused pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ops
from .ties import reduction

# Elements (times the number of models) of one chunk of rows: bounds the rank buffers.
CHUNK_ELEMENTS = 1 << 24


def rows_of(shape: torch.Size) -> tuple[int, int]:
    """(rows, row length) used by the per-row methods: the first dimension is the row index."""
    numel = shape.numel()
    rows = shape[0] if len(shape) >= 2 and shape[0] > 0 else 1
    return rows, (numel // rows if rows else 0)


def della(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    density: float | Sequence[float] = 0.5,
    epsilon: float | Sequence[float] = 0.15,
    weights: float | Sequence[float] | None = None,
    scale: float = 1.0,
    seed: int = 0,
    key: int | str = 0,
    consensus: str | None = "ties",
    merge: str = "mean",
    weighted_election: bool = False,
    element_offset: int = 0,
    out_dtype: torch.dtype | None = None,
    nonfinite: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one tensor by DELLA.

    Args:
        density: mean keep probability (default 0.5), epsilon: half-width of the keep-probability
            ramp (default 0.15). Keep probabilities must stay in (0, 1]: density - epsilon > 0 and
            density + epsilon <= 1.
        consensus: ``"ties"`` (DELLA-merging, default) or ``None`` (mergekit's della_linear).
        merge: reduction after election, ``"mean"`` (default), ``"sum"`` or ``"weighted"``.
        seed, key: the random stream (use the tensor's name as key).
        element_offset: global index of this tensor's first element when it is a block of whole
            rows of a larger tensor (ranks are per row, so row blocks merge exactly as the whole).
        nonfinite: int32 [K + 1] flags set to 1 for each input (base first) that holds a NaN or an
            Inf, from the merge pass itself (see :func:`mergekernels._ops.fused_merge`).
        out: a contiguous tensor of base's shape to write the result into (its dtype is the
            output dtype); returned.
    """
    p = _ops.prepare(base, finetuned, "della")
    k = len(p.finetuned)
    reduce_args = reduction(
        k, weights=weights, scale=scale, consensus=consensus, merge=merge, weighted_election=weighted_election
    )
    densities = _ops.per_task(density, k, "density")
    epsilons = _ops.per_task(epsilon, k, "epsilon")
    rows, row_len = rows_of(p.base.shape)
    keep0, step = [], []
    for t, (d, e) in enumerate(zip(densities, epsilons, strict=True)):
        if not (e >= 0.0 and d - e > 0.0 and d + e <= 1.0):
            raise ValueError(
                f"della: keep probabilities density +- epsilon must lie in (0, 1]; got density={d}, "
                f"epsilon={e} for model {t}"
            )
        keep0.append(d - e if row_len > 1 else d)
        step.append(2.0 * e / (row_len - 1) if row_len > 1 else 0.0)
    if out is None:
        _, want = _ops._check_out_dtype(out_dtype, p.out_dtype)
        out = torch.empty(p.base.shape, dtype=want, device=p.base.device)
    else:
        _ops._check_out(out, p.base, out_dtype)
        want = out.dtype
    if out.numel() == 0:
        return out
    base_rows = p.base.reshape(rows, row_len)
    ft_rows = [x.reshape(rows, row_len) for x in p.finetuned]
    out_rows = out.view(rows, row_len)
    direct = out.dtype in _ops._KERNEL_DTYPES  # float64 results are computed in float32 and widened
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, k * row_len))
    for r0 in range(0, rows, per_chunk):
        r1 = min(rows, r0 + per_chunk)
        chunk = _ops.Prepared(base_rows[r0:r1], [x[r0:r1] for x in ft_rows], p.out_dtype)
        ranks = [_ops.row_ranks(chunk.base, x, row_len) for x in chunk.finetuned]
        merged = _ops.fused_merge(
            chunk,
            **reduce_args,
            sparsify="drop",
            keep_source="rank",
            keep=keep0,
            step=step,
            ranks=ranks,
            rescale_inverse=True,
            seed=seed,
            key=key,
            element_offset=element_offset + r0 * row_len,
            out_dtype=want,
            nonfinite=nonfinite,
            out=out_rows[r0:r1] if direct else None,
        )
        if not direct:
            out_rows[r0:r1] = merged.view(r1 - r0, row_len)
    return out
