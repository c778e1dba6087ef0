"""The merge plan: one task per output tensor, shared by ``mk.merge`` and the checkpoint engine.

A task names its inputs (which model, which tensor: slices read layer ``start + i`` of each source
for output layer ``i`` of the slice), which of them is the base, the method, and every parameter
already resolved for that tensor (gradients at the layer's position, filters on its name; see
:mod:`mergekernels.parameters` and :meth:`mergekernels.config.MergeConfig.tensor_params`).

Layers are found from tensor names alone, with no table of architectures: a name of the form
``<stem><N>.<rest>`` where the stem ends in ``layers.``, ``layer.``, ``h.``, ``blocks.`` or
``block.`` (``model.layers.3.mlp.up_proj.weight``, ``transformer.h.3.attn.c_attn.weight``) is
tensor ``rest`` of layer N. Everything else lies outside the layers. With ``slices``, the output's
layers are the slices' layers in order, renumbered from 0 (layer stacking and frankenmerges); the
tensors outside the layers come from the first slice's sources when they feed the layers (input
embeddings: ``embed_tokens``, ``embed_in``, ``wte``, ``wpe``, ``word_embeddings`` ...) and from the
last slice's sources otherwise (final norm, lm_head), as mergekit takes its pre- and post-weights,
with t = 0.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .config import MergeConfig, SliceConfig, TensorParams

_LAYER = re.compile(r"^(?P<stem>(?:[^.]+\.)*?(?:layers|layer|h|blocks|block)\.)(?P<index>\d+)\.(?P<rest>.+)$")
# Input embeddings by name (not ``embed_out``: GPT-NeoX's output head).
_EMBEDDING = re.compile(
    r"(?:^|\.)(?:embed_tokens|embed_in|embed_positions|tok_embeddings|word_embeddings|position_embeddings"
    r"|token_type_embeddings|embeddings|wte|wpe)(?:\.|$)"
)
# Vocabulary tensors (the token on axis 0): input embeddings, LM heads and their biases, by the names
# of the HF architectures (mergekit's ``vocabulary_axis: 0`` tensors), outside any layer stack.
_VOCABULARY = re.compile(
    r"(?:^|\.)(?:embed_tokens|tok_embeddings|word_embeddings|wte|embed_in|shared|lm_head|embed_out"
    r"|vocab_projector)\.(?:weight|bias)$"
    r"|^(?:output\.weight|cls\.predictions\.(?:bias|decoder\.weight|decoder\.bias))$"
)


class PlanError(ValueError):
    """A configuration cannot be planned on these models; the message names the model and tensor."""


@dataclass(frozen=True)
class Source:
    """One input tensor: a model (an index into :attr:`MergePlan.models`) and the tensor's name there."""

    model: int
    name: str


@dataclass
class TensorTask:
    """How one output tensor is made.

    Attributes:
        name: the output tensor's name.
        base: the base's tensor (copied as it is when ``merge`` is false).
        inputs: the fine-tuned tensors, in the order the method's per-model parameters follow.
        merge: false for tensors kept from the base: non-floating tensors, excluded ones, and slices
            whose only source is the base.
        params: the method's keyword arguments for this tensor.
        shape, dtype: the output's shape (the base tensor's, but for vocabulary tensors whose rows
            change) and the base tensor's dtype.
        vocab: for vocabulary tensors whose rows change: ``"permute"`` (a tokenizer merge: each
            input's rows are gathered into the output vocabulary's order, see
            :class:`mergekernels.vocab.RowLayout`) or ``"truncate"`` (no tokenizer setting and inputs
            of different row counts: their common first rows are merged); None otherwise.
    """

    name: str
    base: Source
    inputs: tuple[Source, ...]
    merge: bool
    params: dict
    shape: tuple[int, ...]
    dtype: torch.dtype
    vocab: str | None = None


@dataclass
class MergePlan:
    """Every output tensor's task, in output order.

    Attributes:
        method: the merge method's name.
        models: the models' references (paths), indexed by :attr:`Source.model`; 0 is the base.
        tasks: one per output tensor.
        num_layers: the output's layer count when slices set it (None: the base's).
        vocabulary: the merged vocabulary of a tokenizer merge (:class:`mergekernels.vocab.Vocabulary`).
        vocab_rows: the rows of the output's vocabulary tensors when they differ from the base's.
    """

    method: str
    models: list[str]
    tasks: list[TensorTask]
    num_layers: int | None = None
    vocabulary: object | None = None
    vocab_rows: int | None = None


