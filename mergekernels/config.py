"""YAML merge configurations for ``mergekernels merge CONFIG.yml OUT_DIR``.

The format is mergekit's, so a mergekit configuration of a method both tools have runs unchanged
and gives mergekit's result; our own methods and parameter names use the same layout::

    merge_method: ties              # a name of mergekernels.methods.METHODS
    base_model: ./base              # paths are relative to this file's directory
    models:
      - model: ./math               # or just "- ./math"
        parameters: {weight: 1.0, density: 0.5}
      - model: ./code
        parameters: {weight: 0.5, density: 0.3}
    parameters: {normalize: true, lambda: 1.0}   # global parameters
    dtype: bfloat16                 # compute dtype (float32, bfloat16, float16)
    out_dtype: bfloat16             # output dtype (default: dtype if given, else the base's dtype)
    tokenizer_source: union         # base | union | a model: the output's vocabulary (mergekit's rules)
    chat_template: chatml           # auto | alpaca | chatml | exaone | llama3 | mistral | a Jinja template
    exclude: ["*.embed_tokens.*"]   # ours: glob patterns of tensors kept at the base's value
    options: {seed: 0, shard_size: 5GB, threshold_scope: tensor}   # ours: engine options
    dialect: mergekit               # ours: which parameter names apply (see below)

or, instead of ``models``, mergekit's ``slices`` / ``modules`` (below).

Dialects. ``linear``, ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``,
``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear`` and ``passthrough`` are
mergekit's names as well as ours; for them the default dialect is ``mergekit``: mergekit's parameter
names, defaults and semantics. Writing ``dialect: mergekernels`` selects our parameter names and
defaults instead (those of the method's function signature, e.g. ``ties``: ``density``, ``weights``,
``scale``, ``merge``, ``weighted_election``). Our other methods (``dare``, ``ace``, ``tsv_m``,
``iso_c``, ``iso_cts``, ``wudi``, ``regmean``) exist only in the ``mergekernels`` dialect.

mergekit -> ours (mergekit's defaults are written into ``MergeConfig.params`` so that our own
defaults never leak into a mergekit merge):

- ``weight`` -> ``weights`` (mergekit requires it: ``linear`` refuses a model without one, the
  task-vector methods default it to 1), ``lambda`` -> ``scale``
  (default 1), ``int8_mask`` accepted and ignored (it only changes mergekit's memory use).
- ``linear``: the weighted average sum_m w_m theta_m / sum_m w_m of the listed models
  (``normalize: true``, mergekit's default). Without ``base_model`` the first model serves as the
  base theta_0 (exact: its task vector is 0) and keeps its weight in the average, as does a base
  listed among ``models``: then the merge is theta_0 + (1/W) sum_t w_t tau_t with W the total weight
  (``normalize: false``, ``scale: 1/W``). ``normalize: false`` (the plain weighted sum) is accepted
  only when the weights sum to 1; otherwise it is not a merge of task vectors.
- ``task_arithmetic``: ``normalize`` (default false) -> ``normalize``; ``density`` and ``rescale`` are
  accepted and have no effect, as in mergekit.
- ``ties``: ``density`` (fraction kept, default 1 = no trim) -> ``density``; the sign is elected from
  the weighted trimmed task vectors -> ``weighted_election: true``; ``normalize`` (default true) ->
  ``merge: weighted`` (false -> ``merge: sum``).
- ``dare_ties`` / ``dare_linear``: ``density`` is the fraction KEPT -> ``drop = 1 - density``;
  ``rescale`` (default true) -> ``rescale: l1``: mergekit rescales the kept entries so the L1 norm of
  each task vector is unchanged (its ``RescaleNorm.l1``), not by 1/(1-p); false -> no rescale.
  ``normalize`` (default false) -> ``merge: weighted`` / ``sum``; dare_ties elects weighted signs.
- ``breadcrumbs`` / ``breadcrumbs_ties``: ``density`` (default 1), ``gamma`` (default 0.01); a model
  with density 1 is not sparsified (gamma ignored, as in mergekit); ``normalize`` (default false).
- ``della`` / ``della_linear``: ``density`` (default 1), ``epsilon`` (default 0.15), ``lambda``;
  ``normalize`` default true for della, false for della_linear.

The rest of mergekit's language (see the README's table of mergekit features):

- parameter values may be per-layer gradients and name filters (:mod:`mergekernels.parameters`),
  resolved per tensor with mergekit's precedence: slice source > slice > module > global;
- ``slices`` (``sources`` with ``layer_range``, slice ``parameters`` and ``base_model``) build the
  output's layers slice by slice (:mod:`mergekernels.planner`); ``passthrough`` takes one source
  per slice, optionally times its ``scale``;
- ``modules``: per-module ``models`` and ``parameters``, a module being named by a tensor-name prefix
  (``""``: every tensor no other module takes), not by mergekit's per-architecture module names;
- model references: local paths, hub ids ``org/name[@revision]`` (:mod:`mergekernels.hub`) and
  ``model+lora`` (PEFT LoRA adapters, :mod:`mergekernels.engine.lora`);
- several YAML documents (mergekit-multi) run in order (:mod:`mergekernels.engine.multi`);
- what mergekit silently ignores (unknown keys, parameters a method does not take) is ignored with
  one :class:`ConfigWarning` naming it; ``strict=True`` (``--strict``) refuses it. Our own dialect
  always refuses it.

- tokenizer merges: ``tokenizer_source`` (``base``, ``union`` or a model) or the ``tokenizer`` block
  (``source``, ``tokens`` with per-token row sources and ``force``, ``pad_to_multiple_of``), and
  ``chat_template`` (:mod:`mergekernels.vocab`): the vocabulary tensors' rows are gathered into the
  output vocabulary's order before the merge, and the output tokenizer is written with transformers.

Not reproduced, hence refused with an error: ``slices`` inside ``modules``, ``rescale: true`` for ties
and breadcrumbs (mergekit's L1 rescale of trimmed vectors) and ``rescale: false`` for della,
breadcrumbs with density + gamma > 1 (mergekit silently shrinks gamma), negative weights with a sign
consensus (mergekit compares the signs of weighted task vectors), and a ``linear`` base model that
is not listed under ``models`` without a global ``weight`` (mergekit adds it to the average and
finds no weight for it). Known differences that stay: random masks come from our counter-based
generator, not ``torch.bernoulli``, so DARE/DELLA keep different (equally distributed) entries;
DELLA divides survivors by their keep probability (the paper) where mergekit matches the L1 norm,
and ranks a tensor's rows over all trailing dimensions; TIES and Breadcrumbs keep exactly mergekit's
count (``exact_k``), choosing among entries tied with a cut by element index as a stable sort in
mergekit's direction would (mergekit's sort is unstable, so its own choice among them is arbitrary).

An entry of ``models`` equal to ``base_model`` is dropped (mergekit skips the base's task vector;
for ``linear`` its weight still counts, see above); for ``linear``, a ``base_model`` not listed joins
the average with the global ``weight``, as mergekit adds it as an input.

Options and their defaults: ``shard_size`` (bytes or "5GB"/"500MB"/"4GiB", default 5GB),
``threshold_scope`` ("tensor" or "global", ties only, default "tensor"), ``seed`` (default 0),
``allow_missing`` ("error" or "base": a tensor missing from a fine-tuned model is an error or taken
from the base, default "error"), ``allow_nonfinite`` (default false), ``memory_cap`` (bytes or a
size string, default None: automatic).
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .hub import is_hub_id
from .methods import METHODS
from .methods.ace import GATES, ORIENTATIONS
from .methods.breadcrumbs import breadcrumbs
from .methods.della import della
from .methods.ties import MERGE_MODES, ties
from .methods.wudi import SOLVERS
from .parameters import UNSET, Setting, evaluate, is_scalar
from .parameters import parse as parse_setting
from .vocab.settings import TokenizerSettings, parse_chat_template, parse_tokenizer


@dataclass
class ModelEntry:
    """One fine-tuned model: its path (resolved relative to the YAML file's directory when relative)
    and its per-model parameters in our names."""

    path: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSource:
    """One input of a slice: a model, the layers it gives ([start, stop); None: all of them, the
    ``models`` form) and its parameter settings as written (see :mod:`mergekernels.parameters`)."""

    path: str
    written: str
    layer_range: tuple[int, int] | None
    settings: dict[str, Setting]
    where: str


@dataclass
class SliceConfig:
    """One output slice: its sources, its own parameter settings and its base model's path."""

    sources: list[SliceSource]
    settings: dict[str, Setting]
    base_model: str | None
    where: str
    module: str | None = None  # the module's tensor-name prefix (``modules``), None for the whole model
    module_settings: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorParams:
    """What one output tensor's merge takes: which of its slice's sources is the base, which are the
    fine-tuned inputs (in order), and the method's keyword arguments."""

    base: int
    experts: tuple[int, ...]
    kwargs: dict[str, Any]


@dataclass
class MergeConfig:
    """A validated merge configuration; see the module docstring for the format.

    Attributes:
        method: a key of :data:`mergekernels.methods.METHODS`.
        base_model: the base model's path (without one, for mergekit's ``linear`` and the other methods
            that need none: the first model's); the output's layout and side files follow it.
        models: the fine-tuned models in file order, without entries equal to the base (with
            slices: every model a slice reads, other than the base, in order of appearance).
        params: global method parameters in our names (mergekit configurations: every mergekit
            default written out); empty when the parameters vary per tensor (``uniform`` false).
        dtype: compute dtype (``dtype``), None if not given.
        out_dtype: output dtype: ``out_dtype``, else ``dtype`` (as mergekit), else None (the base's).
        exclude: glob patterns of tensors kept at the base's value (default none).
        options: engine options, every one present (defaults in :data:`OPTION_DEFAULTS`).
        source: the parsed YAML as given, to be saved beside the output.
        dialect: ``"mergekit"`` or ``"mergekernels"``: whose parameter names the file uses.
        slices: the output slices; the ``models`` form is one slice of every layer of each model
            (the base appended when it is not listed, as mergekit does).
        layered: whether the file gave ``slices`` (the output's layers follow them).
        uniform: whether every tensor takes the same parameters (no gradients, filters or slices):
            then ``models`` and ``params`` describe the whole merge.
        tokenizer: ``tokenizer_source`` / the ``tokenizer`` block (None: neither given; the base's
            tokenizer files are copied).
        chat_template: ``auto``, a built-in name or a Jinja template (None: the tokenizer's own).
    """

    method: str
    base_model: str | None
    models: list[ModelEntry]
    params: dict[str, Any]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    exclude: list[str]
    options: dict[str, Any]
    source: dict
    dialect: str
    slices: list[SliceConfig] = field(default_factory=list)
    layered: bool = False
    uniform: bool = True
    settings: dict[str, Setting] = field(default_factory=dict)
    where: str = field(default="merge config", compare=False)
    ignored: list[str] = field(default_factory=list, compare=False)
    given_base: str | None = None  # base_model as the file gives it (None: none given)
    per_model_keys: frozenset = frozenset()  # the method's parameters that are set per model
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def tensor_params(self, slice_index: int, out_name: str, in_names: list[str], t: float) -> TensorParams:
        """The merge of one output tensor: its parameters resolved (gradients at position t, filters
        on the tensor's name) and translated to the method's keyword arguments.

        Args:
            slice_index: the output slice the tensor belongs to (0 in the ``models`` form).
            out_name: the output tensor's name (filters of global and slice parameters match it).
            in_names: the tensor's name in each of the slice's sources (filters of per-model
                values match these, as in mergekit).
            t: the tensor's gradient position (see :mod:`mergekernels.parameters`).

        Raises:
            ValueError: naming the file and the tensor, for a combination of values the method
                refuses (e.g. breadcrumbs' density + gamma > 1 at some layer).
        """
        if self.uniform:  # every tensor takes the parameters translated at load time
            if "uniform" not in self._cache:
                self._cache["uniform"] = self._uniform_params()
            return self._cache["uniform"]
        sl = self.slices[slice_index]
        levels = [sl.settings, sl.module_settings, self.settings]
        # as mergekit: shared parameters match the output's name, per-model ones each input's name at
        # every level (source, slice, module, global)
        shared = {
            k: v for k, v in _evaluate_levels(levels, out_name, t).items() if k not in self.per_model_keys
        }
        per_source = []
        for source, name in zip(sl.sources, in_names, strict=True):
            values = _evaluate_levels([source.settings, *levels], name, t)
            per_source.append({k: v for k, v in values.items() if k in self.per_model_keys})
        key = (slice_index, _freeze(shared), tuple(_freeze(v) for v in per_source))
        if key not in self._cache:
            fail = _Fail(f"{self.where}: tensor {out_name!r}")
            entries = [
                _RawEntry(i, src.written, src.path, values, src.where)
                for i, (src, values) in enumerate(zip(sl.sources, per_source, strict=True))
            ]
            self._cache[key] = _tensor_params(self, sl, shared, entries, fail)
        return self._cache[key]

    def _uniform_params(self) -> TensorParams:
        paths = [src.path for src in self.slices[0].sources]
        base = paths.index(self.base_model)
        experts = tuple(paths.index(m.path) for m in self.models)
        kwargs = {
            **METHODS[self.method].implied,
            **_kwargs(self.method, self.params, self.models, self.options),
        }
        return TensorParams(base, experts, kwargs)


DIALECTS = ("mergekit", "mergekernels")
TOP_LEVEL_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "slices",
    "modules",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "exclude",
    "options",
    "dialect",
)
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "parameters", "base_model", "residual_weight")
MODULE_KEYS = ("models", "slices", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
# mergekit methods that do not merge task vectors, so need no base model.
BASELESS_METHODS = ("linear", "passthrough", "karcher")
# mergekit methods whose base model is optional: with one, it is the origin of the task vectors.
BASE_OPTIONAL = ("nuslerp", "multislerp")
# mergekit keys for features we do not have, with the reason given in the error.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_DTYPE_HELP = "bfloat16 (bf16), float16 (fp16, half), float32 (fp32, float)"
OPTION_DEFAULTS: dict[str, Any] = {
    "shard_size": 5_000_000_000,
    "threshold_scope": "tensor",
    "seed": 0,
    "allow_missing": "error",
    "allow_nonfinite": False,
    "memory_cap": None,
}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# Signature parameters that a configuration cannot set: per-call plumbing, or set elsewhere (seed:
# options.seed; out_dtype: the top-level key).
_NOT_CONFIGURABLE = {
    "base",
    "finetuned",
    "key",
    "element_offset",
    "thresholds",
    "tie_cuts",
    "return_info",
    "return_loss",
    "out_dtype",
    "seed",
    "l1_norms",  # computed by the engine's pre-pass
    "nonfinite",  # the merge pass's NaN / Inf flags, read by the engine
    "out",  # the engine's shard buffer
    "coefficients",  # awd: computed by its statistics pass
}
# Parameters naming files (regmean's Grams, APL's scores), relative to the configuration's directory.
_PATH_PARAMS = ("grams", "scores")
# Defaults that the signatures spell None: what None means per model.
_NONE_MEANS = {"weights": 1.0}


class ConfigWarning(UserWarning):
    """Something in a configuration is ignored, as mergekit ignores it; the message names it."""


class _Fail:
    """Raises ValueErrors prefixed with the configuration's file (or "merge config")."""

    def __init__(self, where: str):
        self.where = where

    def __call__(self, message: str) -> None:
        raise ValueError(f"{self.where}: {message}")


@dataclass(frozen=True)
class _Rule:
    """Accepted values of one parameter: types from {"number", "int", "bool", "str", "none",
    "dtype", "path"}, an optional interval (lo, hi, brackets such as "(]") and string choices."""

    types: tuple[str, ...]
    interval: tuple[float, float, str] | None = None
    choices: tuple[str, ...] | None = None

    def describe(self) -> str:
        words = {
            "number": "a number",
            "int": "an integer",
            "bool": "true or false",
            "str": "a string",
            "none": "null",
            "dtype": "a dtype name (float32 or float64)",
            "path": "a file path",
        }
        text = " or ".join(words[t] for t in self.types if not (t == "str" and self.choices))
        if self.choices:
            text = " or ".join(filter(None, [text, "one of " + ", ".join(self.choices)]))
        if self.interval:
            lo, hi, br = self.interval
            text += f" in {br[0]}{_num(lo)}, {_num(hi)}{br[1]}"
        return text


def _num(x: float) -> str:
    return "inf" if x == math.inf else f"{x:g}"


def _unit(brackets: str = "(]") -> tuple[float, float, str]:
    return (0.0, 1.0, brackets)


_NUMBER = _Rule(("number",))
_BOOL = _Rule(("bool",))

# mergekit parameters (values in mergekit's terms).
_MERGEKIT_RULES = {
    "weight": _NUMBER,
    "density": _Rule(("number",), _unit("(]")),
    "gamma": _Rule(("number",), _unit("[)")),
    "epsilon": _Rule(("number",), _unit("[)")),
    "lambda": _NUMBER,
    "normalize": _BOOL,
    "rescale": _BOOL,
    "int8_mask": _BOOL,
}

# Ranges and choices of our parameters beyond what the annotations say.
_OUR_RULES = {
    "density": {"interval": _unit("(]")},
    "drop": {"interval": _unit("[)")},
    "gamma": {"interval": _unit("[)")},
    "epsilon": {"interval": _unit("[)")},
    "k_frac": {"interval": _unit("[]")},
    "common_fraction": {"interval": _unit("[]")},
    "reduction": {"interval": _unit("[]")},
    "eps": {"interval": (0.0, math.inf, "[)")},
    "rank_rtol": {"interval": (0.0, math.inf, "[)")},
    "lr": {"interval": (0.0, math.inf, "()")},
    "steps": {"interval": (0.0, math.inf, "[)")},
    "merge": {"choices": MERGE_MODES},
    "consensus": {"choices": ("ties",)},
    "rescale": {"choices": ("inverse", "l1", "none")},
    "gate": {"choices": tuple(GATES)},
    "orientation": {"choices": ORIENTATIONS},
    "solver": {"choices": SOLVERS},
}
_SVD_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
}


