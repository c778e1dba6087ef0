"""Merge methods, one file each, composed from the ops in :mod:`mergekernels._ops`.

``METHODS`` maps every accepted method name (ours and mergekit's) to the per-tensor function and
the keyword arguments the name implies. ``kind`` tells the model-level drivers (``mk.merge`` and
the checkpoint engine) how a method consumes tensors: ``elementwise`` methods may be read in row
chunks (``chunks``), after a ``prepass`` over the chunks where a per-tensor quantity is needed (TIES'
threshold, DARE's L1 norms); ``needs_stats`` methods run ``prepare_stats`` over the whole model
first (AWD's Grams) or take precomputed data (APL's scores); ``matrix`` methods need whole 2-D
tensors and run same-shape tensors as one batch [L, m, n] through ``batched`` (other tensors go
through ``function``, which gives them the mean of the task vectors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..stats import gram_prepass
from . import ace as _ace
from . import apl
from .ace import AceInfo, ace, ace_batched
from .arcee_fusion import arcee_fusion, fusion_prepass
from .awd import AwdInfo, awd, awd_coefficients
from .awd import prepare_stats as _awd_stats
from .breadcrumbs import breadcrumbs, breadcrumbs_prepass
from .dare import dare, dare_prepass
from .della import della
from .iso import iso_c, iso_c_batched, iso_cts, iso_cts_batched
from .karcher import karcher
from .model_stock import model_stock
from .multislerp import multislerp
from .nearswap import nearswap
from .nuslerp import nuslerp
from .passthrough import passthrough
from .ram import ram, ramplus_prepass, ramplus_tl
from .regmean import collect_input_grams, regmean, regmean_batched
from .sce import sce, sce_prepass
from .slerp import slerp
from .ta import task_arithmetic
from .ties import ties, ties_prepass
from .tsv import tsv_m, tsv_m_batched
from .wudi import wudi, wudi_batched


@dataclass(frozen=True)
class MethodSpec:
    function: Callable
    implied: dict = field(default_factory=dict)
    kind: str = "elementwise"
    uses_rng: bool = False
    # matrix methods: batched(base [L, m, n], finetuned, names, **params) -> (merged, per-layer
    # diagnostics or None); layer_bytes(m, n, experts, dtype_bytes) bounds one layer's peak memory.
    batched: Callable | None = None
    layer_bytes: Callable | None = None
    # matrix methods: which 2-D tensors take the matrix path (default all), and the parameters only
    # that path takes (dropped for the others).
    selects: Callable[[str, dict], bool] | None = None
    matrix_params: tuple[str, ...] = ()
    required: tuple[str, ...] = ()  # model-level parameters without a default
    # How the checkpoint engine may split one tensor: "" (whole tensors only), "elements" (any row
    # range; random methods take the element offset) or "rows" (blocks of whole rows, ndim >= 2); or
    # a function of the tensor's parameters giving one of those (options that change it).
    chunks: str | Callable[[dict], str] = ""
    # whether a chunk's call takes ``element_offset``, its first element's index in the whole tensor
    # (random masks and exact-k tie cuts go by it; so does SCE's tie cut)
    offsets: bool = False
    # prepass(num_tasks, numel, params, device) -> None or an object with ``passes``,
    # ``update(pass, base, finetuned, element_offset)``, ``end_pass(pass)`` and ``params()``: what a
    # chunked tensor needs from all of its chunks first (a per-tensor threshold, DARE's L1 norms).
    prepass: Callable | None = None
    # needs_stats methods: prepare_stats(read, names, params) -> (params for every tensor, {name:
    # params for that tensor}, diagnostics), run once over the merged tensors before the merge
    # (read(name) -> (base, finetuned) on the compute device). AWD: the Gram pass and its solve.
    prepare_stats: Callable | None = None
    # Methods that read their inputs only in the fused kernels, which take bfloat16 / float16 /
    # float32 as stored, compute in float32 and write any out_dtype, and which report NaN / Inf
    # inputs (``nonfinite``): the engine hands them the stored tensors (no widening copy for
    # ``dtype: float32``), asks for the output dtype directly and skips its own NaN / Inf pass.
    fused_io: bool = False

    def chunks_for(self, params: dict) -> str:
        """How a tensor with these parameters may be split (see ``chunks``)."""
        return self.chunks(params) if callable(self.chunks) else self.chunks


def _generic_layer_bytes(m: int, n: int, experts: int, dtype_bytes: int) -> int:
    """Peak memory of one layer of an SVD / closed-form method (an upper estimate): the inputs and
    their stacked copies, float32 task vectors and factors, and the n x n float64 systems."""
    return (experts + 1) * m * n * dtype_bytes * 2 + (3 * experts + 6) * m * n * 4 + 4 * n * n * 8


def _without_diagnostics(function: Callable) -> Callable:
    def run(base, finetuned, names, **params):
        return function(base, finetuned, **params), None

    return run


def _ace_run(base, finetuned, names, **params):
    merged, info = ace_batched(base, finetuned, **params)
    return merged, [info.layer(i) for i in range(len(names))]


def _wudi_run(base, finetuned, names, **params):
    merged, loss = wudi_batched(base, finetuned, return_loss=True, **params)
    return merged, [{"loss": float(x)} for x in loss]


def _regmean_run(base, finetuned, names, *, grams, **params):
    stacked = [torch.stack([grams[name][t] for name in names]) for t in range(len(finetuned))]
    return regmean_batched(base, finetuned, stacked, **params), None


def _matrix(
    function: Callable, run: Callable, layer_bytes: Callable = _generic_layer_bytes, **extra
) -> MethodSpec:
    return MethodSpec(function, kind="matrix", batched=run, layer_bytes=layer_bytes, **extra)


def _gram_prepass(points: Callable[[dict], bool]) -> Callable:
    """The pre-pass of a method that combines whole tensors by Gram coefficients: the Gram of the
    points (``points(params)``) or of the task vectors, unless the call does not need one."""

    def prepass(num_tasks: int, numel: int, params: dict, device: torch.device):
        if params.get("gram") is not None or not params.get("flatten", True) or params.get("filter_wise"):
            return None
        return gram_prepass(points(params))

    return prepass


def _nuslerp_chunks(params: dict) -> str:
    if params.get("flatten", True):
        return "elements"
    return "" if params.get("row_wise") else "rows"  # columns need whole tensors


_gram_of_points = {"chunks": "elements", "prepass": _gram_prepass(lambda p: True)}
_gram_from_origin = {"chunks": "elements", "prepass": _gram_prepass(lambda p: not p.get("origin", True))}
_dare_chunks = {"chunks": "elements", "prepass": dare_prepass}
_band_chunks = {"chunks": "elements", "prepass": breadcrumbs_prepass}

METHODS: dict[str, MethodSpec] = {
    "task_arithmetic": MethodSpec(task_arithmetic, chunks="elements", fused_io=True),
    "linear": MethodSpec(task_arithmetic, {"normalize": True}, chunks="elements", fused_io=True),
    "ties": MethodSpec(ties, chunks="elements", prepass=ties_prepass, fused_io=True),
    "dare": MethodSpec(dare, uses_rng=True, **_dare_chunks, fused_io=True),
    "dare_linear": MethodSpec(dare, {"consensus": None}, uses_rng=True, **_dare_chunks, fused_io=True),
    "dare_ties": MethodSpec(dare, {"consensus": "ties"}, uses_rng=True, **_dare_chunks, fused_io=True),
    "breadcrumbs": MethodSpec(breadcrumbs, {"consensus": None}, **_band_chunks, fused_io=True),
    "breadcrumbs_ties": MethodSpec(breadcrumbs, {"consensus": "ties"}, **_band_chunks, fused_io=True),
    "della": MethodSpec(della, {"consensus": "ties"}, uses_rng=True, chunks="rows", fused_io=True),
    "della_linear": MethodSpec(
        della, {"consensus": None, "merge": "sum"}, uses_rng=True, chunks="rows", fused_io=True
    ),
    "ace": _matrix(ace, _ace_run, _ace.layer_bytes),
    "tsv_m": _matrix(tsv_m, _without_diagnostics(tsv_m_batched)),
    "iso_c": _matrix(iso_c, _without_diagnostics(iso_c_batched)),
    "iso_cts": _matrix(iso_cts, _without_diagnostics(iso_cts_batched)),
    "wudi": _matrix(wudi, _wudi_run),
    "regmean": _matrix(
        regmean,
        _regmean_run,
        selects=lambda name, params: name in params["grams"],
        matrix_params=("grams",),
        required=("grams",),
    ),
    "passthrough": MethodSpec(passthrough, chunks="elements"),
    "slerp": MethodSpec(slerp, **_gram_of_points),
    "model_stock": MethodSpec(
        model_stock,
        chunks=lambda p: "rows" if p.get("filter_wise") else "elements",
        prepass=_gram_prepass(lambda p: False),
    ),
    "nuslerp": MethodSpec(nuslerp, chunks=_nuslerp_chunks, prepass=_gram_from_origin["prepass"]),
    "multislerp": MethodSpec(multislerp, **_gram_from_origin),
    "karcher": MethodSpec(karcher, **_gram_of_points),
    "sce": MethodSpec(sce, chunks="elements", prepass=sce_prepass, offsets=True),
    "arcee_fusion": MethodSpec(arcee_fusion, chunks="rows", prepass=fusion_prepass),
    "ram": MethodSpec(ram, chunks="elements"),
    "ramplus_tl": MethodSpec(ramplus_tl, chunks="elements", prepass=ramplus_prepass),
    "nearswap": MethodSpec(nearswap, chunks="elements", required=("t",)),
    "apl": MethodSpec(apl.apl, kind="needs_stats", uses_rng=True, required=("scores",)),
    "awd": MethodSpec(awd, kind="needs_stats", uses_rng=True, prepare_stats=_awd_stats),
}

__all__ = [
    "METHODS",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
    "sce",
    "AceInfo",
    "MethodSpec",
    "ace",
    "ace_batched",
    "apl",
    "AwdInfo",
    "awd",
    "awd_coefficients",
    "breadcrumbs",
    "collect_input_grams",
    "dare",
    "della",
    "iso_c",
    "iso_c_batched",
    "iso_cts",
    "iso_cts_batched",
    "karcher",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "regmean",
    "regmean_batched",
    "slerp",
    "task_arithmetic",
    "ties",
    "tsv_m",
    "tsv_m_batched",
    "wudi",
    "wudi_batched",
]