def is_vocabulary_tensor(name: str) -> bool:
    """Whether a tensor is indexed by token on axis 0 (embeddings, LM heads, their biases)."""
    return split_layer(name) is None and bool(_VOCABULARY.search(name))


def split_layer(name: str) -> tuple[str, int, str] | None:
    """(stem, layer index, rest) of a tensor inside a layer stack, None for other tensors."""
    match = _LAYER.match(name)
    return (match["stem"], int(match["index"]), match["rest"]) if match else None


class _Layers:
    """One model's layer stacks: stem -> layer index -> the tensors' rest names, in file order."""

    def __init__(self, names: Sequence[str]):
        self.stacks: dict[str, dict[int, list[str]]] = {}
        self.outside: list[str] = []
        for name in names:
            parts = split_layer(name)
            if parts is None:
                self.outside.append(name)
            else:
                self.stacks.setdefault(parts[0], {}).setdefault(parts[1], []).append(parts[2])

    def count(self, stem: str) -> int:
        layers = self.stacks.get(stem, {})
        return max(layers) + 1 if layers else 0


def position(index: int, count: int) -> float:
    """A layer's gradient position in a run of `count` layers: i / (n - 1); 1 for a single layer."""
    return index / (count - 1) if count > 1 else 1.0


# ----------------------------------------------------------------------------------------------
def plan_config(
    config: MergeConfig, catalogs: Mapping[str, Mapping[str, object]], vocabulary: object | None = None
) -> MergePlan:
    """Plans a merge configuration on models described by their tensors.

    Args:
        config: the loaded configuration.
        catalogs: for every model path the configuration names, its tensors in file order: name ->
            an object with ``shape`` and ``dtype`` (a checkpoint's header entries, or the tensors).
        vocabulary: a tokenizer merge's vocabulary (:class:`mergekernels.vocab.Vocabulary`): the
            vocabulary tensors get its rows, gathered from each model (``vocab: "permute"``).

    Without a vocabulary, vocabulary tensors whose row counts differ are cut to their common first
    rows (``vocab: "truncate"``, as mergekit's ``--unsafe-truncate-embeddings``), with a
    :class:`mergekernels.vocab.VocabularyWarning` naming them and their shapes.

    Raises:
        PlanError: naming the model and tensor, for a layer range beyond a model's layers, a tensor
            missing from a source, mismatched shapes, names without a recognisable layer stack.
    """
    allow_missing = config.options.get("allow_missing") == "base"
    models = list(dict.fromkeys([config.base_model, *(s.path for sl in config.slices for s in sl.sources)]))
    index = {path: i for i, path in enumerate(models)}
    builder = _Builder(config, models, catalogs, allow_missing, dtype_cast=config.dtype is not None)
    builder.vocabulary = vocabulary
    if not config.layered:
        names = list(catalogs[config.base_model])
        owner = _modules(config, names)
        base_layers = _Layers(names)
        for name in names:
            sl_index = owner[name]
            sl = config.slices[sl_index]
            parts = split_layer(name)
            t = 0.0 if parts is None else position(parts[1], base_layers.count(parts[0]))
            builder.add(sl_index, sl, name, [name] * len(sl.sources), t, [index[s.path] for s in sl.sources])
        return builder.plan(models)

    reference = config.base_model
    layers = {path: _Layers(list(catalogs[path])) for path in models}
    stems = list(layers[reference].stacks)
    if len(stems) != 1:
        found = ", ".join(repr(s) for s in stems) or "none"
        raise PlanError(
            f"{reference}: slices need one stack of layers named '<prefix>.layers.N.<tensor>' (or h.N, "
            f"blocks.N, layer.N); found stacks: {found}"
        )
    stem = stems[0]
    pre = [n for n in layers[reference].outside if _EMBEDDING.search(n)]
    post = [n for n in layers[reference].outside if not _EMBEDDING.search(n)]

    def outside(sl_index: int, name: str) -> None:
        sl = config.slices[sl_index]
        builder.add(sl_index, sl, name, [name] * len(sl.sources), 0.0, [index[s.path] for s in sl.sources])

    for name in pre:
        outside(0, name)
    out_layer = 0
    for sl_index, sl in enumerate(config.slices):
        span = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for src in sl.sources:
            have = layers[src.path].count(stem)
            if src.layer_range[1] > have:
                raise PlanError(
                    f"{sl.where}: {src.where} asks for layers {list(src.layer_range)} but {src.path} has "
                    f"{have} layer(s) under {stem!r}"
                )
        for offset in range(span):
            t = position(offset, span)
            first = sl.sources[0]
            for rest in layers[first.path].stacks[stem].get(first.layer_range[0] + offset, []):
                in_names = [f"{stem}{s.layer_range[0] + offset}.{rest}" for s in sl.sources]
                out_name = f"{stem}{out_layer}.{rest}"
                builder.add(sl_index, sl, out_name, in_names, t, [index[s.path] for s in sl.sources])
            out_layer += 1
    for name in post:
        outside(len(config.slices) - 1, name)
    return builder.plan(models, num_layers=out_layer)