@dataclass(frozen=True)
class _MergekitMethod:
    """How mergekit defines a method: its normalize / rescale defaults (rescale None: the method has
    no rescale), whether it elects signs, and its sparsification."""

    normalize: bool
    rescale: bool | None
    consensus: bool = False
    sparsify: str | None = None  # "magnitude", "random", "outliers", "magprune"

    def model_params(self) -> dict[str, Any]:
        """mergekit's per-model (tensor) parameters and their defaults (weight: required there)."""
        if self.rescale is None:
            return {"weight": None}
        out: dict[str, Any] = {"weight": None, "density": 1.0}
        if self.sparsify == "outliers":
            out["gamma"] = 0.01
        if self.sparsify == "magprune":
            out["epsilon"] = 0.15
        return out

    def global_params(self) -> dict[str, Any]:
        if self.rescale is None:
            return {"normalize": self.normalize}
        return {"normalize": self.normalize, "rescale": self.rescale, "lambda": 1.0, "int8_mask": False}


MERGEKIT_METHODS = {
    "linear": _MergekitMethod(normalize=True, rescale=None),
    "task_arithmetic": _MergekitMethod(normalize=False, rescale=False),
    "ties": _MergekitMethod(normalize=True, rescale=False, consensus=True, sparsify="magnitude"),
    "dare_ties": _MergekitMethod(normalize=False, rescale=True, consensus=True, sparsify="random"),
    "dare_linear": _MergekitMethod(normalize=False, rescale=True, sparsify="random"),
    "breadcrumbs": _MergekitMethod(normalize=False, rescale=False, sparsify="outliers"),
    "breadcrumbs_ties": _MergekitMethod(normalize=False, rescale=False, consensus=True, sparsify="outliers"),
    "della": _MergekitMethod(normalize=True, rescale=True, consensus=True, sparsify="magprune"),
    "della_linear": _MergekitMethod(normalize=False, rescale=True, sparsify="magprune"),
}


