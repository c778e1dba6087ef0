"""AWD, Adaptive Weight Disentanglement (Xiong et al. 2024, arXiv 2411.18729), in Gram space.

Spec: ``shared/specs/awd.md``. Task vectors tau_i = theta_i - theta_0 (i = 1..K) share one redundant
vector delta; the disentangled vectors are u_i = tau_i - delta and delta minimises

    L(delta) = L_O + alpha * ||delta||,   L_O = 1/(K(K-1)) * sum_{i != j} |cos(u_i, u_j)|

by plain gradient descent from delta = 0 (step ``lr``, ``steps`` iterations). L_O *is* the mean
|cos| over the pairs of u's, so the diagnostics call it ``mean_abs_cos``.

Gram space. Every gradient is a combination of the u_j and delta, so delta stays in the span of the
tau_i: delta = sum_i w_i tau_i, and with G = [<tau_i, tau_j>]

    <u_i, u_j> = G_ij - (Gw)_i - (Gw)_j + w^T G w,   ||delta||^2 = w^T G w.

The spec's gradient, written as coefficients on the u's: with a_k = ||u_k||, c_kj the cosines,
s_kj = sign(c_kj) (0 on the diagonal) and N = K(K-1),

    grad_delta L_O = sum_j h_j u_j,   h_k = -(2/N) (1/a_k sum_j s_kj / a_j - sum_j |c_kj| / a_k^2),

and since u_j = tau_j - delta the step on w is  w <- w - lr (h - (sum_j h_j) w + alpha w / ||delta||).
One pass over the tensors gives G (:func:`mergekernels._ops.tv_stats`, float64), the descent runs
on K numbers per problem, and it equals full-dimensional descent up to rounding (checked against
:func:`awd_full`, the full-dimensional float64 path kept as the reference). One caveat, shared by any
two implementations: plain GD with a fixed step on the |cos| kinks can be chaotic (typically when
K exceeds the dimension, e.g. rows shorter than K, or with many steps at a large step): there a
1e-14 change of the inputs changes delta after 300 steps by up to ~1e-2 relative, for two
full-dimensional implementations alike; the equality holds to ~1e-12 wherever the trajectory is
stable.

Merges. AWD+TA (``then="task_arithmetic"``): theta_0 + lambda sum_i v_i u_i with user weights v
is task arithmetic with per-task weights v_j - (sum_i v_i) w_j (= 1 - K w_j for v = 1), one fused
pass, no u_i materialised. AWD+M for any other data-free method M of ``METHODS`` (ties, dare,
dare_ties, breadcrumbs, della, ace, tsv_m, iso_c, iso_cts, wudi, ...): the disentangled tensors
theta_0 + u_i are formed in float32 (chunks of rows; K float32 copies of the tensor are alive) and M
runs on them with its own parameters.

Granularity: ``global`` (one delta over all merged tensors: the model-level driver sums the tensors'
Grams, solves once and passes ``coefficients`` to every tensor), ``per_tensor`` (one problem per
tensor) and ``per_row`` (one problem per row of each tensor: row = index along dim 0, the other
dims flattened; tensors with ndim < 2 are one row). Batched problems (all tensors, or all rows of all
tensors) run as one vectorised descent on [B, K, K] Grams, in chunks of ``SOLVE_CHUNK_ELEMS`` Gram
entries (roughly 0.5-1 us per problem and step for K = 4 on a 2-core CPU, K^2 in K: per_row on the
~4e5 rows of a 1e9-parameter model takes a minute or two there, more than its two passes).
For a single tensor without ``coefficients``, ``global`` and ``per_tensor`` are the same.

Where the spec is open (our decisions):

- Defaults alpha = 0.1, lr = 0.01, steps = 300 are third-party values (spec (*)); they assume task
  vectors of norm ~1: on real checkpoints (norms of 10-100 per model, ~0.1-1 per row) delta barely
  moves or overshoots. ``scale_free=True`` uses step lr * r^2 and penalty alpha ||delta|| / r with
  r the root-mean-square of ||tau_i|| (per problem), which makes the coefficient trajectory exactly
  invariant to rescaling all tau's; ``moved`` (||delta|| / r) in the info reports how far delta went.
  The spec's evidence (a sentence encoder: global AWD inert, per-row AWD + TA +2 points with
  scale-free steps) is not reproduced here; the default granularity stays the spec's ``global``.
- Zero vectors: a u_k with ||u_k||^2 <= ZERO_RTOL * max_i ||tau_i||^2 (e.g. a zero task vector
  while delta = 0) has undefined cosines; its pairs count as cos = 0 and add nothing to the
  gradient (they still count in N). Likewise ||delta||^2 <= ZERO_RTOL * max_i ||tau_i||^2 takes the
  penalty's subgradient 0 (the spec's choice at delta = 0). A problem whose tau's are all zero (an
  untouched row, say) keeps w = 0.
- Linearly dependent task vectors (K > the row length, a repeated model, a zero tau): G is singular
  and w has directions that do not move delta. Each step is projected onto the range of G
  (eigenvalues above ZERO_RTOL * the largest), so w stays the minimum-norm coefficients of delta
  instead of drifting (by 1e6 and more) along them, which would ruin the float32 mixing.
- K = 1: there are no pairs, L_O = 0 and its gradient is 0; the penalty's subgradient at delta = 0 is
  0, so delta stays 0 and AWD+M equals M.
- sign(c) of an exactly orthogonal pair is 0 (subgradient 0), so exactly orthogonal task vectors leave
  delta at 0 exactly. Pairs that are orthogonal only up to rounding get the full +-1 subgradient of
  |cos| and delta jitters around 0 with an amplitude of about lr / ||u|| (plain GD on a kink).
- AWD's own ``scale`` is passed to M as its scale (``scale``; ``alpha`` for tsv_m / iso_c / iso_cts,
  which call their scale that). M's parameters that clash with AWD's names (tsv's ``alpha``, wudi's
  ``lr`` / ``steps``) are given with a ``then_`` prefix (``then_lr=...``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import _ops
from .ta import task_arithmetic

GRANULARITIES = ("global", "per_tensor", "per_row")
# Squared norms at or below ZERO_RTOL * max_i ||tau_i||^2 count as zero (norms below 1e-6 of the
# largest task vector): the u's whose cosines are undefined, ||delta|| for the penalty, and the
# eigenvalues of G outside its range.
ZERO_RTOL = 1e-12
# Gram entries (B * K * K) per vectorised descent: its [B, K, K] float64 temporaries (1 MiB each) can
# stay in a CPU cache for all the steps.
SOLVE_CHUNK_ELEMS = 1 << 17
CHUNK_ELEMS = 1 << 20  # elements per task in one chunk of the per-row Grams and of the mixing
_THEN_PREFIX = "then_"
_NOT_THEN_PARAMS = {"base", "finetuned", "return_info", "return_loss"}
# Methods whose scale factor is called alpha (see mergekernels.methods.tsv / iso).
_ALPHA_SCALED = ("tsv_m", "iso_c", "iso_cts")


# ----------------------------------------------------------------------------------------------
# Gram-space descent.
def _check_hparams(alpha: float, lr: float, steps: int, scale_free: bool) -> None:
    for name, value in (("alpha", alpha), ("lr", lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"awd: {name} must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"awd: {name} must be >= 0, got {value}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"awd: steps must be an int >= 0, got {steps!r}")
    if not isinstance(scale_free, bool):
        raise ValueError(f"awd: scale_free must be True or False, got {scale_free!r}")


class _Batch:
    """A [B, K, K] float64 batch of Grams and the descent's arithmetic on it. Everything is elementwise
    with small reductions (no BLAS calls or gathers, which thread badly on tiny matrices)."""

    def __init__(self, gram: torch.Tensor):
        self.gram, self.k = gram, gram.shape[-1]
        self.diag = torch.diagonal(gram, dim1=-2, dim2=-1).contiguous()
        self.off = ~torch.eye(self.k, dtype=torch.bool, device=gram.device)
        # Linearly dependent task vectors leave directions of w that do not move delta: steps are
        # projected onto the range of G (see the module docstring).
        # Problems of full rank keep the exact identity (each problem's steps never depend on the others).
        evals, evecs = torch.linalg.eigh(gram)
        keep = evals > ZERO_RTOL * evals[:, -1:].clamp_min(0.0)
        full = keep.all(-1)
        self.proj = None
        if not bool(full.all()):
            eye = torch.eye(self.k, dtype=gram.dtype, device=gram.device)
            self.proj = torch.where(full[:, None, None], eye, (evecs * keep.unsqueeze(-2)) @ evecs.mT)

    def cosines(self, w: torch.Tensor, tol: torch.Tensor):
        """(c [B, K, K], zero on the diagonal and for pairs with a dead u; 1/a [B, K], 0 if dead;
        ||delta||^2 [B, 1]) of u_i = tau_i - sum_j w_j tau_j."""
        gw = (self.gram * w.unsqueeze(-2)).sum(-1)
        q = (w * gw).sum(-1, keepdim=True)
        live = (a2 := self.diag - 2.0 * gw + q) > tol
        inv_a = torch.where(live, a2.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
        inner = self.gram - gw.unsqueeze(-1) - gw.unsqueeze(-2) + q.unsqueeze(-1)
        c = inner * inv_a.unsqueeze(-1) * inv_a.unsqueeze(-2)
        return c * self.off, inv_a, q

    def gradient(self, w: torch.Tensor, alpha, tol: torch.Tensor) -> torch.Tensor:
        k = self.k
        c, inv_a, q = self.cosines(w, tol)
        s = c.sign()
        s_over_a = (s * inv_a.unsqueeze(-2)).sum(-1)  # sum_j s_kj / a_j
        h = (-2.0 / (k * (k - 1))) * (inv_a * s_over_a - inv_a.square() * (s * c).sum(-1))
        g = h - h.sum(-1, keepdim=True) * w
        big = q > tol
        g = g + torch.where(big, alpha * w / torch.where(big, q, 1.0).sqrt(), 0.0)
        return g if self.proj is None else (self.proj * g.unsqueeze(-2)).sum(-1)

    def objective(self, w: torch.Tensor, tol: torch.Tensor, pen: torch.Tensor):
        """(L_O, ||delta||, L) per problem, [B] each."""
        c, _, q = self.cosines(w, tol)
        k = self.k
        lo = c.abs().sum((-2, -1)) / (k * (k - 1)) if k >= 2 else q.new_zeros(q.shape[0])
        norm = q.reshape(-1).clamp_min(0.0).sqrt()
        return lo, norm, lo + pen.reshape(-1) * norm


def _tolerance(gram: torch.Tensor) -> torch.Tensor:
    return ZERO_RTOL * torch.diagonal(gram, dim1=-2, dim2=-1).amax(-1, keepdim=True)


def awd_gradient(
    gram: torch.Tensor, w: torch.Tensor, *, alpha: float | torch.Tensor = 0.1, tol: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient of L = L_O + alpha ||delta|| with respect to delta = sum_i w_i tau_i, as coefficients g
    on the tau's (grad = sum_i g_i tau_i), from the Gram matrix alone (the step :func:`awd_coefficients`
    takes).

    Args:
        gram: [B, K, K] float64 Grams <tau_i, tau_j>.
        w: [B, K] float64 coefficients of delta.
        alpha: the penalty weight (a number or a [B, 1] tensor).
        tol: [B, 1] squared-norm threshold below which a u (or delta) counts as zero (default
            ZERO_RTOL * max_i G_ii).
    """
    if gram.shape[-1] < 2:
        return torch.zeros_like(w)
    return _Batch(gram).gradient(w, alpha, _tolerance(gram) if tol is None else tol)


