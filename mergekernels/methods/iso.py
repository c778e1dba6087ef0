"""Iso-C and Iso-CTS, isotropic merging (Marczak et al. 2025), 2-D tensors; others: mean of tau.

Iso-C: M = sum_t tau_t with thin SVD M = U S V^T (r = min(m, n) triplets); merged = mean(S) U V^T,
i.e. the spectrum of the task-arithmetic sum flattened to its mean. Every singular value of the
merged matrix is mean(S) (for rank-deficient M the directions of its zero singular values are
whatever the SVD returns, as in the authors' code).

Iso-CTS: the top k_c singular triplets of M span the common subspace; each tau_t is projected off it
on the left, tau_t - U_c U_c^T tau_t (the authors' choice: the task-specific left directions are
then orthogonal to the common ones), and the top d triplets of each projected tau_t are kept. The
k_c + T d = r left factors are stacked, likewise the right factors and the singular values; U and V
are replaced by their orthogonal polar factors and every singular value by the mean of the stacked
ones: merged = mean(s) U_hat V_hat^T.

The split (exact, in integers): k0 = floor(common_fraction * r) is the requested common size, with
common_fraction taken as the decimal it is written as (0.29 * 100 gives 29, where a float product
gives 28.999... and 28; the two agree for the default 0.8); d = min(floor(r / T), round((r - k0) / T))
with Python's round (half to even), as the public Iso-CTS code rounds, the cap keeping k_c >= 0;
then k_c = r - T d. So r - k_c always splits evenly over the tasks, and k_c is within T/2 of k0
unless the cap applies. When d = 0 ((r - k0) / T <= 1/2, or T > r) there is no task-specific part
and Iso-CTS is exactly Iso-C.

Both return theta_0 + alpha * merged (alpha = 1.0 by default; the FusionBench docs use 1.5 for
Iso-C). The shared machinery (checks, polar factor, per-tensor wrapper) is in
:mod:`mergekernels.methods.tsv`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from ..precision import full_float32
from .tsv import batched_inputs, finish, per_tensor, polar_factor, task_sum
from .tsv import task_vectors as _task_vectors


def common_split(rank: int, num_tasks: int, common_fraction: float = 0.8) -> tuple[int, int]:
    """(k_c, d) of Iso-CTS: common-subspace size and triplets per task, k_c + T d = rank.

    k0 = floor(common_fraction * rank); d = min(rank // T, round((rank - k0) / T)) (half to even);
    k_c = rank - T d. ``common_fraction`` must lie in [0, 1] (default 0.8).
    """
    if not (isinstance(common_fraction, (int, float)) and 0.0 <= common_fraction <= 1.0):
        raise ValueError(f"iso_cts: common_fraction must be in [0, 1], got {common_fraction!r}")
    if num_tasks < 1:
        raise ValueError(f"iso_cts: need at least one task, got {num_tasks}")
    # floor of the fraction as written: 0.29 * 100 is 29 here, 28 in float arithmetic
    requested = math.floor(Fraction(repr(float(common_fraction))) * rank)
    per_task = min(rank // num_tasks, round((rank - requested) / num_tasks))
    return rank - num_tasks * per_task, per_task


def _iso_c_merged(total: torch.Tensor) -> torch.Tensor:
    """mean(S) U V^T of each matrix of a batch."""
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return s.mean(dim=-1)[:, None, None] * (u @ vh)


@full_float32
def iso_c_batched(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    alpha: float = 1.0,
    svd_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Iso-C on a stack of same-shape matrices.

    Args:
        base: theta_0, shape [L, m, n] (L layers merged in one batched call).
        finetuned: theta_1..theta_T, each [L, m, n].
        alpha: scale of the merged task vector (default 1.0; FusionBench docs use 1.5).
        svd_dtype: dtype of the task vectors and the SVD, torch.float32 (default) or torch.float64.
        out_dtype: dtype of the result (default: base's dtype).

    Returns:
        theta_0 + alpha * mean(S) U V^T per layer, shape [L, m, n], on base's device.
    """
    finetuned, base_c, dtype, want = batched_inputs(base, finetuned, svd_dtype, out_dtype, "iso_c")
    if base.numel() == 0:
        return base_c.to(want, copy=True)
    return finish(base_c, _iso_c_merged(task_sum(base_c, finetuned, dtype)), alpha, want)


@full_float32
def iso_cts_batched(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    alpha: float = 1.0,
    common_fraction: float = 0.8,
    svd_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Iso-CTS on a stack of same-shape matrices.

    Args:
        base: theta_0, shape [L, m, n] (L layers merged in one batched call).
        finetuned: theta_1..theta_T, each [L, m, n].
        alpha: scale of the merged task vector (default 1.0).
        common_fraction: requested share of the r = min(m, n) directions given to the common
            subspace (default 0.8); the actual split is :func:`common_split`.
        svd_dtype: dtype of the task vectors and every SVD, torch.float32 (default) or torch.float64.
        out_dtype: dtype of the result (default: base's dtype).

    Returns:
        theta_0 + alpha * mean(s) U_hat V_hat^T per layer, shape [L, m, n], on base's device.
    """
    finetuned, base_c, dtype, want = batched_inputs(base, finetuned, svd_dtype, out_dtype, "iso_cts")
    layers, rows, cols = base.shape
    rank = min(rows, cols)
    common, per_task = common_split(rank, len(finetuned), common_fraction)
    if base.numel() == 0:
        return base_c.to(want, copy=True)
    total = task_sum(base_c, finetuned, dtype)
    if per_task == 0:  # the common subspace is everything: Iso-C
        return finish(base_c, _iso_c_merged(total), alpha, want)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    del total
    u_common = u[:, :, :common]
    u_stack = base_c.new_empty(layers, rows, rank)
    s_stack = base_c.new_empty(layers, rank)
    vh_stack = base_c.new_empty(layers, rank, cols)
    u_stack[:, :, :common] = u_common
    s_stack[:, :common] = s[:, :common]
    vh_stack[:, :common, :] = vh[:, :common, :]
    del s, vh
    for t, tau in enumerate(_task_vectors(base_c, finetuned, dtype)):
        # Left projection off the common subspace: tau - U_c (U_c^T tau).
        specific = tau - u_common @ (u_common.mT @ tau)
        del tau
        ut, st, vht = torch.linalg.svd(specific, full_matrices=False)
        cut = slice(common + t * per_task, common + (t + 1) * per_task)
        u_stack[:, :, cut] = ut[:, :, :per_task]
        s_stack[:, cut] = st[:, :per_task]
        vh_stack[:, cut, :] = vht[:, :per_task, :]
        del specific, ut, st, vht
    merged = s_stack.mean(dim=-1)[:, None, None] * (polar_factor(u_stack) @ polar_factor(vh_stack))
    return finish(base_c, merged, alpha, want)


def iso_c(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    alpha: float = 1.0,
    svd_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor by Iso-C.

    2-D tensors: theta_0 + alpha * mean(S) U V^T from the SVD of M = sum_t tau_t. Other ranks:
    theta_0 + alpha * mean_t tau_t.

    Args:
        base: theta_0.
        finetuned: theta_1..theta_T, each of base's shape.
        alpha: scale of the merged task vector (default 1.0; FusionBench docs use 1.5).
        svd_dtype: torch.float32 (default) or torch.float64, the dtype of the task vectors and SVD.
        out_dtype: dtype of the result (default: base's dtype).

    Returns:
        The merged tensor on base's device.
    """
    return per_tensor(
        iso_c_batched, base, finetuned, "iso_c", alpha=alpha, svd_dtype=svd_dtype, out_dtype=out_dtype
    )


def iso_cts(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    alpha: float = 1.0,
    common_fraction: float = 0.8,
    svd_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor by Iso-CTS.

    2-D tensors: common subspace = top k_c triplets of M = sum_t tau_t, top d triplets of each
    tau_t projected off it on the left (split by :func:`common_split`), stacked factors replaced by
    their polar factors and singular values by their mean. Other ranks: theta_0 + alpha * mean_t
    tau_t.

    Args:
        base: theta_0.
        finetuned: theta_1..theta_T, each of base's shape.
        alpha: scale of the merged task vector (default 1.0).
        common_fraction: requested common share of r = min(m, n), in [0, 1] (default 0.8).
        svd_dtype: torch.float32 (default) or torch.float64, the dtype of the task vectors and SVDs.
        out_dtype: dtype of the result (default: base's dtype).

    Returns:
        The merged tensor on base's device.
    """
    common_split(1, 1, common_fraction)  # validate even where the tensor is not 2-D
    return per_tensor(
        iso_cts_batched,
        base,
        finetuned,
        "iso_cts",
        alpha=alpha,
        svd_dtype=svd_dtype,
        out_dtype=out_dtype,
        common_fraction=common_fraction,
    )
