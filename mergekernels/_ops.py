"""The Python face of ``torch.ops.mergekernels``: fake kernels, argument checks, thin wrappers.

Nothing else in the package touches ``torch.ops.mergekernels`` directly. Schemas are declared once
in ``csrc/ops.cpp``; CPU and CUDA implementations are registered by the compiled extension.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import build, devices

try:
    from . import _C  # loading the extension registers the ops
except ImportError as exc:
    raise ImportError(build.load_error(exc)) from exc
build.warn_if_mismatched()

_lib = torch.ops.mergekernels


def install_input_fault_handler(prefix: str) -> None:
    """Make a SIGBUS from a file map (an input truncated while the merge reads it through its map)
    print ``prefix``, the file and what happened, and exit with status 2. For the merge command:
    a library imported into someone else's program leaves that program's signals alone."""
    _C.install_input_fault_handler(prefix)


# Mirrors of the enums in csrc/common/merge_element.h.
SPARSIFY = {"none": 0, "trim": 1, "band": 2, "drop": 3, "clip": 4}
KEEP_SOURCE = {"constant": 0, "row": 1, "rank": 2}
REDUCE = {"sum": 0, "mean": 1, "weighted": 2, "active": 3}
MAX_EXPERTS = 64
LEVEL0_BINS = 1 << 16
LEVEL1_BITS = 15
LEVEL1_BINS = 1 << LEVEL1_BITS
EXPONENT_BINS = 256
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, for torch.compile / FakeTensor tracing.
@torch.library.register_fake("mergekernels::tv_stats")
def _tv_stats_fake(base, finetuned, histogram):
    k, like = len(finetuned), base if base is not None else finetuned[0]
    return (
        like.new_empty((k, k), dtype=torch.float64),
        like.new_empty((k,), dtype=torch.float32),
        like.new_empty((k,), dtype=torch.int64),
        like.new_empty((2,), dtype=torch.int64),
        like.new_empty((k, EXPONENT_BINS if histogram else 0), dtype=torch.int64),
    )


@torch.library.register_fake("mergekernels::element_variance")
def _element_variance_fake(base, finetuned):
    return base.new_empty(base.shape, dtype=torch.float32)


@torch.library.register_fake("mergekernels::magnitude_histogram_")
def _magnitude_histogram_fake(hist, base, finetuned, level, prefix):
    return None


@torch.library.register_fake("mergekernels::fused_merge")
def _fused_merge_fake(
    base,
    finetuned,
    weights,
    scale,
    reduce,
    ties,
    weighted_election,
    sparsify,
    thresholds,
    keep_source,
    keep,
    step,
    post,
    rescale_inverse,
    row_keep,
    ranks,
    seed,
    key,
    element_offset,
    row_len,
    out_dtype=None,
    tie_cuts=(),
    base_scale=None,
    nonfinite=None,
):
    # The schema's parameters by name, so keyword calls work as well as positional ones.
    return base.new_empty(base.shape, dtype=out_dtype if out_dtype is not None else base.dtype)


@torch.library.register_fake("mergekernels::fused_merge.out")
def _fused_merge_out_fake(*args, out, **kwargs):
    return None


@torch.library.register_fake("mergekernels::masked_drop")
def _masked_drop_fake(base, *args):
    return base.new_empty(base.shape, dtype=torch.float32)


@torch.library.register_fake("mergekernels::row_ranks")
def _row_ranks_fake(base, finetuned, row_len):
    return base.new_empty(base.shape, dtype=torch.int32)


@torch.library.register_fake("mergekernels::drop_l1")
def _drop_l1_fake(base, finetuned, *args):
    return base.new_empty((2, len(finetuned)), dtype=torch.float64)


@torch.library.register_fake("mergekernels::covariance_moments")
def _covariance_moments_fake(base, finetuned):
    k, (layers, m, n) = len(finetuned), base.shape
    f32, f64 = torch.float32, torch.float64
    return (
        base.new_empty((layers, k, m, n), dtype=f32),
        base.new_empty((k, layers, n), dtype=f32),
        base.new_empty((k, layers), dtype=f64),
        base.new_empty((k, layers), dtype=f64),
    )


@torch.library.register_fake("mergekernels::covariance_assemble")
def _covariance_assemble_fake(gram_sum, ridge, prior_scale):
    f64 = torch.float64
    return gram_sum.new_empty(gram_sum.shape, dtype=f64), gram_sum.new_empty(gram_sum.shape[:2], dtype=f64)


@torch.library.register_fake("mergekernels::sym_gram")
def _sym_gram_fake(x):
    n = x.shape[-1]
    return x.new_empty((*x.shape[:-2], n, n))


@torch.library.register_fake("mergekernels::spd_solve")
def _spd_solve_fake(b, r, c, what):
    return b.new_empty(b.shape), b.new_empty(b.shape[:-2], dtype=torch.bool)


@torch.library.register_fake("mergekernels::ace_merge")
def _ace_merge_fake(base, finetuned, *args):
    layers = base.shape[0]
    flags = base.new_empty((layers,), dtype=torch.bool)
    return (
        base.new_empty(base.shape),
        flags,
        base.new_empty((layers,), dtype=torch.float64),
        base.new_empty((len(finetuned), layers), dtype=torch.float64),
        flags.clone(),
        flags.clone(),
    )


# ----------------------------------------------------------------------------------------------
# Argument checks shared by every op wrapper.
def tensor_key(name: str | int) -> int:
    """Stable signed 64-bit key of a tensor name: the first 8 bytes (little endian) of its BLAKE2b
    digest. Integers pass through. Masks are keyed by it, so they do not depend on tensor order."""
    if isinstance(name, int):
        if not -(2**63) <= name < 2**64:
            raise ValueError(f"tensor key {name} does not fit in 64 bits")
        return name - 2**64 if name >= 2**63 else name
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _signed64(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    return tensor_key(value)


@dataclass
class Prepared:
    """Inputs made ready for a kernel: one float dtype the kernels support, one device."""

    base: torch.Tensor
    finetuned: list[torch.Tensor]
    out_dtype: torch.dtype  # dtype the caller gets back


def validate(base: torch.Tensor, finetuned: Sequence[torch.Tensor], op: str) -> list[torch.Tensor]:
    """Check base/finetuned (tensors, floating point, one shape, one device); returns finetuned as a
    list. Errors name the op and the offending argument."""
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"{op}: base must be a torch.Tensor, got {type(base).__name__}")
    if isinstance(finetuned, torch.Tensor):
        raise TypeError(f"{op}: finetuned must be a sequence of tensors, not a single tensor")
    finetuned = list(finetuned)
    if not finetuned:
        raise ValueError(f"{op}: finetuned is empty; pass at least one fine-tuned tensor")
    if not base.is_floating_point():
        raise TypeError(f"{op}: base has dtype {base.dtype}; merging needs floating-point tensors")
    for t, x in enumerate(finetuned):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: finetuned[{t}] must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{op}: finetuned[{t}] has dtype {x.dtype}; merging needs floating-point tensors")
        if x.shape != base.shape:
            raise ValueError(
                f"{op}: finetuned[{t}] has shape {tuple(x.shape)} but base has {tuple(base.shape)}"
            )
        if not devices.same(x.device, base.device):
            raise ValueError(f"{op}: finetuned[{t}] is on {x.device} but base is on {base.device}")
    return finetuned


def prepare(base: torch.Tensor, finetuned: Sequence[torch.Tensor], op: str) -> Prepared:
    """Validate base/finetuned and cast them to one kernel dtype (promoting mixed dtypes; float64
    is computed in float32 and returned as float64)."""
    finetuned = validate(base, finetuned, op)
    if len(finetuned) > MAX_EXPERTS:
        raise ValueError(f"{op}: at most {MAX_EXPERTS} fine-tuned tensors per call, got {len(finetuned)}")
    dtype = base.dtype
    for x in finetuned:
        dtype = torch.promote_types(dtype, x.dtype)
    kernel_dtype = dtype if dtype in _KERNEL_DTYPES else torch.float32
    base_k = base.to(kernel_dtype)
    ft_k = [x.to(kernel_dtype) for x in finetuned]
    return Prepared(base_k, ft_k, base.dtype)


def _check_out_dtype(out_dtype: torch.dtype | None, default: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(dtype the kernel writes, dtype returned to the caller)."""
    want = default if out_dtype is None else out_dtype
    if not want.is_floating_point:
        raise TypeError(f"out_dtype must be a floating-point dtype, got {want}")
    return (want if want in _KERNEL_DTYPES else torch.float32), want


