"""Plain-torch reference merges, written the way common merging toolkits compute them.

They are the baselines of the benchmarks: every one materialises the task vectors in float32 and
uses stock ATen ops (``kthvalue``, ``argsort``, ``bernoulli``), so their cost is what a user pays
without fused kernels. The merges take ``base`` and a list of fine-tuned tensors of base's shape
and return the merged tensor in base's dtype; :func:`threshold_kthvalue` returns the thresholds and
:func:`masked_drop_bernoulli` one expert's dropped task vector (float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MERGE_MODES = ("mean", "sum")


def _check_merge(merge: str) -> None:
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")


def _task_vectors(base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """The K x N float32 matrix of flattened task vectors tau_t = theta_t - theta_0."""
    flat = base.float().reshape(-1)
    return torch.stack([ft.float().reshape(-1) - flat for ft in finetuned])


def _finish(base: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """base + merged task vector (flat float32), back in base's shape and dtype."""
    return (base.float().reshape(-1) + merged).reshape(base.shape).to(base.dtype)


def _elect_and_merge(tv: torch.Tensor, mask: torch.Tensor, merge: str) -> torch.Tensor:
    """TIES sign election (sign of the sum of the trimmed vectors, 0 elects +) and the disjoint
    merge over the kept entries that are non-zero and agree with the elected sign."""
    trimmed = tv * mask
    sign = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0)
    agree = trimmed * sign > 0
    selected = trimmed * agree
    total = selected.sum(dim=0)
    if merge == "sum":
        return total
    return total / agree.sum(dim=0).clamp(min=1)


def ta_torch(base: torch.Tensor, finetuned: Sequence[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """Task arithmetic: base + scale * sum_t (ft_t - base), in float32, cast back."""
    flat = base.float()
    total = torch.zeros_like(flat)
    for ft in finetuned:
        total += ft.float() - flat
    return (flat + scale * total).to(base.dtype)


def ties_kthvalue(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], density: float, merge: str = "mean"
) -> torch.Tensor:
    """TIES as FusionBench (and the TIES authors' code) computes it.

    The task vectors are stacked into a K x N float32 matrix; per row, the threshold is
    ``kthvalue`` of |tau| at index N - int(N * density) (clamped to >= 1) and entries with
    |tau| >= it are kept. That index keeps int(N * density) + 1 entries, plus any ties.
    """
    _check_merge(merge)
    tv = _task_vectors(base, finetuned)
    n = tv.shape[1]
    index = max(1, n - int(n * density))
    mags = tv.abs()
    kth = mags.kthvalue(index, dim=1, keepdim=True).values
    return _finish(base, _elect_and_merge(tv, mags >= kth, merge))


def ties_argsort(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], density: float, merge: str = "mean"
) -> torch.Tensor:
    """TIES as mergekit computes it: per task vector, the indices of the k = int(density * N)
    largest |tau| from a full descending ``argsort`` form the keep mask (exactly k entries; ties
    at the cut are broken by the sort), then the same election and disjoint merge."""
    _check_merge(merge)
    tv = _task_vectors(base, finetuned)
    n = tv.shape[1]
    k = max(1, int(density * n))
    mask = torch.zeros(tv.shape, dtype=torch.bool, device=tv.device)
    for t in range(tv.shape[0]):
        top = torch.argsort(tv[t].abs(), descending=True)[:k]
        mask[t, top] = True
    return _finish(base, _elect_and_merge(tv, mask, merge))


