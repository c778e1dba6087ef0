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
    tokenizer_source: base          # the only value accepted: the base's tokenizer files are copied
    exclude: ["*.embed_tokens.*"]   # ours: glob patterns of tensors kept at the base's value
    options: {seed: 0, shard_size: 5GB, threshold_scope: tensor}   # ours: engine options
    dialect: mergekit               # ours: which parameter names apply (see below)

Dialects. ``linear``, ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``,
``breadcrumbs_ties``, ``della`` and ``della_linear`` are mergekit's names as well as ours; for them
the default dialect is ``mergekit``: mergekit's parameter names, defaults and semantics. Writing
``dialect: mergekernels`` selects our parameter names and defaults instead (those of the method's
function signature, e.g. ``ties``: ``density``, ``weights``, ``scale``, ``merge``,
``weighted_election``). Our other methods (``dare``, ``ace``, ``tsv_m``, ``iso_c``, ``iso_cts``,
``wudi``, ``regmean``) exist only in the ``mergekernels`` dialect.

mergekit -> ours (mergekit's defaults are written into ``MergeConfig.params`` so that our own
defaults never leak into a mergekit merge):

- ``weight`` -> ``weights`` (mergekit requires it; we default it to 1), ``lambda`` -> ``scale``
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

Not reproduced, hence refused with an error: per-layer gradients and filtered parameter values
(lists), ``slices`` / ``layer_range``, ``modules``, tokenizer merging (``tokenizer``, ``chat_template``,
``tokenizer_source`` other than ``base``), ``rescale: true`` for ties and breadcrumbs (mergekit's L1
rescale of trimmed vectors) and ``rescale: false`` for della, breadcrumbs with density + gamma > 1
(mergekit silently shrinks gamma) and negative weights with a sign consensus (mergekit compares the
signs of weighted task vectors). Known differences that stay: random masks come from our counter-based
generator, not ``torch.bernoulli``, so DARE/DELLA keep different (equally distributed) entries; DELLA
divides survivors by their keep probability (the paper) where mergekit matches the L1 norm, and
ranks a tensor's rows over all trailing dimensions; TIES keeps entries tied with the k-th largest
magnitude where mergekit's argsort keeps exactly k.

An entry of ``models`` equal to ``base_model`` is dropped (mergekit skips the base's task vector;
for ``linear`` its weight still counts, see above). Options and their defaults: ``shard_size``
(bytes or "5GB"/"500MB"/"4GiB", default 5GB), ``threshold_scope`` ("tensor" or "global", ties only,
default "tensor"), ``seed`` (default 0), ``allow_missing`` ("error" or "base": a tensor missing from
a fine-tuned model is an error or taken from the base, default "error"), ``allow_nonfinite``
(default false), ``memory_cap`` (bytes or a size string, default None: automatic).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .methods import METHODS
from .methods.ace import GATES, ORIENTATIONS
from .methods.breadcrumbs import breadcrumbs
from .methods.della import della
from .methods.ties import MERGE_MODES, ties
from .methods.wudi import SOLVERS