@dataclass
class _RawEntry:
    index: int
    written: str
    path: str
    params: dict[str, Any]
    label: str = ""

    @property
    def where(self) -> str:
        return self.label or f"models[{self.index}] ({self.written!r})"


def _freeze(values: dict) -> tuple:
    return tuple(sorted((k, (type(v).__name__, v)) for k, v in values.items()))


def _evaluate_levels(levels: list[dict[str, Setting]], tensor_name: str, t: float) -> dict[str, Any]:
    """Each parameter's value at the highest level where it applies to this tensor."""
    out: dict[str, Any] = {}
    for settings in levels:
        for key, setting in settings.items():
            if key not in out:
                value = evaluate(setting, tensor_name, t)
                if value is not UNSET:
                    out[key] = value
    return out


def _tensor_params(
    cfg: MergeConfig, sl: SliceConfig, shared: dict, entries: list[_RawEntry], fail: _Fail
) -> TensorParams:
    """Translates one tensor's resolved values into the method's arguments (see tensor_params)."""
    translate = _mergekit if cfg.dialect == "mergekit" else _ours
    base, models, params = translate(cfg.method, shared, entries, sl.base_model or cfg.given_base, fail)
    base_index = next((e.index for e in entries if e.path == base), None)
    if base_index is None:  # checked at load time; here for safety
        fail(f"{sl.where}: the base model {base!r} is not among its sources")
    experts = tuple(e.index for e in entries if e.path != base)
    _check_combinations(cfg.method, models, params, fail)
    kwargs = {**METHODS[cfg.method].implied, **_kwargs(cfg.method, params, models, cfg.options)}
    return TensorParams(base_index, experts, kwargs)


