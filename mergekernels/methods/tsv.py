"""TSV-M, Task Singular Vectors: Merge (Gargiulo et al. 2025), 2-D tensors; others: mean of tau.

For each task, the top k = floor(min(m, n) / T) singular triplets of tau_t are kept; the kept left
factors of all tasks are stacked side by side (U, m x Tk), likewise the right factors (V, n x Tk)
and the singular values (s). U and V are replaced by their orthogonal polar factors (X = P S Q^T ->
P Q^T, the nearest matrix with orthonormal columns), which decorrelates the tasks' directions, and
merged = U_hat diag(s) V_hat^T; the result is theta_0 + alpha * merged.

Where the spec is silent: when T > min(m, n) the spec's k is 0; we keep k = 1 per task instead of
failing, so a whole-model merge with many tasks does not stop at a small matrix (a 1 x 1 tensor then
gets exactly the mean of tau). The stacked factors then have more columns than rows, and their polar
factors have orthonormal rows instead of columns.

This module also holds the machinery shared with :mod:`mergekernels.methods.iso`: input checks, the
polar factor, task vectors formed in the compute dtype, and the per-tensor wrapper (2-D tensors go
through the batched function with L = 1, other ranks get theta_0 + alpha * mean_t tau_t).

Matrix methods work on whole tensors batched over a leading layer dimension L (same-shape tensors of
many layers in one call): ``*_batched(base[L, m, n], [theta_t[L, m, n]])``. Task vectors are formed
one task at a time in the compute dtype (``svd_dtype``, float32 unless asked for float64), so at most
one full task vector is alive besides the factors kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .. import _ops
from ..precision import full_float32

SVD_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Shared machinery of the spectral methods (TSV-M, Iso-C, Iso-CTS).
check_inputs = _ops.validate  # same checks and messages as the kernel-backed methods


def check_dtypes(svd_dtype: torch.dtype, out_dtype: torch.dtype | None, base: torch.Tensor, op: str):
    """(compute dtype, result dtype) after validating ``svd_dtype`` and ``out_dtype``."""
    if svd_dtype not in SVD_DTYPES:
        raise ValueError(f"{op}: svd_dtype must be torch.float32 or torch.float64, got {svd_dtype}")
    want = base.dtype if out_dtype is None else out_dtype
    if not isinstance(want, torch.dtype) or not want.is_floating_point:
        raise TypeError(f"{op}: out_dtype must be a floating-point dtype, got {want}")
    return svd_dtype, want


def batched_inputs(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    svd_dtype: torch.dtype,
    out_dtype: torch.dtype | None,
    op: str,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.dtype, torch.dtype]:
    """The checks every batched spectral method starts with: (fine-tuned tensors, base in the
    compute dtype, compute dtype, result dtype)."""
    finetuned = check_inputs(base, finetuned, op)
    if base.ndim != 3:
        raise ValueError(
            f"{op}: base must be a [L, m, n] stack of matrices, got shape {tuple(base.shape)}; "
            "use the per-tensor function for a single tensor"
        )
    dtype, want = check_dtypes(svd_dtype, out_dtype, base, op)
    return finetuned, base.to(dtype), dtype, want


def task_vectors(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """tau_t = theta_t - theta_0 in ``dtype``, one task at a time (base is already in ``dtype``)."""
    for x in finetuned:
        yield x.to(dtype) - base


def task_sum(base: torch.Tensor, finetuned: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """sum_t tau_t accumulated in ``dtype``."""
    total = torch.zeros_like(base, dtype=dtype)
    for tau in task_vectors(base, finetuned, dtype):
        total += tau
    return total


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor P Q^T of each matrix of a batch, from its thin SVD X = P S Q^T.

    For a tall X (rows >= columns) of full column rank it is the matrix with orthonormal columns
    nearest to X; for a wide X the rows are orthonormal. The polar factor of X^T is the transpose of
    that of X, so right factors may be orthogonalised in their stored (transposed) layout.
    """
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def finish(base: torch.Tensor, merged: torch.Tensor, alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
    """theta_0 + alpha * merged, in out_dtype (base and merged are in the compute dtype)."""
    return torch.add(base, merged, alpha=float(alpha)).to(out_dtype)


def per_tensor(
    batched: Callable[..., torch.Tensor],
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    op: str,
    *,
    alpha: float,
    svd_dtype: torch.dtype,
    out_dtype: torch.dtype | None,
    **params,
) -> torch.Tensor:
    """A spectral method on one tensor: 2-D tensors through ``batched`` with L = 1; other ranks
    (and empty tensors) get theta_0 + alpha * mean_t tau_t, accumulated in the compute dtype."""
    finetuned = check_inputs(base, finetuned, op)
    dtype, want = check_dtypes(svd_dtype, out_dtype, base, op)
    if base.ndim == 2 and base.numel() > 0:
        out = batched(
            base.unsqueeze(0),
            [x.unsqueeze(0) for x in finetuned],
            alpha=alpha,
            svd_dtype=svd_dtype,
            out_dtype=want,
            **params,
        )
        return out.squeeze(0)
    base_c = base.to(dtype)
    mean = task_sum(base_c, finetuned, dtype) / len(finetuned)
    return finish(base_c, mean, alpha, want)


# ----------------------------------------------------------------------------------------------
def tsv_rank(rows: int, cols: int, num_tasks: int) -> int:
    """Singular triplets kept per task: floor(min(rows, cols) / T), at least 1 (see module doc)."""
    return max(1, min(rows, cols) // num_tasks)


@full_float32
def tsv_m_batched(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    alpha: float = 1.0,
    svd_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """TSV-M on a stack of same-shape matrices.

    Args:
        base: theta_0, shape [L, m, n] (L layers merged in one batched call).
        finetuned: theta_1..theta_T, each [L, m, n].
        alpha: scale of the merged task vector (default 1.0, the paper's).
        svd_dtype: dtype of the task vectors and every SVD, torch.float32 (default) or
            torch.float64 (slower; for ill-conditioned or nearly degenerate spectra).
        out_dtype: dtype of the result (default: base's dtype).

    Returns:
        theta_0 + alpha * U_hat diag(s) V_hat^T per layer, shape [L, m, n], on base's device.
    """
    finetuned, base_c, dtype, want = batched_inputs(base, finetuned, svd_dtype, out_dtype, "tsv_m")
    if base.numel() == 0:
        return base_c.to(want, copy=True)
    layers, rows, cols = base.shape
    k = tsv_rank(rows, cols, len(finetuned))
    width = k * len(finetuned)
    # Kept factors go straight into preallocated stacks, so each task's full SVD can be freed.
    u_stack = base_c.new_empty(layers, rows, width)
    s_stack = base_c.new_empty(layers, width)
    vh_stack = base_c.new_empty(layers, width, cols)
    for t, tau in enumerate(task_vectors(base_c, finetuned, dtype)):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        cut = slice(t * k, (t + 1) * k)
        u_stack[:, :, cut] = u[:, :, :k]
        s_stack[:, cut] = s[:, :k]
        vh_stack[:, cut, :] = vh[:, :k, :]
        del tau, u, s, vh
    u_hat = polar_factor(u_stack)
    vh_hat = polar_factor(vh_stack)  # = V_hat^T
    merged = (u_hat * s_stack.unsqueeze(1)) @ vh_hat
    return finish(base_c, merged, alpha, want)


def tsv_m(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    alpha: float = 1.0,
    svd_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor by TSV-M.

    2-D tensors: per task the top k = floor(min(m, n) / T) singular triplets of tau_t (at least 1
    when T > min(m, n)), stacked factors replaced by their polar factors, theta_0 + alpha * U_hat
    diag(s) V_hat^T. Other ranks: theta_0 + alpha * mean_t tau_t.

    Args:
        base: theta_0.
        finetuned: theta_1..theta_T, each of base's shape.
        alpha: scale of the merged task vector (default 1.0).
        svd_dtype: torch.float32 (default) or torch.float64, the dtype of the task vectors and SVDs.
        out_dtype: dtype of the result (default: base's dtype).

    Returns:
        The merged tensor on base's device.
    """
    return per_tensor(
        tsv_m_batched, base, finetuned, "tsv_m", alpha=alpha, svd_dtype=svd_dtype, out_dtype=out_dtype
    )