@dataclass
class ModelEntry:
    """One fine-tuned model: its path (resolved relative to the YAML file's directory when relative)
    and its per-model parameters in our names."""

    path: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    """A validated merge configuration; see the module docstring for the format.

    Attributes:
        method: a key of :data:`mergekernels.methods.METHODS`.
        base_model: the base model's path (for mergekit's ``linear`` without a base: the first model's).
        models: the fine-tuned models in file order, without entries equal to the base.
        params: global method parameters in our names (mergekit configurations: every mergekit
            default written out).
        dtype: compute dtype (``dtype``), None if not given.
        out_dtype: output dtype: ``out_dtype``, else ``dtype`` (as mergekit), else None (the base's).
        exclude: glob patterns of tensors kept at the base's value (default none).
        options: engine options, every one present (defaults in :data:`OPTION_DEFAULTS`).
        source: the parsed YAML as given, to be saved beside the output.
        dialect: ``"mergekit"`` or ``"mergekernels"``: whose parameter names the file uses.
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


DIALECTS = ("mergekit", "mergekernels")
TOP_LEVEL_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "exclude",
    "options",
    "dialect",
)
MODEL_KEYS = ("model", "parameters")
# mergekit keys for features we do not have, with the reason given in the error.
_UNSUPPORTED_KEYS = {
    "slices": "layer-range merges (`slices` / `layer_range`) are not supported; "
    "list whole models under `models`",
    "modules": "per-module merges (`modules`) are not supported",
    "tokenizer": "the `tokenizer` block is not supported: the base model's tokenizer files are copied "
    "(the only accepted setting is `tokenizer_source: base`)",
    "chat_template": "`chat_template` is not supported: "
    "the base model's tokenizer files are copied as they are",
}
# mergekit methods we do not implement (named so the error says "not supported", not "unknown").
MERGEKIT_UNSUPPORTED = (
    "arcee_fusion",
    "karcher",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "sce",
    "slerp",
)
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
    "return_info",
    "return_loss",
    "out_dtype",
    "seed",
    "l1_norms",  # computed by the engine's pre-pass
    "coefficients",  # awd: computed by its statistics pass
}
# Defaults that the signatures spell None: what None means per model.
_NONE_MEANS = {"weights": 1.0}


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

    @property
    def where(self) -> str:
        return f"models[{self.index}] ({self.written!r})"


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


def _read(source: str | Path | Mapping) -> tuple[dict, Path | None, _Fail]:
    if isinstance(source, Mapping):
        fail = _Fail("merge config")
        data, root = copy.deepcopy(dict(source)), None
    else:
        path = Path(source)
        fail = _Fail(str(path))
        if not path.is_file():
            raise FileNotFoundError(f"merge config {str(path)!r} not found")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {exc}") from exc
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
        elif "int" in rule.types:
            ok, out = isinstance(value, int), value
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


def _entries(data: dict, root: Path | None, fail: _Fail) -> list[_RawEntry]:
    models = data.get("models")
    if models is None:
        fail("`models` is missing: list the fine-tuned models (`- model: PATH`, with optional parameters)")
    if not isinstance(models, list):
        fail(f"`models` must be a list of models, got {type(models).__name__}")
    if not models:
        fail("`models` is empty: list at least one fine-tuned model")
    out = []
    for i, item in enumerate(models):
        if isinstance(item, str):
            written, params = item, {}
        elif isinstance(item, dict):
            unknown = sorted(set(item) - set(MODEL_KEYS), key=str)
            if unknown:
                fail(f"models[{i}]: unknown key {unknown[0]!r}; valid: {', '.join(MODEL_KEYS)}")
            written = item.get("model")
            if not isinstance(written, str) or not written:
                fail(f"models[{i}]: `model` must be a path string, got {written!r}")
            params = _params_mapping(item.get("parameters"), f"models[{i}] ({written!r}) parameters", fail)
        else:
            fail(
                f"models[{i}] must be a path or a mapping {{model: PATH, parameters: {{...}}}}, got {item!r}"
            )
        out.append(_RawEntry(i, written, _resolve(written, root), params))
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


def _mergekit(
    method: str, raw: dict, entries: list[_RawEntry], base: str | None, fail: _Fail
) -> tuple[str | None, list[ModelEntry], dict[str, Any]]:
    """Translates a mergekit configuration into our method's parameters (see the module docstring)."""
    mk = MERGEKIT_METHODS[method]
    model_defaults, global_defaults = mk.model_params(), mk.global_params()
    valid = ", ".join([*model_defaults, *global_defaults])
    glob: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _MERGEKIT_RULES or (key not in model_defaults and key not in global_defaults):
            fail(f"unknown parameter {key!r} for {method}; valid: {valid}")
        glob[key] = _coerce(value, _MERGEKIT_RULES[key], f"parameters.{key}", fail)
    per: list[dict[str, Any]] = []
    for entry in entries:
        values = {}
        for key, value in entry.params.items():
            if key in global_defaults:
                fail(
                    f"{entry.where}: {key!r} is a global parameter of {method}; set it under the top-level "
                    f"`parameters` (per-model parameters: {', '.join(model_defaults)})"
                )
            if key not in model_defaults:
                fail(
                    f"{entry.where}: unknown parameter {key!r} for {method}; valid per model: "
                    f"{', '.join(model_defaults)}"
                )
            values[key] = _coerce(value, _MERGEKIT_RULES[key], f"{entry.where} parameters.{key}", fail)
        per.append(values)
    setting = {**global_defaults, **{k: v for k, v in glob.items() if k in global_defaults}}

    def effective(i: int, key: str) -> Any:
        value = per[i].get(key, glob.get(key, model_defaults[key]))
        return 1.0 if value is None else value

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