# ----------------------------------------------------------------------------------------------
# Reading.
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable keys: left to the standard constructor's error
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_documents(path: str | Path) -> list[Any]:
    """The YAML documents of a configuration file (several: a mergekit-multi configuration).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: naming the file, for invalid YAML (duplicate keys included).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"merge config {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # a ValueError that would not name the file
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return list(yaml.load_all(text, Loader=_StrictLoader))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from exc


def _read(
    source: str | Path | Mapping, root: str | Path | None = None, label: str | None = None
) -> tuple[dict, Path | None, _Fail]:
    if isinstance(source, Mapping):
        fail = _Fail(label or "merge config")
        data, root = copy.deepcopy(dict(source)), Path(root) if root is not None else None
    else:
        path = Path(source)
        fail = _Fail(str(path))
        documents = read_documents(path)
        if len(documents) > 1:
            fail(
                f"holds {len(documents)} YAML documents: a multi-document (mergekit-multi) configuration "
                "runs with `mergekernels merge` / merge_checkpoints, one merge per document"
            )
        data = documents[0] if documents else None
        root = path.resolve().parent
    if data is None:
        fail("empty configuration; expected a mapping with at least merge_method and models")
    if not isinstance(data, dict):
        fail(
            f"the top level must be a mapping of keys ({', '.join(TOP_LEVEL_KEYS)}), "
            f"got {type(data).__name__}"
        )
    return data, root, fail


def _resolve(path: str, root: Path | None) -> str:
    expanded = os.path.expanduser(path)
    if root is not None and not os.path.isabs(expanded):
        expanded = os.path.join(root, expanded)
    return os.path.normpath(expanded)


def _resolve_model(written: str, root: Path | None) -> str:
    """A model reference: a local path (relative to the config's directory) when one exists or the
    reference is not a hub id; otherwise the hub id as written (``org/name[@revision]``), fetched
    when the merge opens it (:mod:`mergekernels.hub`). ``model+lora`` resolves both parts."""
    local = _resolve(written, root)
    if os.path.exists(local):
        return local
    if "+" in written:  # model+lora: each part a path or a hub id
        model, _, lora = written.partition("+")
        return f"{_resolve_model(model, root)}+{_resolve_model(lora, root)}"
    return written if is_hub_id(written) else local


def _size(value: Any, what: str, fail: _Fail) -> int:
    """Bytes from an integer or a string such as "5GB" (10^9), "500MB" or "4GiB" (2^30)."""
    if isinstance(value, bool):
        fail(f"{what} must be a byte count or a size such as '5GB', got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(
            r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([kmgt]i?b|b)?\s*", value, re.IGNORECASE
        )
        if not match:
            fail(f"{what} must be a byte count or a size such as '5GB', '500MB', '4GiB'; got {value!r}")
        size = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
    else:
        fail(f"{what} must be a byte count or a size such as '5GB', got {value!r}")
    if not (math.isfinite(size) and size >= 1 and float(size) == int(size)):
        fail(f"{what} must be a positive whole number of bytes, got {value!r}")
    return int(size)


def parse_size(value: Any, what: str) -> int:
    """Bytes from an integer or a size string ("5GB", "500MB", "4GiB"); a ValueError naming ``what``."""
    return _size(value, what, _Fail("size"))


def _coerce(value: Any, rule: _Rule, what: str, fail: _Fail) -> Any:
    """Checks one scalar parameter value against its rule; returns it in the form the method takes."""
    if isinstance(value, (list, tuple, dict)):
        fail(
            f"{what} must be a single value ({rule.describe()}); per-layer gradients, filtered values and "
            f"lists are not supported (give per-model values under each model's parameters)"
        )
    out: Any = None
    ok = False
    if isinstance(value, bool):
        ok, out = "bool" in rule.types, value
    elif value is None:
        ok, out = "none" in rule.types, None
    elif isinstance(value, (int, float)):
        if "number" in rule.types:
            ok, out = math.isfinite(value), float(value)
        elif "int" in rule.types:  # an integral float too (a gradient's interpolated value)
            ok, out = isinstance(value, int) or float(value).is_integer(), value
            out = int(out) if ok else out
    elif isinstance(value, str):
        if "str" in rule.types and (rule.choices is None or value in rule.choices):
            ok, out = True, value
        elif "dtype" in rule.types:
            ok, out = value in _SVD_DTYPES, _SVD_DTYPES.get(value)
        elif "path" in rule.types:
            ok, out = True, value
        elif "number" in rule.types or "int" in rule.types:
            # YAML 1.1 reads 1e-5 (no dot) as a string; accept numbers written that way.
            try:
                out = int(value) if "number" not in rule.types else float(value)
                ok = math.isfinite(out)
            except ValueError:
                ok = False
    if not ok:
        fail(f"{what} must be {rule.describe()}, got {value!r}")
    if rule.interval is not None and isinstance(out, (int, float)) and not isinstance(out, bool):
        lo, hi, br = rule.interval
        inside = (lo < out if br[0] == "(" else lo <= out) and (out < hi if br[1] == ")" else out <= hi)
        if not inside:
            fail(f"{what} must be {rule.describe()}, got {value!r}")
    return out


def _dtype(data: dict, key: str, fail: _Fail) -> torch.dtype | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or value not in DTYPES:
        fail(f"{key} {value!r} is not supported; valid: {_DTYPE_HELP}")
    return DTYPES[value]


def _params_mapping(value: Any, what: str, fail: _Fail) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail(f"{what} must be a mapping of parameter names to values, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            fail(f"{what}: parameter names must be strings, got {key!r}")
    return dict(value)


def _unknown_keys(
    item: dict, valid: tuple[str, ...], where: str, fail: _Fail, ignored: list[str] | None
) -> None:
    """Keys of a mapping that are not in `valid`: an error, or noted in `ignored` (lenient)."""
    for key in sorted(set(item) - set(valid), key=str):
        if ignored is None:
            fail(f"{where}: unknown key {key!r}; valid: {', '.join(valid)}")
        ignored.append(f"{where}.{key}")


def _entries(
    data: dict, root: Path | None, fail: _Fail, ignored: list[str] | None, label: str = "models"
) -> list[_RawEntry]:
    models = data.get("models")
    what = f"`{label}`" if label == "models" else f"{label}.models"
    if models is None:
        fail(f"{what} is missing: list the fine-tuned models (`- model: PATH`, with optional parameters)")
    if not isinstance(models, list):
        fail(f"{what} must be a list of models, got {type(models).__name__}")
    if not models:
        fail(f"{what} is empty: list at least one fine-tuned model")
    out = []
    for i, item in enumerate(models):
        if isinstance(item, str):
            written, params = item, {}
        elif isinstance(item, dict):
            _unknown_keys(item, MODEL_KEYS, f"models[{i}]", fail, ignored)
            written = item.get("model")
            if not isinstance(written, str) or not written:
                fail(f"models[{i}]: `model` must be a path string, got {written!r}")
            params = _params_mapping(item.get("parameters"), f"models[{i}] ({written!r}) parameters", fail)
        else:
            fail(
                f"models[{i}] must be a path or a mapping {{model: PATH, parameters: {{...}}}}, got {item!r}"
            )
        out.append(_RawEntry(i, written, _resolve_model(written, root), params))
    return out


def _options(data: dict, fail: _Fail) -> dict[str, Any]:
    given = data.get("options")
    if given is None:
        given = {}
    if not isinstance(given, dict):
        fail(f"`options` must be a mapping, got {type(given).__name__}")
    options = dict(OPTION_DEFAULTS)
    for key, value in given.items():
        what = f"options.{key}"
        if key not in OPTION_DEFAULTS:
            fail(f"unknown option {key!r}; valid: {', '.join(sorted(OPTION_DEFAULTS))}")
        if key in ("shard_size", "memory_cap"):
            options[key] = None if (value is None and key == "memory_cap") else _size(value, what, fail)
        elif key == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(f"{what} must be a non-negative integer, got {value!r}")
            options[key] = value
        elif key == "allow_nonfinite":
            options[key] = _coerce(value, _BOOL, what, fail)
        else:
            choices = {"threshold_scope": ("tensor", "global"), "allow_missing": ("error", "base")}[key]
            if value not in choices:
                fail(f"{what} must be one of {', '.join(choices)}; got {value!r}")
            options[key] = value
    return options


# ----------------------------------------------------------------------------------------------
# Parameter schemas.
def _split_union(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


_ANNOTATION_TYPES = {
    "float": "number",
    "int": "int",
    "bool": "bool",
    "str": "str",
    "None": "none",
    "torch.dtype": "dtype",
}


@dataclass(frozen=True)
class _OurParam:
    rule: _Rule
    per_model: bool
    default: Any  # inspect.Parameter.empty when required


def _our_schema(method: str) -> dict[str, _OurParam]:
    """Configurable parameters of one of our methods, read from its function's signature: what the
    annotation allows (``Sequence[float]``: may be given per model), defaults, and extra ranges."""
    spec = METHODS[method]
    schema = {}
    for name, param in inspect.signature(spec.function).parameters.items():
        if name in _NOT_CONFIGURABLE or name in spec.implied:
            continue
        if name == "grams":  # regmean: a file saved with torch.save, {tensor name: [Gram per model]}
            schema[name] = _OurParam(_Rule(("path",)), False, param.default)
            continue
        text = (
            param.annotation
            if isinstance(param.annotation, str)
            else inspect.formatannotation(param.annotation)
        )
        parts = _split_union(text)
        types = tuple(dict.fromkeys(_ANNOTATION_TYPES[p] for p in parts if p in _ANNOTATION_TYPES))
        if not types:  # tensors and other objects cannot come from YAML
            continue
        extra = _OUR_RULES.get(name, {})
        schema[name] = _OurParam(_Rule(types, **extra), "Sequence[float]" in parts, param.default)
    return schema


def _default_of(method: str, name: str) -> Any:
    """The value a model gets for `name` when neither it nor the global parameters set it."""
    spec = METHODS[method]
    if name in spec.implied:
        return spec.implied[name]
    param = inspect.signature(spec.function).parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        return inspect.Parameter.empty
    if param.default is None and name in _NONE_MEANS:
        return _NONE_MEANS[name]
    return param.default


# ----------------------------------------------------------------------------------------------
# Dialects.
def _drop_base(entries: list[_RawEntry], base: str | None) -> list[_RawEntry]:
    return [e for e in entries if base is None or e.path != base]


def _mergekit_rule(method: str, key: str, model: str | None, fail: _Fail) -> _Rule:
    """The rule of mergekit parameter `key` of `method`, set globally (model None) or for a model
    (named by `model`); an error for a key the method does not take there."""
    if method in _INTERPOLATIONS:
        per_model, shared = _INTERPOLATIONS[method]
        if key not in per_model and (model is not None or key not in shared):
            where = f"{model}: " if model else ""
            valid = ", ".join(per_model if model else [*per_model, *shared])
            fail(
                f"{where}unknown parameter {key!r} for {method}{' per model' if model else ''}; "
                f"valid: {valid}"
            )
        return per_model.get(key) or shared[key]
    mk = MERGEKIT_METHODS[method]
    model_defaults, global_defaults = mk.model_params(), mk.global_params()
    if model is None:
        if key not in _MERGEKIT_RULES or (key not in model_defaults and key not in global_defaults):
            fail(
                f"unknown parameter {key!r} for {method}; "
                f"valid: {', '.join([*model_defaults, *global_defaults])}"
            )
    else:
        if key in global_defaults:
            fail(
                f"{model}: {key!r} is a global parameter of {method}; set it under the top-level "
                f"`parameters` (per-model parameters: {', '.join(model_defaults)})"
            )
        if key not in model_defaults:
            fail(
                f"{model}: unknown parameter {key!r} for {method}; "
                f"valid per model: {', '.join(model_defaults)}"
            )
    return _MERGEKIT_RULES[key]


# mergekit methods outside the task-vector family: their per-model and shared parameters.
_INT = _Rule(("int",), (1, math.inf, "[)"))
_INTERPOLATIONS: dict[str, tuple[dict[str, _Rule], dict[str, _Rule]]] = {
    "passthrough": ({"scale": _NUMBER}, {}),
    "slerp": ({}, {"t": _NUMBER}),
    "nearswap": ({}, {"t": _NUMBER}),
    "model_stock": ({}, {"filter_wise": _BOOL}),
    "nuslerp": ({"weight": _NUMBER}, {"nuslerp_row_wise": _BOOL, "nuslerp_flatten": _BOOL}),
    "multislerp": ({"weight": _NUMBER}, {"normalize_weights": _BOOL, "eps": _NUMBER}),
    "karcher": ({}, {"max_iter": _INT, "tol": _NUMBER}),
    "sce": ({}, {"select_topk": _NUMBER, "int8_mask": _BOOL}),
    "arcee_fusion": ({}, {}),
    "ram": ({}, {"epsilon": _NUMBER}),
    "ramplus_tl": ({}, {"r": _NUMBER, "alpha": _NUMBER, "epsilon": _NUMBER}),
}
# Every mergekit method we run: the task-vector family above and the others of _INTERPOLATIONS.
MERGEKIT_NAMES = (*MERGEKIT_METHODS, *_INTERPOLATIONS)
# Their parameters' mergekit defaults, written out (int8_mask only changes mergekit's memory use).
_INTERPOLATION_DEFAULTS = {
    "sce": {"select_topk": 1.0},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
}


def _mergekit_pairwise(
    method: str, raw: dict, entries: list[_RawEntry], base: str | None, fail: _Fail
) -> tuple[str | None, list[ModelEntry], dict[str, Any]]:
    """slerp / nearswap: the base and exactly one other model, and `t`; model_stock: the base and at
    least two others."""
    if method in ("nuslerp", "multislerp", "karcher"):
        return _mergekit_spherical(method, raw, entries, base, fail)
    others = [e for e in entries if e.path != base]
    if method in _INTERPOLATION_DEFAULTS:  # sce, ram, ramplus_tl: the base and any other models
        params = {k: raw.get(k, v) for k, v in _INTERPOLATION_DEFAULTS[method].items()}
        return base, [ModelEntry(e.path) for e in others], params
    if method == "model_stock":
        if len(others) < 2:
            fail(f"model_stock needs at least two models besides the base, got {len(others)}")
        filter_wise = raw.get("filter_wise", False)
        return (
            base,
            [ModelEntry(e.path) for e in others],
            {"filter_wise": _coerce(filter_wise, _BOOL, "filter_wise", fail)},
        )
    if len(others) != 1:
        fail(
            f"{method} takes the base and exactly one other model, got {len(others)} other(s) "
            f"({', '.join(e.written for e in others) or 'none'})"
        )
    if method == "arcee_fusion":
        return base, [ModelEntry(others[0].path)], {}
    if raw.get("t") is None:
        fail(f"{method} needs `t`, under `parameters` or a slice's parameters")
    return base, [ModelEntry(others[0].path)], {"t": _coerce(raw["t"], _NUMBER, "t", fail)}


def _mergekit_spherical(
    method: str, raw: dict, entries: list[_RawEntry], base: str | None, fail: _Fail
) -> tuple[str | None, list[ModelEntry], dict[str, Any]]:
    """nuslerp / multislerp (a base, if given, is the origin of the task vectors; every other model is
    a point with a required weight) and karcher (every model, the base too, is a point)."""
    if method == "karcher":
        params = {"max_iter": raw.get("max_iter", 10), "tol": raw.get("tol", 1e-5)}
        return entries[0].path, [ModelEntry(e.path) for e in entries[1:]], params
    origin = base is not None
    points = [e for e in entries if e.path != base] if origin else entries
    if method == "nuslerp" and len(points) != 2:
        fail(f"nuslerp interpolates between exactly two models besides the base, got {len(points)}")
    weights = []
    for entry in points:
        weight = entry.params.get("weight", raw.get("weight"))
        if weight is None:
            fail(
                f"{entry.where}: no `weight`; mergekit's {method} needs one for every model besides the base"
            )
        weights.append(_coerce(weight, _NUMBER, f"{entry.where} weight", fail))
    params: dict[str, Any] = {"weights": weights, "origin": origin}
    if method == "nuslerp":
        params["row_wise"] = raw.get("nuslerp_row_wise", False)
        params["flatten"] = raw.get("nuslerp_flatten", True)
    else:
        params["normalize_weights"] = raw.get("normalize_weights", True)
        params["eps"] = raw.get("eps", 1e-8)
    head = base if origin else points[0].path
    rest = points if origin else points[1:]
    return head, [ModelEntry(e.path) for e in rest], params


def _mergekit_passthrough(
    raw: dict, entries: list[_RawEntry], fail: _Fail
) -> tuple[str | None, list[ModelEntry], dict[str, Any]]:
    """mergekit's passthrough: the one input of each tensor, times its optional ``scale``."""
    if len(entries) != 1:
        fail(
            f"passthrough takes exactly one model per slice, got {len(entries)} "
            f"({', '.join(e.written for e in entries)}); a base_model counts as one in the `models` form"
        )
    scale = entries[0].params.get("scale", raw.get("scale"))
    return entries[0].path, [], {"scale": None if scale is None else _coerce(scale, _NUMBER, "scale", fail)}


def _mergekit(
    method: str, raw: dict, entries: list[_RawEntry], base: str | None, fail: _Fail
) -> tuple[str | None, list[ModelEntry], dict[str, Any]]:
    """Translates a mergekit configuration into our method's parameters (see the module docstring)."""
    if method == "passthrough":
        return _mergekit_passthrough(raw, entries, fail)
    if method in _INTERPOLATIONS:
        return _mergekit_pairwise(method, raw, entries, base, fail)
    mk = MERGEKIT_METHODS[method]
    model_defaults, global_defaults = mk.model_params(), mk.global_params()
    glob: dict[str, Any] = {}
    for key, value in raw.items():
        rule = _mergekit_rule(method, key, None, fail)
        glob[key] = _coerce(value, rule, f"parameters.{key}", fail)
    per: list[dict[str, Any]] = []
    for entry in entries:
        values = {}
        for key, value in entry.params.items():
            rule = _mergekit_rule(method, key, entry.where, fail)
            values[key] = _coerce(value, rule, f"{entry.where} parameters.{key}", fail)
        per.append(values)
    setting = {**global_defaults, **{k: v for k, v in glob.items() if k in global_defaults}}

    def effective(i: int, key: str) -> Any:
        value = per[i].get(key, glob.get(key, model_defaults[key]))
        return 1.0 if value is None else value

    # mergekit's linear needs a weight for every model, the base's included (its task-vector methods
    # need one for every non-base model too: there we are lenient and take 1, as documented)
    for i, entry in enumerate(entries):
        if method == "linear" and "weight" not in per[i] and "weight" not in glob:
            fail(
                f"{entry.where}: no `weight`; mergekit's linear needs one for every model "
                "(set it per model or under `parameters`)"
            )

    if method == "linear":
        return _mergekit_linear(entries, per, glob, setting["normalize"], base, effective, fail)

    params: dict[str, Any] = {}
    models: list[ModelEntry] = []
    keep = [i for i, e in enumerate(entries) if base is None or e.path != base]
    for i in keep:
        models.append(
            ModelEntry(entries[i].path, {"weights": per[i]["weight"]} if "weight" in per[i] else {})
        )
    if "weight" in glob:
        params["weights"] = glob["weight"]
    params["scale"] = setting["lambda"]
    if method == "task_arithmetic":
        params["normalize"] = setting["normalize"]
    else:
        params["merge"] = "weighted" if setting["normalize"] else "sum"
    if mk.consensus:
        params["weighted_election"] = True
        for i in keep:
            if effective(i, "weight") < 0:
                fail(
                    f"{entries[i].where}: negative weight {effective(i, 'weight'):g} with {method}'s sign "
                    "consensus is not supported (mergekit elects and compares the signs of weighted task "
                    "vectors); use a method without consensus"
                )
    rescale = setting["rescale"]
    if mk.sparsify in ("magnitude", "outliers") and rescale:
        fail(
            f"parameters.rescale: true is not supported for {method} "
            "(mergekit's L1 rescale of trimmed vectors)"
        )
    if mk.sparsify == "magprune" and not rescale:
        fail(f"parameters.rescale: false is not supported for {method}: survivors are always rescaled")
    if mk.sparsify == "random":
        params["rescale"] = "l1" if rescale else False
    if mk.sparsify in ("magnitude", "outliers"):  # mergekit keeps exactly k (its sort, made stable)
        params["exact_k"] = True

    # density: ties / breadcrumbs / della take it as is, DARE as drop = 1 - density (mergekit's
    # density is the fraction kept; >= 1 means no sparsification).
    if mk.sparsify is not None:
        target = "drop" if mk.sparsify == "random" else "density"

        def convert(d: float) -> float:
            return (0.0 if d >= 1.0 else 1.0 - d) if target == "drop" else min(d, 1.0)

        params[target] = convert(glob.get("density", model_defaults["density"]))
        for i, model in zip(keep, models, strict=True):
            if "density" in per[i]:
                model.params[target] = convert(per[i]["density"])
    # gamma / epsilon: ignored by mergekit where density >= 1; 0 makes ours keep everything there.
    aux = {"outliers": "gamma", "magprune": "epsilon"}.get(mk.sparsify or "")
    if aux is not None:
        written = glob.get(aux, model_defaults[aux])
        params[aux] = 0.0 if glob.get("density", 1.0) >= 1.0 else written
        for i, model in zip(keep, models, strict=True):
            d, value = effective(i, "density"), per[i].get(aux, written)
            want = 0.0 if d >= 1.0 else value
            if aux in per[i] or want != params[aux]:
                model.params[aux] = want
            if d < 1.0 and aux == "gamma" and d + value > 1.0 + 1e-12:
                fail(
                    f"{entries[i].where}: density + gamma = {d + value:g} > 1 for {method}; "
                    "mergekit silently shrinks gamma to 1 - density, which is not reproduced: "
                    f"set gamma <= {1 - d:g}"
                )
            if d < 1.0 and aux == "epsilon" and not (d - value > 0.0 and d + value < 1.0):
                fail(
                    f"{entries[i].where}: epsilon {value:g} with density {d:g}: mergekit needs "
                    "density - epsilon > 0 and density + epsilon < 1"
                )
    return base, models, params


def _mergekit_linear(
    entries: list[_RawEntry],
    per: list[dict],
    glob: dict,
    normalize: bool,
    base: str | None,
    effective: Callable[[int, str], Any],
    fail: _Fail,
) -> tuple[str | None, list[ModelEntry], dict[str, Any]]:
    """mergekit's linear, sum_m w_m theta_m (/ sum_m w_m), as task arithmetic on the base."""
    if base is None:  # the first model is theta_0; it stays in the average with its weight
        base, in_base, rest = entries[0].path, [0], list(range(1, len(entries)))
    else:
        in_base = [i for i, e in enumerate(entries) if e.path == base]
        rest = [i for i, e in enumerate(entries) if e.path != base]
    if not rest:
        fail(
            "linear needs at least one model besides the base (the first model when base_model is not given)"
        )
    total = sum(effective(i, "weight") for i in range(len(entries)) if i in in_base or i in rest)
    models = [
        ModelEntry(entries[i].path, {"weights": per[i]["weight"]} if "weight" in per[i] else {}) for i in rest
    ]
    params: dict[str, Any] = {}
    if "weight" in glob:
        params["weights"] = glob["weight"]
    if normalize:
        if abs(total) < 1e-8:
            fail(f"linear: the weights sum to {total:g}; a normalized average needs a non-zero total")
        if in_base:  # theta_0 + (1/W) sum_t w_t tau_t, W including the base's weight
            params["normalize"] = False
            params["scale"] = 1.0 / total
    else:
        if abs(total - 1.0) > 1e-9:
            fail(
                f"linear with normalize: false is the weighted sum of the models, a merge of task vectors "
                f"only when the weights sum to 1 (they sum to {total:g}); set normalize: true or use "
                "task_arithmetic"
            )
        params["normalize"] = False
    return base, models, params


def _full_schema(method: str, raw: Mapping, fail: _Fail) -> dict[str, _OurParam]:
    """Our method's configurable parameters; awd's also include those of the method it hands the
    disentangled vectors to (``then``), names it shares with awd's own taking a ``then_`` prefix."""
    schema = _our_schema(method)
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(METHODS[method].function).parameters.values()):
        then = raw.get("then", inspect.signature(METHODS[method].function).parameters["then"].default)
        if not isinstance(then, str) or then not in METHODS:
            fail(f"parameters.then must name a method; valid: {', '.join(sorted(METHODS))}")
        for name, param in _our_schema(then).items():
            schema[f"then_{name}" if name in schema else name] = param
    return schema