def _modules(config: MergeConfig, names: list[str]) -> dict[str, int]:
    """Which slice (module) each tensor belongs to: with ``modules``, the one whose tensor-name
    prefix is the longest that names it (``""`` takes every tensor no other module takes)."""
    if config.slices[0].module is None:
        return dict.fromkeys(names, 0)
    prefixes = {sl.module: i for i, sl in enumerate(config.slices)}
    owner: dict[str, int] = {}
    for name in names:
        best = None
        for prefix in prefixes:
            if (
                prefix == ""
                or name == prefix
                or name.startswith(prefix if prefix.endswith(".") else prefix + ".")
            ):
                if best is None or len(prefix) > len(best):
                    best = prefix
        if best is not None:
            owner[name] = prefixes[best]
    stems = sorted({".".join(n.split(".")[:2]) for n in names})
    for prefix, i in prefixes.items():
        if i not in owner.values():
            raise PlanError(
                f"{config.slices[i].where}: no tensor of {config.base_model} starts with {prefix!r}; "
                "modules are named by tensor-name prefix here (not by mergekit's per-architecture module "
                "names), e.g. "
                f"{', '.join(repr(x) for x in stems[:6])}, or '' for every tensor no other module takes"
            )
    outside = [n for n in names if n not in owner]
    if outside:
        raise PlanError(
            f"{len(outside)} tensor(s) of {config.base_model} belong to no module, e.g. {outside[0]!r}; "
            "add a module for them (the prefix '' takes every tensor no other module takes)"
        )
    return owner


class _Builder:
    """Makes the tasks of one configuration, checking that every input exists and fits."""

    def __init__(self, config, models, catalogs, allow_missing: bool, dtype_cast: bool):
        self.config, self.models, self.catalogs = config, models, catalogs
        self.allow_missing, self.dtype_cast = allow_missing, dtype_cast
        self.tasks: list[TensorTask] = []
        self.vocabulary = None
        self.truncated: list[str] = []  # "name: shapes -> shape" of vocabulary tensors cut to common rows

    def plan(self, models: list[str], num_layers: int | None = None) -> MergePlan:
        if self.truncated:
            from .vocab import VocabularyWarning

            warnings.warn(
                "vocabulary tensors of different sizes are cut to their common first rows (no tokenizer "
                "setting; `tokenizer_source: union` or `base` aligns the tokens instead): "
                + "; ".join(self.truncated),
                VocabularyWarning,
                stacklevel=3,
            )
        rows = {t.shape[0] for t in self.tasks if t.vocab is not None}
        vocab_rows = self.vocabulary.size if self.vocabulary is not None else min(rows, default=None)
        return MergePlan(self.config.method, models, self.tasks, num_layers, self.vocabulary, vocab_rows)

    def add(
        self,
        sl_index: int,
        sl: SliceConfig,
        out_name: str,
        in_names: list[str],
        t: float,
        model_ids: list[int],
    ) -> None:
        for src, name in zip(sl.sources, in_names, strict=True):
            if name not in self.catalogs[src.path] and not self.allow_missing:
                raise PlanError(
                    f"{src.path}: lacks tensor {name!r} of the base {self.config.base_model} "
                    "(options: {allow_missing: base} takes the base's value for it)"
                )
        params: TensorParams = self.config.tensor_params(sl_index, out_name, in_names, t)
        base = Source(model_ids[params.base], in_names[params.base])
        base_info = self.catalogs[self.models[base.model]].get(base.name)
        if base_info is None:
            raise PlanError(f"{self.models[base.model]}: lacks tensor {base.name!r} ({sl.where})")
        vocab = None
        if is_vocabulary_tensor(out_name):
            vocab = (
                "permute"
                if self.vocabulary is not None
                else self._truncation(out_name, in_names, model_ids, params)
            )
        inputs = []
        for i in params.experts:
            name, path = in_names[i], self.models[model_ids[i]]
            info = self.catalogs[path].get(name)
            if info is None:  # allow_missing: the base's value, i.e. a zero task vector
                inputs.append(base)
                continue
            _check_fit(name, info, base_info, rows_may_differ=vocab is not None)
            if info.dtype != base_info.dtype and not self.dtype_cast and base_info.dtype.is_floating_point:
                raise PlanError(
                    f"tensor {name!r}: dtype {info.dtype} in {_where(info, path)} but {base_info.dtype} "
                    f"in the base's {_where(base_info, self.models[base.model])}; "
                    "set `dtype:` in the config to compute in one dtype"
                )
            inputs.append(Source(model_ids[i], name))
        merge = (
            base_info.dtype.is_floating_point
            and not is_excluded(out_name, self.config.exclude)
            and (bool(inputs) or self.config.method == "passthrough")
        )
        shape = tuple(base_info.shape)
        if vocab == "permute":
            shape = (self.vocabulary.size, *shape[1:])
        elif vocab == "truncate":
            shape = (min(info.shape[0] for _, info in self._sources(in_names, model_ids, params)), *shape[1:])
        self.tasks.append(
            TensorTask(out_name, base, tuple(inputs), merge, params.kwargs, shape, base_info.dtype, vocab)
        )

    def _sources(self, in_names, model_ids, params) -> list[tuple[str, object]]:
        """(model, header entry) of the tensor's base and present inputs."""
        found = []
        for i in (params.base, *params.experts):
            path = self.models[model_ids[i]]
            info = self.catalogs[path].get(in_names[i])
            if info is not None:
                found.append((path, info))
        return found

    def _truncation(self, out_name: str, in_names, model_ids, params) -> str | None:
        """ "truncate" when the vocabulary tensor's inputs differ in rows (no tokenizer setting)."""
        sources = self._sources(in_names, model_ids, params)
        if len({tuple(info.shape[:1]) for _, info in sources}) < 2:
            return None
        rows = min(info.shape[0] for _, info in sources)
        shapes = ", ".join(f"{list(info.shape)} in {path}" for path, info in sources)
        self.truncated.append(f"{out_name}: {shapes} -> {rows} rows")
        return "truncate"