def _ours(
    method: str, raw: dict, entries: list[_RawEntry], base: str | None, fail: _Fail
) -> tuple[str | None, list[ModelEntry], dict[str, Any]]:
    schema = _our_schema(method)
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(METHODS[method].function).parameters.values()):
        # awd: also the parameters of the method it hands the disentangled vectors to (``then``);
        # names it shares with awd's own take a ``then_`` prefix
        then = raw.get("then", inspect.signature(METHODS[method].function).parameters["then"].default)
        if not isinstance(then, str) or then not in METHODS:
            fail(f"parameters.then must name a method; valid: {', '.join(sorted(METHODS))}")
        for name, param in _our_schema(then).items():
            schema[f"then_{name}" if name in schema else name] = param
    valid = ", ".join(schema) or "(none)"
    per_model = ", ".join(n for n, p in schema.items() if p.per_model) or "none"

    def reject_special(key: str, where: str) -> None:
        if key == "seed":
            fail(f"{where}seed is an engine option: set it as options.seed")
        if key == "out_dtype":
            fail(f"{where}out_dtype is a top-level key, not a parameter")

    params = {}
    for key, value in raw.items():
        reject_special(key, "parameters: ")
        if key not in schema:
            fail(f"unknown parameter {key!r} for {method}; valid: {valid}")
        params[key] = _coerce(value, schema[key].rule, f"parameters.{key}", fail)
    models = []
    for entry in _drop_base(entries, base):
        values = {}
        for key, value in entry.params.items():
            reject_special(key, f"{entry.where}: ")
            if key not in schema:
                fail(f"{entry.where}: unknown parameter {key!r} for {method}; valid per model: {per_model}")
            if not schema[key].per_model:
                fail(
                    f"{entry.where}: {key!r} of {method} cannot be set per model; set it under the top-level "
                    f"`parameters` (per-model parameters of {method}: {per_model})"
                )
            values[key] = _coerce(value, schema[key].rule, f"{entry.where} parameters.{key}", fail)
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
def load_config(source: str | Path | Mapping) -> MergeConfig:
    """Reads and validates a merge configuration.

    Args:
        source: a YAML file (str or Path; relative model paths are resolved against its directory)
            or an already parsed mapping (paths relative to the working directory).

    Returns:
        The validated :class:`MergeConfig`, parameters translated to our names.

    Raises:
        ValueError: naming the file (or "merge config") and the offending key, with the valid keys,
            for invalid YAML, unknown keys, methods or parameters, values of the wrong type or
            range, unsupported mergekit features, a missing base model or no models.
        FileNotFoundError: if the file does not exist.
    """
    data, root, fail = _read(source)
    source_copy = copy.deepcopy(data)
    for key in data:
        if key in _UNSUPPORTED_KEYS:
            fail(_UNSUPPORTED_KEYS[key])
        if key not in TOP_LEVEL_KEYS:
            fail(f"unknown top-level key {key!r}; valid: {', '.join(TOP_LEVEL_KEYS)}")

    method = data.get("merge_method")
    ours = sorted(set(METHODS) - set(MERGEKIT_METHODS))
    shared = ", ".join(MERGEKIT_METHODS)
    if method is None:
        fail(f"`merge_method` is missing; valid: {shared} (mergekit) and {', '.join(ours)} (mergekernels)")
    if method in MERGEKIT_UNSUPPORTED:
        fail(f"merge_method {method!r} (mergekit) is not supported; supported mergekit methods: {shared}")
    if not isinstance(method, str) or method not in METHODS:
        fail(
            f"unknown merge_method {method!r}; valid: {shared} (mergekit) "
            f"and {', '.join(ours)} (mergekernels)"
        )
    dialect = data.get("dialect")
    if dialect is None:
        dialect = "mergekit" if method in MERGEKIT_METHODS else "mergekernels"
    if dialect not in DIALECTS:
        fail(f"unknown dialect {dialect!r}; valid: {', '.join(DIALECTS)}")
    if dialect == "mergekit" and method not in MERGEKIT_METHODS:
        fail(f"{method!r} is not a mergekit method; use dialect: mergekernels, or one of: {shared}")

    tokenizer = data.get("tokenizer_source")
    if tokenizer is not None and tokenizer != "base":
        fail(
            f"tokenizer_source {tokenizer!r} is not supported; the only accepted value is 'base' "
            "(the base model's tokenizer files are copied)"
        )
    base_written = data.get("base_model")
    if base_written is not None and (not isinstance(base_written, str) or not base_written):
        fail(f"base_model must be a path string, got {base_written!r}")
    base = _resolve(base_written, root) if base_written is not None else None
    if base is None and not (dialect == "mergekit" and method == "linear"):
        fail(f"base_model is missing: {method} merges task vectors relative to a base model")
    entries = _entries(data, root, fail)
    raw = _params_mapping(data.get("parameters"), "parameters", fail)
    dtype, out_dtype = _dtype(data, "dtype", fail), _dtype(data, "out_dtype", fail)
    exclude = data.get("exclude")
    exclude = [] if exclude is None else exclude
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        fail(f"exclude must be a list of glob patterns (strings), got {exclude!r}")
    options = _options(data, fail)

    translate = _mergekit if dialect == "mergekit" else _ours
    base, models, params = translate(method, raw, entries, base, fail)
    if not models:
        fail("`models` lists only the base model; list at least one fine-tuned model")
    missing = [name for name in METHODS[method].required if name not in params]
    if missing:
        fail(f"{method} needs parameter {', '.join(missing)} (see the module docstring)")
    _check_combinations(method, models, params, fail)
    if options["threshold_scope"] == "global" and METHODS[method].function is not ties:
        fail(f"options.threshold_scope 'global' applies to ties methods, not {method!r}")
    for path_param in ("grams", "scores"):  # files named relative to the config's directory
        if isinstance(params.get(path_param), str):
            params[path_param] = _resolve(params[path_param], root)
    return MergeConfig(
        method=method,
        base_model=base,
        models=models,
        params=params,
        dtype=dtype,
        out_dtype=out_dtype if out_dtype is not None else dtype,
        exclude=list(exclude),
        options=options,
        source=source_copy,
        dialect=dialect,
    )