def _our_rule(method: str, schema: dict[str, _OurParam], key: str, model: str | None, fail: _Fail) -> _Rule:
    """The rule of our parameter `key`, set globally (model None) or for a model (named by `model`)."""
    where = f"{model}: " if model else "parameters: "
    if key == "seed":
        fail(f"{where}seed is an engine option: set it as options.seed")
    if key == "out_dtype":
        fail(f"{where}out_dtype is a top-level key, not a parameter")
    if key not in schema:
        if model is None:
            fail(f"unknown parameter {key!r} for {method}; valid: {', '.join(schema) or '(none)'}")
        per_model = ", ".join(n for n, p in schema.items() if p.per_model) or "none"
        fail(f"{model}: unknown parameter {key!r} for {method}; valid per model: {per_model}")
    if model is not None and not schema[key].per_model:
        per_model = ", ".join(n for n, p in schema.items() if p.per_model) or "none"
        fail(
            f"{model}: {key!r} of {method} cannot be set per model; set it under the top-level "
            f"`parameters` (per-model parameters of {method}: {per_model})"
        )
    return schema[key].rule


def _ours(
    method: str, raw: dict, entries: list[_RawEntry], base: str | None, fail: _Fail
) -> tuple[str | None, list[ModelEntry], dict[str, Any]]:
    schema = _full_schema(method, raw, fail)
    params = {}
    for key, value in raw.items():
        params[key] = _coerce(value, _our_rule(method, schema, key, None, fail), f"parameters.{key}", fail)
    models = []
    for entry in _drop_base(entries, base):
        values = {}
        for key, value in entry.params.items():
            rule = _our_rule(method, schema, key, entry.where, fail)
            values[key] = _coerce(value, rule, f"{entry.where} parameters.{key}", fail)
        models.append(ModelEntry(entry.path, values))
    return base, models, params