def _where(info: object, model: str) -> str:
    return str(getattr(info, "file", model))


def _check_fit(name: str, info: object, base_info: object, rows_may_differ: bool = False) -> None:
    skip = 1 if rows_may_differ and len(info.shape) and len(base_info.shape) else 0
    if tuple(info.shape)[skip:] != tuple(base_info.shape)[skip:] or len(info.shape) != len(base_info.shape):
        raise PlanError(
            f"tensor {name!r}: shape {list(info.shape)} in {_where(info, 'a fine-tuned model')} but "
            f"{list(base_info.shape)} in the base's {_where(base_info, 'base')}"
        )


def is_excluded(name: str, patterns: Sequence[str]) -> bool:
    """Whether a tensor name matches one of the exclude globs (it stays at the base's value)."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


# ----------------------------------------------------------------------------------------------
def plan_models(
    base: Mapping[str, object],
    finetuned: Sequence[Mapping[str, object]],
    method: str,
    params: dict,
    exclude: Sequence[str] = (),
) -> MergePlan:
    """The plan of ``mk.merge``: every tensor of the base merged with the same tensor of each
    fine-tuned model, with one set of parameters (models: ``"base"``, then ``"model 0"``, ...)."""
    models = ["base", *(f"model {i}" for i in range(len(finetuned)))]
    tasks = []
    for name, info in base.items():
        inputs = tuple(Source(i + 1, name) for i in range(len(finetuned)))
        for i, sd in enumerate(finetuned):
            if tuple(sd[name].shape) != tuple(info.shape):
                raise PlanError(
                    f"merge: tensor {name!r}: finetuned[{i}] has shape {list(sd[name].shape)}, "
                    f"the base {list(info.shape)}"
                )
        merge = info.dtype.is_floating_point and not is_excluded(name, exclude)
        tasks.append(TensorTask(name, Source(0, name), inputs, merge, params, tuple(info.shape), info.dtype))
    return MergePlan(method, models, tasks)


def matrix_groups(
    tasks: Sequence[TensorTask], takes_matrix: Callable[[TensorTask], bool]
) -> dict[tuple, list[TensorTask]]:
    """Tasks of a matrix method batched together: same shape, dtype and parameters, in plan order."""
    groups: dict[tuple, list[TensorTask]] = {}
    for task in tasks:
        if task.merge and takes_matrix(task):
            groups.setdefault((task.shape, task.dtype, id(task.params)), []).append(task)
    return groups


__all__ = [
    "MergePlan",
    "PlanError",
    "Source",
    "TensorTask",
    "is_excluded",
    "is_vocabulary_tensor",
    "matrix_groups",
    "plan_config",
    "plan_models",
    "position",
    "split_layer",
]