def method_kwargs(config: MergeConfig) -> dict[str, Any]:
    """Keyword arguments for the method, as :func:`mergekernels.merge` takes them.

    Global parameters as they are; a parameter given for some model becomes a list in model order,
    models without it taking the global value, else the value the method's name implies, else the
    default of the method function's signature (``weights``: 1). Methods that draw random masks get
    ``seed`` from ``options.seed``; ``regmean``'s ``grams`` file is loaded (``torch.load``, weights
    only). Engine options (``threshold_scope``, ``memory_cap``, ...) stay in ``config.options``.
    """
    spec = METHODS[config.method]
    kwargs = dict(config.params)
    names: list[str] = []
    for model in config.models:
        names.extend(n for n in model.params if n not in names)
    for name in names:
        default = config.params[name] if name in config.params else _default_of(config.method, name)
        if default is inspect.Parameter.empty:
            raise ValueError(f"{config.method}: parameter {name!r} has no default; set it for every model")
        values = [model.params.get(name, default) for model in config.models]
        kwargs[name] = [_NONE_MEANS.get(name) if v is None else v for v in values]
    if spec.uses_rng:
        kwargs["seed"] = config.options.get("seed", OPTION_DEFAULTS["seed"])
    if isinstance(kwargs.get("grams"), str):
        kwargs["grams"] = torch.load(kwargs["grams"], map_location="cpu", weights_only=True)
    return kwargs


__all__ = ["DIALECTS", "MERGEKIT_METHODS", "MergeConfig", "ModelEntry", "load_config", "method_kwargs"]