def _check_combinations(method: str, models: list[ModelEntry], params: dict, fail: _Fail) -> None:
    """Per-model parameter pairs that only make sense together (breadcrumbs, della)."""
    function = METHODS[method].function

    def value(model: ModelEntry, name: str) -> Any:
        return model.params.get(name, params.get(name, _default_of(method, name)))

    for model in models:
        if function is breadcrumbs:
            d, g = value(model, "density"), value(model, "gamma")
            if d + g > 1.0 + 1e-12:
                fail(f"model {model.path!r}: breadcrumbs needs density + gamma <= 1, got {d:g} + {g:g}")
        if function is della:
            d, e = value(model, "density"), value(model, "epsilon")
            if not (d - e > 0.0 and d + e <= 1.0):
                fail(
                    f"model {model.path!r}: della needs density - epsilon > 0 and density + epsilon <= 1, "
                    f"got density {d:g}, epsilon {e:g}"
                )


# ----------------------------------------------------------------------------------------------
def load_config(
    source: str | Path | Mapping,
    *,
    strict: bool = False,
    root: str | Path | None = None,
    label: str | None = None,
) -> MergeConfig:
    """Reads and validates a merge configuration.

    Args:
        source: a YAML file (str or Path; relative model paths are resolved against its directory)
            or an already parsed mapping (paths relative to the working directory).
        strict: refuse what mergekit silently ignores (unknown top-level keys, parameters a method
            does not take, or takes at another level). By default a mergekit configuration gets one
            :class:`ConfigWarning` naming them, and they are ignored, as mergekit does; our own
            dialect refuses them always.
        root: for a mapping, the directory relative paths are resolved against (default: the
            working directory).
        label: for a mapping, how errors name it (default "merge config").

    Returns:
        The validated :class:`MergeConfig`, parameters translated to our names.

    Raises:
        ValueError: naming the file (or "merge config") and the offending key, with the valid keys,
            for invalid YAML, unknown keys, methods or parameters, values of the wrong type or
            range, unsupported mergekit features, a missing base model or no models.
        FileNotFoundError: if the file does not exist.
    """
    data, root, fail = _read(source, root, label)
    source_copy = copy.deepcopy(data)
    ignored: list[str] = []

    method = data.get("merge_method")
    ours = sorted(set(METHODS) - set(MERGEKIT_NAMES))
    shared = ", ".join(MERGEKIT_NAMES)
    if method is None:
        fail(f"`merge_method` is missing; valid: {shared} (mergekit) and {', '.join(ours)} (mergekernels)")
    if not isinstance(method, str) or method not in METHODS:
        fail(
            f"unknown merge_method {method!r}; valid: {shared} (mergekit) "
            f"and {', '.join(ours)} (mergekernels)"
        )
    dialect = data.get("dialect")
    if dialect is None:
        dialect = "mergekit" if method in MERGEKIT_NAMES else "mergekernels"
    if dialect not in DIALECTS:
        fail(f"unknown dialect {dialect!r}; valid: {', '.join(DIALECTS)}")
    if dialect == "mergekit" and method not in MERGEKIT_NAMES:
        fail(f"{method!r} is not a mergekit method; use dialect: mergekernels, or one of: {shared}")
    lenient = dialect == "mergekit" and not strict
    for key in list(data):
        if key not in TOP_LEVEL_KEYS:
            if not lenient:
                fail(f"unknown top-level key {key!r}; valid: {', '.join(TOP_LEVEL_KEYS)}")
            ignored.append(f"top-level key {key!r}")
            del data[key]

    tokenizer = parse_tokenizer(data, lambda written: _resolve_model(written, root), fail)
    chat_template = parse_chat_template(data.get("chat_template"), fail)
    base_written = data.get("base_model")
    if base_written is not None and (not isinstance(base_written, str) or not base_written):
        fail(f"base_model must be a path string, got {base_written!r}")
    base = _resolve_model(base_written, root) if base_written is not None else None
    baseless = dialect == "mergekit" and method in (*BASELESS_METHODS, *BASE_OPTIONAL)
    if base is None and not baseless:
        fail(f"base_model is missing: {method} merges task vectors relative to a base model")
    raw = _params_mapping(data.get("parameters"), "parameters", fail)
    dtype, out_dtype = _dtype(data, "dtype", fail), _dtype(data, "out_dtype", fail)
    exclude = data.get("exclude")
    exclude = [] if exclude is None else exclude
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        fail(f"exclude must be a list of glob patterns (strings), got {exclude!r}")
    options = _options(data, fail)

    if dialect == "mergekit":

        def rule(key: str, model: str | None) -> _Rule | None:
            if not lenient:
                return _mergekit_rule(method, key, model, fail)
            try:
                return _mergekit_rule(method, key, model, fail)
            except ValueError:  # mergekit resolves only the parameters a method declares
                ignored.append(f"parameter {key!r} ({model or 'global'}; {method} does not take it there)")
                return None

    else:
        schema = _full_schema(method, raw, fail)

        def rule(key: str, model: str | None) -> _Rule:
            return _our_rule(method, schema, key, model, fail)

    settings = _settings(raw, "parameters", None, rule, fail, root, ignored if lenient else None)
    layered = "slices" in data
    given = [key for key in ("models", "slices", "modules") if data.get(key) is not None]
    if len(given) > 1:
        fail(f"give one of `models`, `slices` or `modules`, not {' and '.join(given)} (as mergekit)")
    lenient_list = ignored if lenient else None

    def models_slice(models: Any, where: str, module: str | None = None, module_settings=None) -> SliceConfig:
        entries = _entries({"models": models}, root, fail, lenient_list, where)
        sources = [
            SliceSource(
                e.path,
                e.written,
                None,
                _settings(e.params, f"{e.where} parameters", e.where, rule, fail, root, lenient_list),
                e.where,
            )
            for e in entries
        ]
        if base is not None and all(src.path != base for src in sources):
            # mergekit merges the base with the listed models (it adds it as an input)
            if method == "linear" and dialect == "mergekit":
                _base_weight_needed(method, raw, fail, base_written)
            sources.append(SliceSource(base, base_written, None, {}, f"base_model ({base_written!r})"))
        return SliceConfig(sources, {}, None, where, module, module_settings or {})

    if layered:
        slices = _slices(data.get("slices"), root, base, rule, fail, lenient_list)
    elif data.get("modules") is not None:
        modules = data["modules"]
        if not isinstance(modules, dict) or not modules:
            fail(
                "`modules` must be a mapping of module (a tensor-name prefix) to {models: [...], parameters}"
            )
        slices = []
        for prefix, spec in modules.items():
            where = f"modules.{prefix}"
            if not isinstance(prefix, str):
                fail(f"modules: a module's name must be a tensor-name prefix (a string), got {prefix!r}")
            if not isinstance(spec, dict):
                fail(f"{where} must be a mapping with `models` (and optional `parameters`), got {spec!r}")
            if spec.get("slices") is not None:
                fail(f"{where}.slices: slices inside modules are not supported; give the module's `models`")
            _unknown_keys(spec, MODULE_KEYS, where, fail, lenient_list)
            module_settings = _settings(
                spec.get("parameters"), f"{where}.parameters", None, rule, fail, root, lenient_list
            )
            slices.append(models_slice(spec.get("models"), where, prefix, module_settings))
    else:
        slices = [models_slice(data.get("models"), "models")]
    _check_slices(method, dialect, slices, base, base_written, fail)
    per_model_keys = _per_model_keys(method, dialect, raw, fail)
    uniform = (
        not layered
        and data.get("modules") is None
        and all(
            is_scalar(v)
            for level in [settings, *(src.settings for src in slices[0].sources)]
            for v in level.values()
        )
    )

    models: list[ModelEntry]
    params: dict[str, Any]
    if uniform:
        translate = _mergekit if dialect == "mergekit" else _ours
        entries = [
            _RawEntry(i, src.written, src.path, dict(src.settings), src.where)
            for i, src in enumerate(slices[0].sources)
        ]
        base, models, params = translate(method, dict(settings), entries, base, fail)
        if not models and method != "passthrough":
            fail("`models` lists only the base model; list at least one fine-tuned model")
        missing = [name for name in METHODS[method].required if name not in params]
        if missing:
            fail(f"{method} needs parameter {', '.join(missing)} (see the module docstring)")
        _check_combinations(method, models, params, fail)
    else:
        _check_varying(method, options, settings, fail)
        seen = dict.fromkeys(src.path for sl in slices for src in sl.sources if src.path != base)
        models, params = [ModelEntry(path) for path in seen], {}
        if base is None:
            base = slices[0].sources[0].path
    if options["threshold_scope"] == "global" and METHODS[method].function is not ties:
        fail(f"options.threshold_scope 'global' applies to ties methods, not {method!r}")
    if ignored:
        warnings.warn(
            ConfigWarning(
                f"{fail.where}: ignored, as mergekit ignores them: {'; '.join(ignored)} "
                "(--strict / strict=True refuses them)"
            ),
            stacklevel=2,
        )
    if tokenizer is not None:
        _check_token_models(tokenizer, [base, *(src.path for sl in slices for src in sl.sources)], fail)
    return MergeConfig(
        method=method,
        base_model=base,
        given_base=_resolve_model(base_written, root) if base_written is not None else None,
        per_model_keys=per_model_keys,
        models=models,
        params=params,
        dtype=dtype,
        out_dtype=out_dtype if out_dtype is not None else dtype,
        exclude=list(exclude),
        options=options,
        source=source_copy,
        dialect=dialect,
        slices=slices,
        layered=layered,
        uniform=uniform,
        settings=settings,
        where=fail.where,
        ignored=ignored,
        tokenizer=tokenizer,
        chat_template=chat_template,
    )