def threshold_kthvalue(base: torch.Tensor, finetuned: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """The magnitude threshold per task vector as ``kthvalue`` gives it: the k-th largest |tau_t|
    with k = max(1, int(density * N)), i.e. the (N - k + 1)-th smallest; float32 [K]."""
    tv = _task_vectors(base, finetuned)
    n = tv.shape[1]
    k = max(1, int(density * n))
    return tv.abs().kthvalue(n - k + 1, dim=1).values


def masked_drop_bernoulli(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    keep: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One expert's randomly dropped task vector with a ``torch.bernoulli`` mask: each entry kept
    with probability `keep` and divided by it; float32 of base's shape."""
    tau = finetuned.float() - base.float()
    mask = torch.bernoulli(torch.full_like(tau, keep), generator=generator)
    return tau * mask / keep


def dare_bernoulli(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    drop: float,
    merge: str = "sum",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE with ``torch.bernoulli`` masks: each entry of each tau_t is kept with probability
    1 - drop and rescaled by 1 / (1 - drop); the rescaled vectors are summed (or averaged)."""
    _check_merge(merge)
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    flat = base.float()
    total = torch.zeros_like(flat)
    keep = 1.0 - drop
    for ft in finetuned:
        tau = ft.float() - flat
        mask = torch.bernoulli(torch.full_like(tau, keep), generator=generator)
        total += tau * mask / keep
    if merge == "mean":
        total /= len(finetuned)
    return (flat + total).to(base.dtype)


# ---- ACE-Merging --------------------------------------------------------------------------------
ACE_DELTA = 1e-12


def _ace_one_tensor_reference_style(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    eps: float,
    tau: float,
    k_frac: float,
    scale: float,
    gate: str,
) -> torch.Tensor:
    """One tensor of :func:`ace_reference_style` (float32 throughout, loops over the experts)."""
    base32 = base.float()
    task_vectors = [ft.float() - base32 for ft in finetuned]
    if base.ndim != 2:
        return (base32 + scale * torch.stack(task_vectors).mean(dim=0)).to(base.dtype)
    num_experts = len(task_vectors)
    n = base.shape[1]

    # Gate: the energies come from the trace of an extra, uncentred Gram per expert, read back to
    # the host one by one (a sync per expert on a GPU).
    energies = torch.tensor([torch.trace(tv.T @ tv).item() for tv in task_vectors])
    logs = torch.log(energies + ACE_DELTA)
    if gate == "auto":
        # The unbiased variance of one value is undefined: T = 1 never fires the gate.
        het = num_experts > 1 and bool(torch.var(logs) / (logs.mean() ** 2 + ACE_DELTA) > tau)
    else:
        het = gate == "on"
    mean_energy = energies.mean().item()

    eye = torch.eye(n, device=base.device)
    normalised = []
    centred_times_ridged = torch.zeros_like(base32)
    ridged_sum = torch.zeros(n, n, device=base.device)
    for tv in task_vectors:
        centred = tv - tv.mean(dim=0, keepdim=True)
        gram = centred.T @ centred
        trace = torch.trace(gram) + ACE_DELTA
        s_t, eps_t = (gram / trace, eps / trace) if het else (gram, eps)
        normalised.append(s_t)
        ridged = s_t + eps_t * eye
        centred_times_ridged += centred @ ridged
        ridged_sum += ridged

    prior = sum(normalised).mean(dim=0, keepdim=True)  # 1 x n, broadcast over the rows: C = 1 c^T
    if het:
        prior = prior / (mean_energy + ACE_DELTA)
    system = ridged_sum + prior
    try:
        inverse = torch.linalg.inv(system)
    except RuntimeError:
        inverse = torch.linalg.pinv(system)
    merged_tv = centred_times_ridged @ inverse

    k = int(min(base.shape) * k_frac)
    if het and k > 0:  # k = 0 would average an empty set: skipped, as mergekernels does
        ridged_mean = ridged_sum / num_experts
        residual = torch.zeros_like(base32)
        for tv, s_t in zip(task_vectors, normalised, strict=True):
            residual += tv @ (s_t - ridged_mean)
        u, sigma, vh = torch.linalg.svd(merged_tv + residual, full_matrices=False)
        merged_tv = merged_tv + sigma[:k].mean() * (u[:, :k] @ vh[:k])
    return (base32 + scale * merged_tv).to(base.dtype)


def ace_reference_style(
    base: torch.Tensor | Sequence[torch.Tensor],
    finetuned: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
    *,
    eps: float = 1e-2,
    tau: float = 0.3,
    k_frac: float = 0.3,
    scale: float = 1.0,
    gate: str = "auto",
) -> torch.Tensor | list[torch.Tensor]:
    """ACE-Merging computed the way the authors' released code computes it (the spec's "Cost").

    float32 throughout; a Python loop over tensors and, inside, over experts; the gate's energies
    read from the trace of an extra uncentred Gram per expert; an explicit ``torch.linalg.inv`` of
    A (``pinv`` only if inversion fails); a full thin SVD (``full_matrices=False``) in the
    refinement. Results equal the spec's up to float32 rounding (singular directions below
    sigma_1 * 1e-6 are not dropped here; they only matter for rank-deficient F).

    Args:
        base: one tensor, or a list of tensors (e.g. the layers of one shape group).
        finetuned: per expert, a tensor of base's shape (base is one tensor) or a list of tensors
            matching base's list.
        eps, tau, k_frac, scale: ACE's ridge (default 1e-2), gate threshold (default 0.3),
            refinement rank fraction (default 0.3) and lambda (default 1.0).
        gate: ``"auto"`` (default) uses gamma > tau; ``"on"`` / ``"off"`` force het.

    Returns:
        The merged tensor(s) in base's dtype, in base's structure. Tensors with ndim != 2 get
        theta_0 + scale * mean_t tau_t.
    """
    if gate not in ("auto", "on", "off"):
        raise ValueError(f"gate must be 'auto', 'on' or 'off', got {gate!r}")
    if len(finetuned) == 0:
        raise ValueError("finetuned must hold at least one expert")
    params = dict(eps=eps, tau=tau, k_frac=k_frac, scale=scale, gate=gate)
    if isinstance(base, torch.Tensor):
        return _ace_one_tensor_reference_style(base, finetuned, **params)
    for t, expert in enumerate(finetuned):
        if len(expert) != len(base):
            raise ValueError(f"finetuned[{t}] holds {len(expert)} tensors, base holds {len(base)}")
    return [
        _ace_one_tensor_reference_style(b, [expert[i] for expert in finetuned], **params)
        for i, b in enumerate(base)
    ]


# ---- mergekit's other methods, as its torch code paths compute them (float32 copies of the inputs)
def slerp_torch(base: torch.Tensor, finetuned: Sequence[torch.Tensor], t: float = 0.5) -> torch.Tensor:
    """Spherical interpolation from base to the one fine-tuned tensor through normalised copies."""
    v0, v1 = base.float(), finetuned[0].float()
    u0, u1 = v0 / v0.norm().clamp_min(1e-8), v1 / v1.norm().clamp_min(1e-8)
    cos = float((u0 * u1).sum().clamp(-1, 1))
    if abs(cos) > 0.9995:
        return ((1 - t) * v0 + t * v1).to(base.dtype)
    theta = math.acos(cos)
    s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (s0 * v0 + s1 * v1).to(base.dtype)


def model_stock_torch(base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model Stock: the mean pairwise cosine of the task vectors sets the pull towards the base."""
    tv = _task_vectors(base, finetuned)
    unit = tv / tv.norm(dim=1, keepdim=True).clamp_min(1e-6)
    k = tv.shape[0]
    cos = (unit @ unit.T)[torch.triu_indices(k, k, 1).unbind()].mean()
    t = float(k * cos / (1 + (k - 1) * cos))
    return _finish(base, t / k * tv.sum(dim=0))


def nearswap_torch(base: torch.Tensor, finetuned: Sequence[torch.Tensor], t: float) -> torch.Tensor:
    a, b = base.float(), finetuned[0].float()
    weight = (t / (b - a).abs().clamp_min(1e-6)).clamp(0, 1)
    return (weight * b + (1 - weight) * a).to(base.dtype)


def ram_torch(base: torch.Tensor, finetuned: Sequence[torch.Tensor], epsilon: float) -> torch.Tensor:
    tv = _task_vectors(base, finetuned)
    active = tv.abs() > epsilon
    return _finish(base, (tv * active).sum(dim=0) / active.sum(dim=0).clamp(min=1))


def sce_torch(base: torch.Tensor, finetuned: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """SCE with the variance top-k by ``kthvalue`` over the whole tensor."""
    tv = _task_vectors(base, finetuned)
    variance = tv.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * select_topk)
    if k > 0:
        kth = torch.kthvalue(variance, variance.numel() - k + 1).values
        tv = tv * (variance >= kth)
    weights = tv.square().mean(dim=1)
    weights = weights / weights.sum().clamp_min(1e-6)
    sign = torch.where(tv.sum(dim=0) >= 0, 1.0, -1.0)
    kept = weights[:, None] * (torch.sign(tv) == sign)
    return _finish(base, (tv * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6))


def arcee_fusion_torch(base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """Arcee Fusion with the quartiles by ``kthvalue`` over every importance of the tensor."""
    a, b = base.float(), finetuned[0].float()
    p, q = torch.softmax(b, dim=-1) + 1e-8, torch.softmax(a, dim=-1) + 1e-8
    importance = ((b - a).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)).reshape(-1)
    n = importance.numel()
    q1, median, q3 = (torch.kthvalue(importance, int(x * (n - 1)) + 1).values for x in (0.25, 0.5, 0.75))
    take = (importance >= median + 1.5 * (q3 - q1)).reshape(base.shape)
    return (a + (b - a) * take).to(base.dtype)