@dataclass
class AwdInfo:
    """What the descent did, per problem (tensors of the Gram's batch shape, float64).

    mean_abs_cos_before / _after: L_O = mean |cos(u_i, u_j)| over the pairs i != j, at delta = 0 and
        at the end (0 for K = 1).
    loss_before / _after: L = L_O + alpha ||delta|| (scale-free: alpha ||delta|| / r).
    delta_norm: ||delta|| at the end.
    tau_rms: r, the root-mean-square of ||tau_i||.
    moved: ||delta|| / r (0 where r = 0): how far delta moved, relative to the task vectors.
    active: bool, at least two non-zero task vectors (the problems the summary averages cosines over).
    steps: iterations run.
    """

    mean_abs_cos_before: torch.Tensor
    mean_abs_cos_after: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor
    delta_norm: torch.Tensor
    tau_rms: torch.Tensor
    moved: torch.Tensor
    active: torch.Tensor
    steps: int

    _FIELDS = (
        "mean_abs_cos_before",
        "mean_abs_cos_after",
        "loss_before",
        "loss_after",
        "delta_norm",
        "tau_rms",
        "moved",
        "active",
    )

    def select(self, index) -> AwdInfo:
        """The info of some problems (any index of the batch dimensions, e.g. a slice of rows)."""
        return AwdInfo(*(getattr(self, f)[index] for f in self._FIELDS), steps=self.steps)

    def summary(self) -> dict:
        """Plain-Python summary over all problems (for reports and JSON): ``problems``; the means over
        the active problems of ``mean_abs_cos_before/after`` and ``loss_before/after`` (NaN if none);
        ``delta_norm``, the norm of the whole delta (root of the summed squares); ``moved``, that norm
        over the root of the summed r^2 (for one problem: ||delta|| / r); ``max_moved``; ``steps``."""
        act = self.active.reshape(-1)
        count = int(act.sum())

        def mean(x):
            return float(x.reshape(-1)[act].mean()) if count else math.nan

        d2 = float(self.delta_norm.square().sum())
        r2 = float(self.tau_rms.square().sum())
        return {
            "problems": self.active.numel(),
            "mean_abs_cos_before": mean(self.mean_abs_cos_before),
            "mean_abs_cos_after": mean(self.mean_abs_cos_after),
            "loss_before": mean(self.loss_before),
            "loss_after": mean(self.loss_after),
            "delta_norm": math.sqrt(d2),
            "moved": math.sqrt(d2 / r2) if r2 > 0 else 0.0,
            "max_moved": float(self.moved.max()) if self.moved.numel() else 0.0,
            "steps": self.steps,
        }