def _check_token_models(tokenizer: TokenizerSettings, merged: list, fail: _Fail) -> None:
    """A token's row comes from one of the merged models (mergekit fails later, mid-merge)."""
    for token, setting in tokenizer.tokens.items():
        model = setting.source.model
        if model is not None and model not in merged:
            fail(
                f"tokenizer.tokens[{token!r}] takes its row from {model}, which is not one of the merged "
                f"models ({', '.join(dict.fromkeys(m for m in merged if m))})"
            )


def _per_model_keys(method: str, dialect: str, raw: dict, fail: _Fail) -> frozenset:
    """The parameters of a method that each model takes for itself (mergekit: its per-input ones)."""
    if dialect == "mergekit":
        if method in _INTERPOLATIONS:
            return frozenset(_INTERPOLATIONS[method][0])
        return frozenset(MERGEKIT_METHODS[method].model_params())
    return frozenset(name for name, p in _full_schema(method, raw, fail).items() if p.per_model)


def _base_weight_needed(method: str, raw: dict, fail: _Fail, base_written: str) -> None:
    """mergekit's linear averages the base with the listed models when base_model is set; its weight
    must then come from the global parameters (mergekit refuses the merge otherwise)."""
    if "weight" not in raw:
        fail(
            f"linear: base_model {base_written!r} is not listed under `models`; mergekit adds it to the "
            "average and needs its weight: list it with a weight, set a global `weight`, or drop base_model"
        )


