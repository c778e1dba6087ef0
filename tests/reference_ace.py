"""Float64 reference for ACE-Merging, written straight from ../shared/specs/ace.md.

Clarity over speed: one 2-D tensor at a time, a Python loop over experts, explicit
``torch.linalg.solve`` and a full thin SVD, every intermediate in float64. Only the task vectors
are formed in float32 first (tau_t = float32(theta_t) - float32(theta_0), the spec's "Delta_t in
float32"), then widened, exactly as tests/reference.py does for the elementwise methods.

Where the spec leaves room, the conventions mergekernels uses (implemented here exactly):

- T = 1: the unbiased variance of one log energy is undefined, so gamma = NaN and het = False under
  ``gate="auto"``; ``"on"`` / ``"off"`` force het whatever gamma is.
- k = floor(k_frac * min(m, n)); when het and k == 0 the refinement is skipped (W = W_pre).
- In the refinement, singular directions with sigma_i <= rank_rtol * sigma_1 contribute nothing to
  U_k V_k^T (an SVD leaves such directions arbitrary, so no implementation could agree on them),
  but sigma_iso is still the mean of all k top singular values.
- delta = 1e-12 everywhere the spec writes delta.
- ndim != 2: theta_0 + scale * mean_t tau_t (gate statistics are still reported, het = False).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DELTA = 1e-12
GATES = ("auto", "on", "off")


def _task_vectors(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], device: torch.device
) -> list[torch.Tensor]:
    """tau_t formed in float32 (as the spec's accumulation rule implies), then widened to float64."""
    base32 = base.detach().to(device=device, dtype=torch.float32)
    return [(ft.detach().to(device=device, dtype=torch.float32) - base32).double() for ft in finetuned]


def _check(base: torch.Tensor, finetuned: Sequence[torch.Tensor], k_frac: float, gate: str) -> None:
    if len(finetuned) == 0:
        raise ValueError("finetuned must hold at least one tensor")
    if not base.is_floating_point():
        raise ValueError(f"base must be floating point, got {base.dtype}")
    for t, ft in enumerate(finetuned):
        if ft.shape != base.shape:
            raise ValueError(f"finetuned[{t}] has shape {tuple(ft.shape)}, base has {tuple(base.shape)}")
        if not ft.is_floating_point():
            raise ValueError(f"finetuned[{t}] must be floating point, got {ft.dtype}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if not 0.0 <= k_frac <= 1.0:
        raise ValueError(f"k_frac must be in [0, 1], got {k_frac}")


def ace_reference(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    eps: float = 1e-2,
    tau: float = 0.3,
    k_frac: float = 0.3,
    scale: float = 1.0,
    gate: str = "auto",
    rank_rtol: float = 1e-6,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict]:
    """ACE merge of one tensor in stored orientation (columns are features), in float64.

    Args:
        base: theta_0, any floating dtype; 2-D for the ACE closed form, any other ndim gets the mean.
        finetuned: the T fine-tuned tensors theta_t, each of base's shape.
        eps: ridge epsilon (default 1e-2, the released code's default).
        tau: heterogeneity threshold on gamma (default 0.3).
        k_frac: refinement rank fraction, k = floor(k_frac * min(m, n)) (default 0.3).
        scale: lambda, the merged task vector's scale (default 1.0).
        gate: ``"auto"`` (het = gamma > tau, default), ``"on"`` / ``"off"`` force het True / False.
        rank_rtol: singular directions with sigma_i <= rank_rtol * sigma_1 are dropped from
            U_k V_k^T (default 1e-6).
        device: where the float64 arithmetic runs and the results live (default ``"cpu"``; a GPU's
            float64 is IEEE too and much faster for large benchmark tensors).

    Returns:
        (merged float64 on `device`, info) where info = {"het": bool, "gamma": float,
        "energies": float64 Tensor[T] on the CPU}.

    Spec step -> the line that computes it (Delta_t is ``tau_t``; ``tau`` is the gate threshold):

    1. gate:      ``energies = (tau_t ** 2).sum()``; ``logs = log(energies + DELTA)``;
                  ``gamma = logs.var(unbiased) / (logs.mean() ** 2 + DELTA)``; ``het = gamma > tau``;
                  ``mean_energy = energies.mean()``
    2. centre:    ``centred = tau_t - tau_t.mean(dim=0)``; ``gram = centred.T @ centred``;
                  ``trace = trace(gram) + DELTA``; het: ``s_t = gram / trace``, ``eps_t = eps / trace``,
                  else ``s_t = gram``, ``eps_t = eps``; ``r_t = s_t + eps_t * I``
    3. prior:     ``c = sum(s_t).mean(dim=0)``; ``prior = ones(n, 1) * c[None, :]`` (rank one, rows
                  all c^T, not symmetric); het: ``prior /= mean_energy + DELTA``
    4. closed:    ``b = sum_t centred_t @ r_t``; ``a = sum_t r_t + prior``;
                  ``w_pre = solve(a, b, left=False)`` (W_pre A = B)
    5. refine:    ``r_bar = sum_t r_t / T``; ``residual = sum_t tau_t @ (s_t - r_bar)``;
                  ``f = w_pre + residual``; ``u, sigma, vh = svd(f)``; ``k = floor(k_frac * min(m, n))``;
                  ``sigma_iso = sigma[:k].mean()``; ``w = w_pre + sigma_iso * u_k @ vh_k`` (k > 0, het)
    6. result:    ``merged = theta_0 + scale * w``
    """
    _check(base, finetuned, k_frac, gate)
    device = torch.device(device)
    tau_list = _task_vectors(base, finetuned, device)
    theta0 = base.detach().to(device=device, dtype=torch.float64)
    num_experts = len(tau_list)

    # Step 1: heterogeneity gate on the log energies.
    energies = torch.stack([(tau_t**2).sum() for tau_t in tau_list]).cpu()
    logs = torch.log(energies + DELTA)
    if num_experts > 1:
        gamma = float(logs.var(correction=1) / (logs.mean() ** 2 + DELTA))
    else:
        gamma = math.nan  # unbiased variance of one value is undefined
    het = {"auto": num_experts > 1 and gamma > tau, "on": True, "off": False}[gate]
    mean_energy = energies.mean()

    if base.ndim != 2:
        merged = theta0 + scale * torch.stack(tau_list).mean(dim=0)
        return merged, {"het": False, "gamma": gamma, "energies": energies}

    m, n = base.shape
    eye = torch.eye(n, dtype=torch.float64, device=device)

    # Step 2: centre (subtract column means), normalise, add the ridge.
    centred, s_list, r_list = [], [], []
    for tau_t in tau_list:
        centred_t = tau_t - tau_t.mean(dim=0, keepdim=True)
        gram = centred_t.T @ centred_t
        trace = torch.trace(gram) + DELTA
        if het:
            s_t, eps_t = gram / trace, eps / trace
        else:
            s_t, eps_t = gram, eps
        centred.append(centred_t)
        s_list.append(s_t)
        r_list.append(s_t + eps_t * eye)

    # Step 3: rank-one collective prior C = 1 c^T (every row is c^T).
    c = sum(s_list).mean(dim=0)
    prior = torch.ones(n, 1, dtype=torch.float64, device=device) * c[None, :]
    if het:
        prior = prior / (float(mean_energy) + DELTA)

    # Step 4: W_pre = B A^-1, i.e. solve W_pre A = B.
    b = sum(centred_t @ r_t for centred_t, r_t in zip(centred, r_list, strict=True))
    a = sum(r_list) + prior
    w_pre = torch.linalg.solve(a, b, left=False)

    # Step 5: spectral refinement (het only; skipped when k == 0).
    w = w_pre
    k = math.floor(k_frac * min(m, n))
    if het and k > 0:
        r_bar = sum(r_list) / num_experts
        residual = sum(tau_t @ (s_t - r_bar) for tau_t, s_t in zip(tau_list, s_list, strict=True))
        f = w_pre + residual
        u, sigma, vh = torch.linalg.svd(f, full_matrices=False)
        sigma_iso = sigma[:k].mean()
        keep = sigma[:k] > rank_rtol * sigma[0]  # directions the SVD leaves arbitrary add nothing
        w = w_pre + sigma_iso * (u[:, :k][:, keep] @ vh[:k][keep])

    # Step 6.
    merged = theta0 + scale * w
    return merged, {"het": bool(het), "gamma": gamma, "energies": energies}