def _descend(gram, alpha, lr, steps, scale_free):
    """Plain GD on w for a [B, K, K] float64 batch; returns (w [B, K], AwdInfo over [B])."""
    b, k = gram.shape[0], gram.shape[-1]
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    tol = _tolerance(gram)
    r2 = diag.clamp_min(0.0).mean(-1, keepdim=True)
    r = r2.sqrt()
    if scale_free:
        step = lr * r2
        pen = torch.where(r > 0, alpha / torch.where(r > 0, r, 1.0), 0.0)
    else:
        step = torch.full_like(r2, lr)
        pen = torch.full_like(r2, alpha)
    w = gram.new_zeros(b, k)
    batch = _Batch(gram)
    lo0, _, loss0 = batch.objective(w, tol, pen)
    if k >= 2:
        for _ in range(steps):
            w.sub_(step * batch.gradient(w, pen, tol))
    lo1, norm, loss1 = batch.objective(w, tol, pen)
    live = (diag > tol).sum(-1) >= 2
    r = r.reshape(-1)
    moved = torch.where(r > 0, norm / torch.where(r > 0, r, 1.0), 0.0)
    return w, AwdInfo(lo0, lo1, loss0, loss1, norm, r, moved, live, steps if k >= 2 else 0)


def awd_coefficients(
    gram: torch.Tensor,
    *,
    alpha: float = 0.1,
    lr: float = 0.01,
    steps: int = 300,
    scale_free: bool = False,
) -> tuple[torch.Tensor, AwdInfo]:
    """AWD's descent in Gram space: delta = sum_i w_i tau_i for one or many problems.

    Args:
        gram: [..., K, K] Grams <tau_i, tau_j> (float64 preferred; others are converted), e.g. from
            :func:`mergekernels.task_vector_stats` (``.gram``); leading dims are independent
            problems (tensors, rows), solved as one vectorised descent on the Gram's device.
        alpha: penalty weight on ||delta|| (default 0.1 (*)).
        lr: step size beta (default 0.01 (*)).
        steps: iterations (default 300 (*)).
        scale_free: step lr * r^2 and penalty alpha ||delta|| / r, r = RMS of ||tau_i|| per problem
            (default False: the spec's absolute values).

    Returns:
        (w [..., K] float64, :class:`AwdInfo` over the leading dims). (*): third-party values, see
        the module docstring.
    """
    _check_hparams(alpha, lr, steps, scale_free)
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"awd: gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2] or gram.shape[-1] == 0:
        raise ValueError(f"awd: gram must be [..., K, K] with K >= 1, got shape {tuple(gram.shape)}")
    batch, k = gram.shape[:-2], gram.shape[-1]
    flat = gram.to(torch.float64).reshape(-1, k, k)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("awd: the Gram of the task vectors holds NaN or Inf (are the inputs finite?)")
    ws, infos = [], []
    chunk = max(1, SOLVE_CHUNK_ELEMS // (k * k))
    for start in range(0, flat.shape[0], chunk):
        w, info = _descend(flat[start : start + chunk], alpha, lr, steps, scale_free)
        ws.append(w)
        infos.append(info)
    if not infos:  # an empty batch
        _, info = _descend(flat, alpha, lr, 0, scale_free)
        infos, ws = [info], [flat.new_zeros(0, k)]
    fields = [torch.cat([getattr(i, f) for i in infos]).reshape(batch) for f in AwdInfo._FIELDS]
    return torch.cat(ws).reshape(*batch, k), AwdInfo(*fields, steps=infos[0].steps)


# ----------------------------------------------------------------------------------------------
# Full-dimensional reference.
def awd_full(
    taus: Sequence[torch.Tensor] | torch.Tensor,
    *,
    alpha: float = 0.1,
    lr: float = 0.01,
    steps: int = 300,
    scale_free: bool = False,
) -> torch.Tensor:
    """AWD by plain gradient descent on the real vectors, in float64: the spec's formulas applied to
    delta itself (validation path for :func:`awd_coefficients`; memory: K + 2 float64 copies).

    Args:
        taus: the K task vectors (same shape; a list, or a tensor with the tasks on dim 0).
        alpha, lr, steps, scale_free: as :func:`awd_coefficients` (same zero-vector rules).

    Returns:
        delta, float64, of a task vector's shape.
    """
    _check_hparams(alpha, lr, steps, scale_free)
    t = torch.stack(list(taus)) if not isinstance(taus, torch.Tensor) else taus
    shape = t.shape[1:]
    t = t.reshape(t.shape[0], -1).to(torch.float64)
    k = t.shape[0]
    sq = (t * t).sum(-1)
    tol = ZERO_RTOL * float(sq.max()) if k else 0.0
    r = float(sq.mean().sqrt()) if k else 0.0
    step, pen = (lr * r * r, alpha / r if r > 0 else 0.0) if scale_free else (lr, alpha)
    delta = torch.zeros_like(t[0])
    if k < 2:
        return delta.reshape(shape)
    pair = ~torch.eye(k, dtype=torch.bool, device=t.device)
    for _ in range(steps):
        u = t - delta
        a2 = (u * u).sum(-1)
        live = a2 > tol
        inv_a = torch.where(live, a2.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
        both = pair & live[:, None] & live[None, :]
        c = torch.where(both, (u @ u.T) * inv_a[:, None] * inv_a[None, :], 0.0)
        s = c.sign()
        # dL_O/du_k = (2/N) sum_{j != k} s_kj (u_j / (a_k a_j) - c_kj u_k / a_k^2)
        grad_u = (2.0 / (k * (k - 1))) * (
            (s * inv_a[:, None] * inv_a[None, :]) @ u - ((s * c).sum(-1) * inv_a.square())[:, None] * u
        )
        grad = -grad_u.sum(0)
        dn2 = float(delta @ delta)
        if dn2 > tol:
            grad += pen * delta / math.sqrt(dn2)
        delta = delta - step * grad
    return delta.reshape(shape)


# ----------------------------------------------------------------------------------------------
# Per-row Grams and the mixing.
def _rows(shape: torch.Size, granularity: str) -> int:
    """Problems of one tensor: rows (dim 0) under per_row for ndim >= 2, else 1."""
    return shape[0] if granularity == "per_row" and len(shape) >= 2 else 1


def _as_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, n] view (or copy) of x: the whole tensor as one row, or rows along dim 0."""
    return x.reshape(rows, x.numel() if rows == 1 else math.prod(x.shape[1:]))


def row_grams(base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """[rows, K, K] float64 Grams of the rows (dim 0; ndim < 2: one row) of tau_t, formed in float32
    as the kernels form them (float32(theta_t) - float32(theta_0)), products summed in float64."""
    finetuned = _ops.validate(base, finetuned, "awd")
    rows = _rows(base.shape, "per_row")
    k = len(finetuned)
    b = _as_rows(base, rows)
    fts = [_as_rows(x, rows) for x in finetuned]
    n = b.shape[1]
    out = torch.zeros(rows, k, k, dtype=torch.float64, device=base.device)
    chunk = max(1, CHUNK_ELEMS // max(n, 1))
    for r0 in range(0, rows if n else 0, chunk):
        r1 = min(rows, r0 + chunk)
        b32 = b[r0:r1].float()
        t = torch.stack([x[r0:r1].float() - b32 for x in fts], dim=1).double()  # [c, K, n]
        out[r0:r1] = t @ t.mT
    return out


def _mix(base, finetuned, coef, rows, fn):
    """For each chunk of rows: fn(r0, r1, b32 [c, n], taus [K] of [c, n] float32, coef [c or 1, K])."""
    b = _as_rows(base, rows)
    fts = [_as_rows(x, rows) for x in finetuned]
    n = b.shape[1]
    if rows == 1:  # one coefficient row for the whole tensor: chunk its elements instead
        b, fts, rows, n = b.reshape(-1, 1), [x.reshape(-1, 1) for x in fts], b.numel(), 1
    chunk = max(1, CHUNK_ELEMS // max(n, 1))
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        b32 = b[r0:r1].float()
        taus = [x[r0:r1].float() - b32 for x in fts]
        fn(r0, r1, b32, taus, coef if coef.shape[0] == 1 else coef[r0:r1])


def disentangled(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], w: torch.Tensor
) -> list[torch.Tensor]:
    """theta_0 + u_i = theta_i - sum_j w_j tau_j as float32 tensors of base's shape; w is [K] (one
    delta) or [rows, K] (per row, rows along dim 0)."""
    rows = 1 if w.dim() == 1 else w.shape[0]
    coef = w.reshape(rows, w.shape[-1]).to(device=base.device, dtype=torch.float32)
    outs = [torch.empty(base.shape, dtype=torch.float32, device=base.device) for _ in finetuned]
    flat = [o.view(-1) for o in outs]

    def fill(r0, r1, b32, taus, c):
        delta = sum(c[:, j : j + 1] * t for j, t in enumerate(taus))
        n = b32.shape[1]
        for f, t in zip(flat, taus, strict=True):
            f[r0 * n : r1 * n] = (b32 + (t - delta)).reshape(-1)

    _mix(base, finetuned, coef, rows, fill)
    return outs


def _row_task_arithmetic(base, finetuned, coef, scale, out_dtype):
    """theta_0 + scale * sum_j coef[r, j] tau_j for per-row coefficients coef [rows, K]; float32."""
    rows = coef.shape[0]
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    flat = out.view(-1)
    coef = coef.to(device=base.device, dtype=torch.float32)

    def fill(r0, r1, b32, taus, c):
        acc = sum(c[:, j : j + 1] * t for j, t in enumerate(taus))
        n = b32.shape[1]
        flat[r0 * n : r1 * n] = (b32 + scale * acc).reshape(-1)

    _mix(base, finetuned, coef, rows, fill)
    return out.to(out_dtype if out_dtype is not None else base.dtype)


# ----------------------------------------------------------------------------------------------
# The method.
def _check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"awd: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def resolve_then(
    then: str, then_params: Mapping, *, scale: float, seed: int, key: int | str
) -> tuple[Callable, dict]:
    """(M's per-tensor function, its keyword arguments) for ``then``; errors name the parameter."""
    from . import METHODS  # the registry imports this module

    if not isinstance(then, str) or then not in METHODS:
        valid = ", ".join(sorted(n for n in METHODS if n != "awd" and not METHODS[n].required))
        raise ValueError(f"awd: unknown then={then!r}; valid (data-free methods): {valid}")
    spec = METHODS[then]
    if spec.function is awd:
        raise ValueError("awd: then='awd' would disentangle twice; pick another method for then")
    if spec.required or spec.prepare_stats is not None:
        raise ValueError(
            f"awd: then={then!r} is not a data-free per-tensor method (it needs "
            f"{', '.join(spec.required) or 'a statistics pass'}); AWD runs data-free methods on the u_i"
        )
    accepted = set(inspect.signature(spec.function).parameters) - _NOT_THEN_PARAMS
    params = dict(spec.implied)
    for name, value in then_params.items():
        plain = name[len(_THEN_PREFIX) :] if name.startswith(_THEN_PREFIX) else name
        if plain not in accepted or plain in ("seed", "key"):
            raise ValueError(
                f"awd: then={then!r} does not take {name!r}; AWD's parameters: alpha, lr, steps, "
                f"granularity, then, scale, scale_free, coefficients, seed; {then}'s: "
                f"{', '.join(sorted(accepted - {'seed', 'key'}))} (prefix clashing names with "
                f"{_THEN_PREFIX!r}, e.g. then_alpha)"
            )
        params[plain] = value
    scale_name = "alpha" if then in _ALPHA_SCALED else "scale"
    if scale_name in accepted and scale_name not in params:
        params[scale_name] = scale
    elif scale != 1.0:
        raise ValueError(f"awd: scale={scale} and then={then!r} ({scale_name} given, or no scale to set)")
    if spec.uses_rng:
        params["seed"], params["key"] = seed, key
    return spec.function, params


def awd(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    alpha: float = 0.1,
    lr: float = 0.01,
    steps: int = 300,
    granularity: str = "global",
    then: str = "task_arithmetic",
    scale: float = 1.0,
    scale_free: bool = False,
    coefficients: torch.Tensor | None = None,
    seed: int = 0,
    key: int | str = 0,
    return_info: bool = False,
    **then_params,
) -> torch.Tensor | tuple[torch.Tensor, AwdInfo | None]:
    """Merge one tensor by AWD followed by ``then``.

    Args:
        base: theta_0.
        finetuned: theta_1..theta_K, each of base's shape.
        alpha: penalty weight on ||delta|| (default 0.1 (*)).
        lr: gradient step beta (default 0.01 (*)).
        steps: gradient steps (default 300 (*)).
        granularity: ``"global"`` (default, spec), ``"per_tensor"`` or ``"per_row"``. For one tensor
            ``global`` is ``per_tensor`` unless ``coefficients`` come from a whole-model pass (as
            :func:`mergekernels.merge` does). ``per_row``: one delta per index of dim 0; tensors with
            ndim < 2 are one row.
        then: the data-free merge run on the disentangled vectors, a name of ``METHODS`` (default
            ``"task_arithmetic"``: one fused pass with weights v_j - (sum v) w_j).
        scale: lambda, passed to ``then`` as its scale (``alpha`` for tsv_m / iso_c / iso_cts).
        scale_free: steps lr * r^2 and penalty alpha ||delta|| / r, r = RMS of ||tau_i|| (default
            False).
        coefficients: w from a model-level solve, [K] (global, per_tensor) or [rows, K] (per_row);
            skips this tensor's solve.
        seed, key: the random stream of ``then`` when it draws masks (ignored otherwise).
        return_info: also return the :class:`AwdInfo` of the solve (None with ``coefficients``).
        **then_params: ``then``'s own parameters (``weights``, ``density``, ``drop``, ``out_dtype``,
            ...); names that clash with AWD's take a ``then_`` prefix (``then_alpha``, ``then_lr``).

    Returns:
        The merged tensor (base's dtype unless ``out_dtype``), and the info with ``return_info``.
    """
    _check_hparams(alpha, lr, steps, scale_free)
    _check_granularity(granularity)
    function, params = resolve_then(then, then_params, scale=scale, seed=seed, key=key)
    finetuned = _ops.validate(base, finetuned, "awd")
    k = len(finetuned)
    rows = _rows(base.shape, granularity)
    info = None
    if coefficients is None:
        if granularity == "per_row":
            gram = row_grams(base, finetuned)
        else:
            gram = _ops.tv_stats(base, finetuned)[0].cpu()
        w, info = awd_coefficients(gram, alpha=alpha, lr=lr, steps=steps, scale_free=scale_free)
    else:
        if not isinstance(coefficients, torch.Tensor):
            coefficients = torch.as_tensor(coefficients, dtype=torch.float64)
        want = (rows, k) if rows > 1 else (k,)
        if coefficients.numel() != rows * k or (rows > 1 and tuple(coefficients.shape) != want):
            raise ValueError(
                f"awd: coefficients has shape {tuple(coefficients.shape)}; granularity={granularity!r} "
                f"with {k} models and a tensor of shape {tuple(base.shape)} needs {list(want)}"
            )
        w = coefficients.to(torch.float64)
    merged = _merge(base, finetuned, w.reshape(rows, k), function, params)
    return (merged, info) if return_info else merged


def _merge(base, finetuned, w, function, params):
    """Run ``function`` on the disentangled vectors given w [rows, K] (rows = 1: one delta)."""
    if base.numel() == 0 or not bool(w.any()):  # delta = 0: M on the task vectors themselves
        return function(base, finetuned, **params)
    if function is task_arithmetic:
        params = dict(params)
        v = torch.tensor(_ops.per_task(params.pop("weights", None), len(finetuned), "weights", 1.0))
        total = float(v.sum())
        coef = v.to(torch.float64) - total * w.cpu()
        if params.pop("normalize", False):
            if total == 0:
                raise ValueError("awd: normalize=True needs weights that do not sum to 0")
            coef = coef / total
        if coef.shape[0] == 1:
            return task_arithmetic(base, finetuned, weights=coef[0].tolist(), **params)
        return _row_task_arithmetic(base, finetuned, coef, params.get("scale", 1.0), params.get("out_dtype"))
    return function(base, disentangled(base, finetuned, w.reshape(-1) if w.shape[0] == 1 else w), **params)


# ----------------------------------------------------------------------------------------------
# Model-level statistics pass (MethodSpec.prepare_stats).
MODEL_KEY = "awd"  # the diagnostics entry of the whole model


def prepare_stats(
    read: Callable[[str], tuple[torch.Tensor, list[torch.Tensor]]], names: Sequence[str], params: dict
) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """AWD's pass over the merged tensors before the merge (one read of each), and one batched solve.

    Args:
        read: name -> (base, finetuned) on the compute device.
        names: the tensors to merge, in order.
        params: the model-level parameters of :func:`awd`.

    Returns:
        (params for every tensor, {name: params for that tensor}, diagnostics). ``global``: one Gram
        summed over the tensors, one solve, ``coefficients`` [K] for all; ``per_tensor`` /
        ``per_row``: every tensor's Grams (rows) solved as one batch, each tensor gets its slice.
        Diagnostics: ``{"awd": summary of the whole model}`` plus, for per_tensor / per_row, one summary
        per tensor (see :meth:`AwdInfo.summary`).
    """
    granularity = _check_granularity(params.get("granularity", "global"))
    defaults = {n: p.default for n, p in inspect.signature(awd).parameters.items()}
    hp = {n: params.get(n, defaults[n]) for n in ("alpha", "lr", "steps", "scale_free")}
    _check_hparams(**hp)
    then_params = {n: v for n, v in params.items() if n not in defaults}
    resolve_then(
        params.get("then", "task_arithmetic"), then_params, scale=params.get("scale", 1.0), seed=0, key=0
    )
    if params.get("coefficients") is not None:
        raise ValueError("awd: coefficients are computed by the model-level pass; do not pass them to merge")
    grams, sizes = [], []
    for name in names:
        b, fts = read(name)
        g = row_grams(b, fts) if granularity == "per_row" else _ops.tv_stats(b, fts)[0].unsqueeze(0)
        grams.append(g.cpu() if granularity != "per_row" else g)
        sizes.append(g.shape[0])
    if not names:
        return {}, {}, {}
    if granularity == "global":
        w, info = awd_coefficients(sum(grams)[0], **hp)
        return {"coefficients": w}, {}, {MODEL_KEY: info.summary()}
    w, info = awd_coefficients(torch.cat(grams), **hp)
    per_tensor, diagnostics, start = {}, {MODEL_KEY: info.summary()}, 0
    for name, size in zip(names, sizes, strict=True):
        part = w[start : start + size]
        per_tensor[name] = {"coefficients": part if granularity == "per_row" else part[0]}
        diagnostics[name] = info.select(slice(start, start + size)).summary()
        start += size
    return {}, per_tensor, diagnostics