def _settings(
    raw: Mapping,
    what: str,
    model: str | None,
    rule: Callable[[str, str | None], _Rule | None],
    fail: _Fail,
    root: Path | None,
    ignored: list[str] | None = None,
) -> dict[str, Setting]:
    """Parses and checks a mapping of parameter settings (scalars, gradients, filters); with
    ``ignored`` (lenient), unknown keys of filtered entries are noted there instead of refused."""
    out = {}
    for key, value in _params_mapping(raw, what, fail).items():
        key_rule = rule(key, model)
        if key_rule is None:  # ignored (see load_config's strict)
            continue

        def check(leaf: Any, where: str, key_rule: _Rule = key_rule, key: str = key) -> Any:
            checked = _coerce(leaf, key_rule, where, fail)
            if key in _PATH_PARAMS and isinstance(leaf, str):  # relative to the config's directory
                return _resolve(leaf, root)
            # numbers as the method takes them (YAML's "1e-5" strings too); other values as written
            return checked if isinstance(checked, float) else leaf

        ignore = (
            None if ignored is None else (lambda where: ignored.append(f"{where} (no filter: matches all)"))
        )
        out[key] = parse_setting(value, f"{what}.{key}", check, fail, ignore)
    return out


def _slices(
    value: Any,
    root: Path | None,
    base: str | None,
    rule: Callable[[str, str | None], _Rule | None],
    fail: _Fail,
    ignored: list[str] | None,
) -> list[SliceConfig]:
    if not isinstance(value, list) or not value:
        fail("`slices` must be a non-empty list of output slices (`- sources: [...]`)")
    slices = []
    for i, item in enumerate(value):
        where = f"slices[{i}]"
        if not isinstance(item, dict):
            fail(f"{where} must be a mapping with `sources`, got {item!r}")
        _unknown_keys(item, SLICE_KEYS, where, fail, ignored)
        if item.get("residual_weight") is not None and ignored is not None:
            ignored.append(f"{where}.residual_weight (no effect in mergekit either)")
        sources_raw = item.get("sources")
        if not isinstance(sources_raw, list) or not sources_raw:
            fail(f"{where}.sources must be a non-empty list of `{{model: PATH, layer_range: [START, STOP]}}`")
        sources = []
        for j, src in enumerate(sources_raw):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict):
                fail(f"{at} must be a mapping {{model: PATH, layer_range: [START, STOP]}}, got {src!r}")
            _unknown_keys(src, SOURCE_KEYS, at, fail, ignored)
            written = src.get("model")
            if not isinstance(written, str) or not written:
                fail(f"{at}: `model` must be a path string, got {written!r}")
            at = f"{at} ({written!r})"
            span = src.get("layer_range")
            if (
                not isinstance(span, (list, tuple))
                or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                or not 0 <= span[0] < span[1]
            ):
                fail(
                    f"{at}: layer_range must be [START, STOP] with 0 <= START < STOP (STOP excluded), "
                    f"got {span!r}"
                )
            settings = _settings(src.get("parameters"), f"{at} parameters", at, rule, fail, root, ignored)
            sources.append(
                SliceSource(_resolve_model(written, root), written, (span[0], span[1]), settings, at)
            )
        slice_base = item.get("base_model")
        if slice_base is not None and (not isinstance(slice_base, str) or not slice_base):
            fail(f"{where}.base_model must be a path string, got {slice_base!r}")
        settings = _settings(item.get("parameters"), f"{where}.parameters", None, rule, fail, root, ignored)
        slice_base = _resolve_model(slice_base, root) if slice_base is not None else None
        slices.append(SliceConfig(sources, settings, slice_base, where))
    return slices


def _check_slices(
    method: str,
    dialect: str,
    slices: list[SliceConfig],
    base: str | None,
    base_written: str | None,
    fail: _Fail,
) -> None:
    """What mergekit checks per slice: equal layer counts, no model twice, the base among the sources
    of methods that take one, and a single input for passthrough."""
    for sl in slices:
        spans = {src.layer_range[1] - src.layer_range[0] for src in sl.sources if src.layer_range}
        if len(spans) > 1:
            fail(
                f"{sl.where}: its sources give different numbers of layers ({sorted(spans)}); "
                "they must be equal"
            )
        paths = [src.path for src in sl.sources]
        twice = next((p for p in paths if paths.count(p) > 1), None)
        if twice is not None:
            fail(f"{sl.where}: model {twice!r} is listed twice among its sources")
        slice_base = sl.base_model or base
        if method == "passthrough":
            if len(sl.sources) != 1:
                what = "models (with the base_model)" if sl.where == "models" else "sources"
                fail(
                    f"passthrough takes exactly one model per slice; {sl.where} has {len(sl.sources)} {what}"
                )
        elif (
            not (dialect == "mergekit" and method in BASELESS_METHODS)
            and not (dialect == "mergekit" and method in BASE_OPTIONAL and slice_base is None)
            and slice_base not in paths
        ):
            shown = base_written if sl.base_model is None else sl.base_model
            fail(
                f"{sl.where}: the base model {shown!r} is not among its sources; {method} merges task "
                "vectors against the base's layers (mergekit refuses this too)"
            )


def _check_varying(method: str, options: dict, settings: dict, fail: _Fail) -> None:
    """Methods and options that need one set of parameters for the whole model."""
    spec = METHODS[method]
    if spec.kind == "needs_stats":
        fail(
            f"{method} takes one set of parameters for the whole model: "
            "slices, gradients and filters are not supported"
        )
    if options["threshold_scope"] == "global":
        fail(
            "options.threshold_scope 'global' needs one density for the whole model: "
            "no slices, gradients or filters"
        )
    missing = [name for name in spec.required if name not in settings]
    if missing:
        fail(f"{method} needs parameter {', '.join(missing)} (see the module docstring)")


def method_kwargs(config: MergeConfig) -> dict[str, Any]:
    """Keyword arguments for the method, as :func:`mergekernels.merge` takes them, of a configuration
    whose tensors all take the same parameters (``config.uniform``; otherwise see
    :meth:`MergeConfig.tensor_params`).

    Global parameters as they are; a parameter given for some model becomes a list in model order,
    models without it taking the global value, else the value the method's name implies, else the
    default of the method function's signature (``weights``: 1). Methods that draw random masks get
    ``seed`` from ``options.seed``; ``regmean``'s ``grams`` file is loaded (``torch.load``, weights
    only). Engine options (``threshold_scope``, ``memory_cap``, ...) stay in ``config.options``.
    """
    if not config.uniform:
        raise ValueError(
            f"{config.where}: parameters vary per tensor (slices, gradients or filters); "
            "use MergeConfig.tensor_params or mergekernels.planner"
        )
    return _kwargs(config.method, config.params, config.models, config.options)


def _kwargs(method: str, params: dict, models: list[ModelEntry], options: dict) -> dict[str, Any]:
    spec = METHODS[method]
    kwargs = dict(params)
    names: list[str] = []
    for model in models:
        names.extend(n for n in model.params if n not in names)
    for name in names:
        default = params[name] if name in params else _default_of(method, name)
        if default is inspect.Parameter.empty:
            raise ValueError(f"{method}: parameter {name!r} has no default; set it for every model")
        values = [model.params.get(name, default) for model in models]
        kwargs[name] = [_NONE_MEANS.get(name) if v is None else v for v in values]
    if spec.uses_rng:
        kwargs["seed"] = options.get("seed", OPTION_DEFAULTS["seed"])
    if isinstance(kwargs.get("grams"), str):
        kwargs["grams"] = _load_grams(kwargs["grams"])
    return kwargs


@functools.lru_cache(maxsize=2)
def _load_grams(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


__all__ = [
    "DIALECTS",
    "MERGEKIT_METHODS",
    "ConfigWarning",
    "MergeConfig",
    "ModelEntry",
    "SliceConfig",
    "SliceSource",
    "TensorParams",
    "load_config",
    "method_kwargs",
    "read_documents",
]
