"""ACE-Merging (Xu et al., CVPR 2026): a data-free closed-form covariance merge.

Spec: ``../shared/specs/ace.md``. Each 2-D tensor's task vectors are treated as samples: their
centred column Gram matrices stand in for the task input covariances of the RegMean closed form

    W_pre = (sum_t W_t R_t) (sum_t R_t + 1 c^T)^{-1},   R_t = S_t + eps_t I,

with a heterogeneity gate that normalises each task's Gram by its trace when the task energies
differ widely (gamma > tau), a rank-one structural prior C = 1 c^T, and, for heterogeneous tensors,
a spectral refinement that adds sigma_iso * U_k V_k^T of the residual-corrected matrix.

How it runs (``csrc/covariance.cpp``): all 2-D tensors of one shape are merged as one batch
[L, m, n]; one kernel pass forms the task vectors, column means, centred vectors and energies; the
Grams are symmetric half-products; A = R + 1 c^T is solved in float64 with a Cholesky factorisation
of R and the Sherman-Morrison correction (never an explicit inverse; the pseudo-inverse only when
Cholesky fails, with a warning); the refinement takes only the top-k singular subspace and values,
from a float64 symmetric eigensolver on the smaller Gram of F.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import _ops
from ..precision import float32_matmul

GATES = {"auto": 0, "on": 1, "off": 2}
ORIENTATIONS = ("stored", "transposed")

#: epsilon values the ACE paper reports per model family (the released code defaults to 1e-2).
REPORTED_EPS = {"gpt2": 4e-2, "roberta-base": 2e-4, "vit": 1e-5, "default": 1e-2}


@dataclass
class AceInfo:
    """Per-layer diagnostics of one batched ACE merge (L layers, T experts).

    het: bool [L], whether the heterogeneity gate fired (or was forced).
    gamma: float64 [L], Var(log e_t) / mean(log e_t)^2; NaN when T = 1 (undefined).
    energies: float64 [T, L], e_t = ||tau_t||_F^2.
    fallback: bool [L], the Cholesky solve failed and the pseudo-inverse was used.
    refined: bool [L], the spectral refinement ran (het and k >= 1).
    """

    het: torch.Tensor
    gamma: torch.Tensor
    energies: torch.Tensor
    fallback: torch.Tensor
    refined: torch.Tensor

    def layer(self, i: int) -> dict:
        """Plain-Python diagnostics of layer i (for reports and JSON)."""
        return {
            "het": bool(self.het[i]),
            "gamma": float(self.gamma[i]),
            "energies": [float(e) for e in self.energies[:, i]],
            "fallback": bool(self.fallback[i]),
            "refined": bool(self.refined[i]),
        }


def _check(base: torch.Tensor, finetuned: Sequence[torch.Tensor], **params) -> None:
    if params["gate"] not in GATES:
        raise ValueError(f"ace: gate must be one of {sorted(GATES)}, got {params['gate']!r}")
    if params["orientation"] not in ORIENTATIONS:
        raise ValueError(f"ace: orientation must be one of {ORIENTATIONS}, got {params['orientation']!r}")
    if not params["eps"] >= 0:
        raise ValueError(f"ace: eps must be >= 0, got {params['eps']}")
    if not 0 <= params["k_frac"] <= 1:
        raise ValueError(f"ace: k_frac must be in [0, 1], got {params['k_frac']}")
    if not params["rank_rtol"] >= 0:
        raise ValueError(f"ace: rank_rtol must be >= 0, got {params['rank_rtol']}")


def ace_batched(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    eps: float = 1e-2,
    tau: float = 0.3,
    k_frac: float = 0.3,
    scale: float = 1.0,
    orientation: str = "stored",
    gate: str = "auto",
    rank_rtol: float = 1e-6,
    tf32: bool = False,
) -> tuple[torch.Tensor, AceInfo]:
    """ACE-Merging of L same-shape 2-D layers at once.

    Args:
        base: theta_0 of the L layers, [L, m, n] (float32, float16 or bfloat16; float64 is computed in
            float32).
        finetuned: theta_1..theta_T, each [L, m, n].
        eps: ridge epsilon (default 1e-2, the released code's default; the paper reports 4e-2 for
            GPT-2, 2e-4 for RoBERTa-Base and 1e-5 for the other families, see ``REPORTED_EPS``).
        tau: heterogeneity threshold on gamma (default 0.3).
        k_frac: refinement rank k = floor(k_frac * min(m, n)) (default 0.3). When k = 0 (tiny
            tensors) the refinement is skipped and ``info.refined`` is False: the mean of an empty set
            of singular values is undefined.
        scale: lambda, the result is theta_0 + lambda * W (default 1.0).
        orientation: ``"stored"`` (default, as the reference: columns are features, the input side
            of ``nn.Linear``; HF GPT-2 ``Conv1D`` stores in x out, so there the covariance is
            output-side, which is what reproduces the published GPT-2 numbers) or ``"transposed"``
            (merge the transpose: the input side of a Conv1D weight).
        gate: ``"auto"`` (default, het = gamma > tau; T = 1 gives het = False), ``"on"`` or
            ``"off"`` to force the branch.
        rank_rtol: in the refinement, singular directions with sigma_i <= rank_rtol * sigma_1 add
            nothing to U_k V_k^T (an SVD leaves them arbitrary); sigma_iso still averages all k
            values (default 1e-6).
        tf32: allow TF32 tensor cores for the float32 products on CUDA (default False: full float32).
            The Cholesky solve and the refinement's eigensolver stay float64. Ignored on CPU.

    Returns:
        (merged [L, m, n] in base's dtype, :class:`AceInfo`).
    """
    _check(base, finetuned, eps=eps, k_frac=k_frac, gate=gate, orientation=orientation, rank_rtol=rank_rtol)
    if base.dim() != 3:
        raise ValueError(f"ace_batched: base must be [layers, rows, cols], got shape {tuple(base.shape)}")
    if orientation == "transposed":
        base, finetuned = base.mT, [x.mT for x in finetuned]
    with float32_matmul(tf32 and base.is_cuda):
        merged, het, gamma, energies, fallback, refined = _ops.ace_merge(
            base,
            finetuned,
            eps=eps,
            tau=tau,
            k_frac=k_frac,
            scale=scale,
            gate=GATES[gate],
            rank_rtol=rank_rtol,
        )
    _ops.warn_fallback(fallback, "ace")
    if orientation == "transposed":
        merged = merged.mT.contiguous()
    return merged, AceInfo(het, gamma, energies, fallback, refined)


def ace(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    eps: float = 1e-2,
    tau: float = 0.3,
    k_frac: float = 0.3,
    scale: float = 1.0,
    orientation: str = "stored",
    gate: str = "auto",
    rank_rtol: float = 1e-6,
    tf32: bool = False,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, AceInfo | None]:
    """ACE-Merging of one tensor.

    2-D tensors go through :func:`ace_batched` (see it for every parameter and default); tensors
    with ndim != 2 (biases, norms, scalars, conv kernels) get the plain mean of the task vectors,
    theta_0 + scale * mean_t tau_t. With ``return_info`` the result is (merged, info), info being
    None for the mean.
    """
    _check(base, finetuned, eps=eps, k_frac=k_frac, gate=gate, orientation=orientation, rank_rtol=rank_rtol)
    if base.dim() != 2 or base.numel() == 0:
        p = _ops.prepare(base, finetuned, "ace")
        merged = _ops.fused_merge(p, weights=[1.0] * len(p.finetuned), scale=scale, reduce="mean")
        return (merged, None) if return_info else merged
    merged, info = ace_batched(
        base.unsqueeze(0),
        [x.unsqueeze(0) for x in finetuned],
        eps=eps,
        tau=tau,
        k_frac=k_frac,
        scale=scale,
        orientation=orientation,
        gate=gate,
        rank_rtol=rank_rtol,
        tf32=tf32,
    )
    return (merged[0], info) if return_info else merged[0]


def layer_bytes(m: int, n: int, experts: int, dtype_bytes: int = 4) -> int:
    """Peak memory of one layer inside :func:`ace_batched` (an upper estimate), for batching under a
    memory cap: the T + 1 inputs, T centred float32 copies, five m x n float32 accumulators and
    the float64 solve (b and X), the float64 refinement copy of F, and the n x n / min-side Grams."""
    side = min(m, n)
    return (
        (experts + 1) * m * n * dtype_bytes
        + experts * m * n * 4
        + 5 * m * n * 4
        + 3 * m * n * 8
        + 4 * n * n * 4
        + 3 * n * n * 8
        + 3 * side * side * 8
    )