def per_task(
    value: float | Sequence[float] | torch.Tensor | None, k: int, name: str, default: float | None = None
) -> list[float]:
    """A scalar or per-model list -> a list of k floats."""
    if value is None:
        if default is None:
            raise ValueError(f"{name} is required")
        return [float(default)] * k
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (int, float)):
        return [float(value)] * k
    values = [float(v) for v in value]
    if len(values) != k:
        raise ValueError(f"{name} has {len(values)} entries for {k} fine-tuned models")
    return values


# ----------------------------------------------------------------------------------------------
# Thin wrappers.
def tv_stats(base: torch.Tensor | None, finetuned: Sequence[torch.Tensor], histogram: bool = False):
    """The fused statistics of tau_t = finetuned_t - base; with ``base=None``, of the tensors
    themselves (their Gram matrix, absolute maxima, ...)."""
    if base is None:
        finetuned = list(finetuned)
        if not finetuned:
            raise ValueError("task_vector_stats: no tensors given")
        p = prepare(finetuned[0], finetuned, "task_vector_stats")
        return _lib.tv_stats(None, p.finetuned, histogram)
    p = prepare(base, finetuned, "task_vector_stats")
    return _lib.tv_stats(p.base, p.finetuned, histogram)


def element_variance(base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per element, the population variance of the K task vectors (float32 of base's shape): the
    float32 tau_t in float64 Welford order, so equal to torch.var(stack(tau), 0, unbiased=False)."""
    p = prepare(base, finetuned, "element_variance")
    return _lib.element_variance(p.base, p.finetuned)


def magnitude_histogram_(
    hist: torch.Tensor, prepared: Prepared, level: int, prefix: torch.Tensor | None
) -> None:
    _lib.magnitude_histogram_(hist, prepared.base, prepared.finetuned, level, prefix)


def fused_merge(
    prepared: Prepared,
    *,
    weights: Sequence[float],
    scale: float = 1.0,
    reduce: str = "sum",
    ties: bool = False,
    weighted_election: bool = False,
    sparsify: str = "none",
    thresholds: torch.Tensor | None = None,
    keep_source: str = "constant",
    keep: Sequence[float] = (),
    step: Sequence[float] = (),
    post: Sequence[float] = (),
    rescale_inverse: bool = True,
    row_keep: torch.Tensor | None = None,
    ranks: Sequence[torch.Tensor] = (),
    seed: int = 0,
    key: int | str = 0,
    element_offset: int = 0,
    row_len: int = 1,
    out_dtype: torch.dtype | None = None,
    tie_cuts: Sequence[int] = (),
    base_scale: float | None = None,
    nonfinite: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One fused pass: base + scale * reduce_t(sparsify(tau_t)). See csrc/common/merge_element.h.

    ``tie_cuts`` (2K element indices, or empty): which entries equal to a trim / band threshold are
    kept, for an exact count (see :func:`mergekernels.selection.tie_cuts`). With ``base_scale`` the
    pass combines the inputs themselves: base_scale * base + scale * reduce_t(w_t * finetuned_t).
    ``nonfinite`` (int32 [K + 1] on the inputs' device, or None): set to 1 at 0 if the base and at
    1 + t if fine-tuned tensor t holds a NaN or an Inf; the pass reads every value anyway, so this
    check costs no second read. ``out`` (base's shape, contiguous, float32 / float16 / bfloat16 on
    base's device): written in place and returned (its dtype is the output dtype)."""
    if reduce not in REDUCE:
        raise ValueError(f"merge/reduce must be one of {sorted(REDUCE)}, got {reduce!r}")
    if out is not None:
        _check_out(out, prepared.base, out_dtype)
        out_dtype = out.dtype
    kernel_dtype, want = _check_out_dtype(out_dtype, prepared.out_dtype)
    op = _lib.fused_merge.default if out is None else functools.partial(_lib.fused_merge.out, out=out)
    result = op(
        prepared.base,
        prepared.finetuned,
        list(weights),
        float(scale),
        REDUCE[reduce],
        bool(ties),
        bool(weighted_election),
        SPARSIFY[sparsify],
        thresholds,
        KEEP_SOURCE[keep_source],
        list(keep),
        list(step),
        list(post),
        bool(rescale_inverse),
        row_keep,
        list(ranks),
        _signed64(seed, "seed"),
        tensor_key(key),
        int(element_offset),
        int(row_len),
        kernel_dtype,
        [int(x) for x in tie_cuts],
        None if base_scale is None else float(base_scale),
        nonfinite,
    )
    merged = out if out is not None else result  # the out= overload returns nothing
    return merged if merged.dtype == want else merged.to(want)


def _check_out(out: torch.Tensor, base: torch.Tensor, out_dtype: torch.dtype | None) -> None:
    """A fused merge's ``out``: base's shape and device, contiguous, a kernel dtype (= out_dtype)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"fused_merge: out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != base.shape or not devices.same(out.device, base.device) or not out.is_contiguous():
        raise ValueError(
            f"fused_merge: out must be a contiguous tensor of shape {tuple(base.shape)} on {base.device}, "
            f"got shape {tuple(out.shape)} on {out.device}"
            + ("" if out.is_contiguous() else " (not contiguous)")
        )
    if out.dtype not in _KERNEL_DTYPES or (out_dtype is not None and out_dtype != out.dtype):
        raise TypeError(
            f"fused_merge: out has dtype {out.dtype}; expected {out_dtype or 'float32/float16/bfloat16'}"
        )


def masked_drop(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    *,
    expert: int,
    keep: float,
    seed: int = 0,
    key: int | str = 0,
    rescale: bool = True,
    element_offset: int = 0,
    keep_source: str = "constant",
    row_keep: torch.Tensor | None = None,
    rank: torch.Tensor | None = None,
    step: float = 0.0,
    row_len: int = 1,
) -> torch.Tensor:
    """The randomly dropped task vector of one expert, float32 (kept entries divided by their keep
    probability when rescale is true). Bits depend only on (seed, key, expert, element index).

    keep_source: ``"constant"`` (probability ``keep``), ``"row"`` (``row_keep`` of shape [1, rows],
    rows of ``row_len`` elements counted from global element 0) or ``"rank"`` (``keep + step * rank``
    with ``rank`` an int32 tensor of base's size)."""
    p = prepare(base, [finetuned], "masked_drop")
    return _lib.masked_drop(
        p.base,
        p.finetuned[0],
        int(expert),
        SPARSIFY["drop"],
        None,
        KEEP_SOURCE[keep_source],
        float(keep),
        float(step),
        1.0,
        bool(rescale),
        row_keep,
        rank,
        _signed64(seed, "seed"),
        tensor_key(key),
        int(element_offset),
        int(row_len),
    )


def drop_l1(
    prepared: Prepared, keep: Sequence[float], seed: int, key: int | str, element_offset: int = 0
) -> torch.Tensor:
    return _lib.drop_l1(
        prepared.base,
        prepared.finetuned,
        list(keep),
        _signed64(seed, "seed"),
        tensor_key(key),
        int(element_offset),
    )


def row_ranks(base: torch.Tensor, finetuned: torch.Tensor, row_len: int) -> torch.Tensor:
    """Ascending rank of |finetuned - base| within each row of row_len elements (ties by position),
    int32 of base's shape."""
    p = prepare(base, [finetuned], "row_ranks")
    return _lib.row_ranks(p.base, p.finetuned[0], int(row_len))


# ----------------------------------------------------------------------------------------------
# Closed-form covariance machinery (csrc/covariance.h), batched over a leading layer dimension.
def _check_float(x: torch.Tensor, name: str, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be float32 or float64, got {x.dtype}")


def sym_gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x for x [..., m, n] (float32 or float64), exactly symmetric, computed as block rows of
    the lower triangle (about half the work of a full product)."""
    _check_float(x, "x", "sym_gram")
    if x.dim() < 2:
        raise ValueError(f"sym_gram: x must have at least 2 dimensions, got shape {tuple(x.shape)}")
    return _lib.sym_gram(x)


def spd_solve(
    b: torch.Tensor,
    r: torch.Tensor,
    c: torch.Tensor | None = None,
    *,
    what: str = "spd_solve",
    warn: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """X = b (r + 1 c^T)^{-1} (c None: b r^{-1}) for b [..., m, n], r [..., n, n] symmetric positive
    definite and c [..., n], computed in float64: a Cholesky factorisation of r, two triangular
    solves and the Sherman-Morrison correction for the rank-one term (r + 1 c^T is not symmetric).

    Returns (X in b's dtype, fallback [...] bool). Batch entries whose Cholesky fails, or whose
    rank-one update is singular, are solved with the pseudo-inverse of the whole matrix instead, with a
    warning naming ``what`` (``warn=False``: for callers that handle the flagged systems themselves)."""
    _check_float(b, "b", what)
    _check_float(r, "r", what)
    if c is not None:
        _check_float(c, "c", what)
    x, fallback = _lib.spd_solve(b, r, c, what)
    if warn:
        warn_fallback(fallback, what)
    return x, fallback


def warn_fallback(fallback: torch.Tensor, what: str) -> None:
    """Warn when some systems of a batched closed-form solve needed the pseudo-inverse."""
    if fallback.numel() and bool(fallback.any()):
        warnings.warn(
            f"{what}: the Cholesky solve failed for {int(fallback.sum())} of {fallback.numel()} systems (not "
            "positive definite in float64, or a singular rank-one update); used the pseudo-inverse for them",
            RuntimeWarning,
            stacklevel=3,
        )


def covariance_moments(base: torch.Tensor, finetuned: Sequence[torch.Tensor]):
    """One pass over [L, m, n] inputs: (centred task vectors [L, T, m, n] float32, column means
    [T, L, n] float32, ||tau_t||_F^2 [T, L] float64, ||centred_t||_F^2 [T, L] float64)."""
    p = prepare(base, finetuned, "covariance_moments")
    return _lib.covariance_moments(p.base, p.finetuned)


def ace_merge(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    eps: float,
    tau: float,
    k_frac: float,
    scale: float,
    gate: int,
    rank_rtol: float,
):
    """ACE-Merging of L same-shape layers [L, m, n]; see mergekernels.methods.ace.ace_batched."""
    p = prepare(base, finetuned, "ace")
    return _lib.ace_merge(
        p.base, p.finetuned, float(eps), float(tau), float(k_frac), float(scale), int(gate), float(rank_rtol)
    )


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mergekernels::fused_merge", "CUDA")
