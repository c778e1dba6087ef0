"""APL (Kong, Zhang, Wang 2024, arXiv 2408.09485): Activated Parameter Locating via causal
intervention, then an importance-guided DARE merge.

The paper's method section and code were not available: this module implements the specification
in ``specs/apl.md``, a *reconstruction* from the abstract and public summaries. Every choice the
paper may make differently is a named parameter whose default is stated below.

Pipeline (``mk.apl``):

1. :func:`importance` -- per task t, the gradient approximation of the causal intervention
   I_t(P) ~ |sum_{i in P} g_{t,i} Delta_{t,i}|, g_t the gradient of the calibration loss (at the
   base by default), Delta_t = theta_t - theta_b, for the partitions P of three levels: the model,
   its layers and the hidden units (rows) of each layer. :func:`exact_importance` computes the
   intervention itself, I_t(P) = mean_S [loss(theta_t with Delta_t zeroed on P) - loss(theta_t)], for
   validation. Both return :class:`APLScores` (``save`` / ``load`` through safetensors).
2. :func:`plan` turns scores into merge weights and keep-rate multipliers (they depend on the scores
   only, so they are computed once per model) and :meth:`APLPlan.merge_tensor` merges one tensor:
   one pass of the fused masked-drop kernel with one keep rate per row. :func:`merge` does a whole
   state dict.

Partitions (the rules the spec leaves open):

- *Scored tensors*: the model's floating-point parameters (``named_parameters()``, so tied
  parameters once, under the name it yields first) that the fine-tuned state dicts hold. Buffers,
  integer tensors and parameters absent from every fine-tuned state dict are not scored. A parameter
  held by some fine-tuned models but not all is an error.
- *Hidden units (rows)*: a scored tensor of 2 or more dimensions has one unit per index of its
  first dimension (for ``nn.Linear``: one output unit; for an embedding: one token). A 1-D tensor
  whose name ends in ``bias`` (``X.bias``, ``X.in_proj_bias``) and whose name with that ``bias``
  replaced by ``weight`` is a scored tensor of >= 2 dimensions with as many rows joins those rows
  (an *attached* bias): entry h belongs to unit h of the weight. Other 1-D tensors (norm weights,
  unmatched biases) belong to no unit: their keep rate uses the layer multiplier only.
- *Layers* (``layer=``): ``"block"`` (default) groups tensors by the name prefix up to and
  including the first purely numeric component (``model.layers.3.mlp.up_proj.weight`` ->
  ``model.layers.3.``); a name without a numeric component groups by its module (the name without
  its last component: ``model.norm.weight`` -> ``model.norm.``). ``"tensor"``: each tensor is a
  layer, except that an attached bias joins its weight's layer (a unit must lie in one layer). A
  callable ``name -> layer id`` gives any other partition (attached biases still follow their
  weight).

Importance (:func:`importance`): one forward and backward pass per task over its calibration
batches. With ``backward="task"`` (default) the losses of the batches (each ``loss_fn``'s own mean)
are averaged into one scalar and differentiated once: g_t = grad of (1/B) sum_b loss_b, the spec's
gradient of the mean loss (all B batches' activations are alive at once). ``backward="batch"``
differentiates each batch on its own and averages the reduced sums: the same numbers up to rounding
(the reductions are linear in g), with one batch's activations alive at a time. The gradient is never
stored whole: a ``register_post_accumulate_grad_hook`` on every scored parameter reduces
g (.) Delta into float64 row sums and a tensor sum as soon as that parameter's gradient is complete
and frees the ``.grad`` at once, so at most a few parameters' gradients exist at any time (Delta and
the product are formed in float32 -- float64 for float64 parameters -- in chunks of rows, as the
kernels form task vectors; row sums in float32, everything above them accumulated in float64).
Layer sums are the sums of their tensors' sums, the model sum the sum of the layer sums; each
level's score is the absolute value of its signed sum. The model must hold the
base weights; its parameters' ``requires_grad`` flags and existing ``.grad`` are restored afterwards
and with ``grad_at="finetuned"`` its weights too (bit for bit). Its train/eval mode is left alone.

From scores to the merge (:func:`plan`): negative scores (possible from :func:`exact_importance`:
removing Delta on P lowered the loss) count as 0. Among siblings G -- the tasks (model level), the
layers of one task, the units of one layer of one task -- s_hat = s / mean_G(s); a group whose scores
are all 0 gets s_hat = 1 (uniform, no NaN) and multipliers exactly 1. Multipliers
m_P = |G| softmax_G(s_hat / tau1) (mean 1 over every group; tau1 = inf gives exactly 1). The keep
rate of unit h of layer l of task t is k = clip(c_t (1 - p_t) m_{t,l} m_{t,l,h}, k_min, 1), computed
in float64 and rounded once to float32 for the kernel; a scored tensor without units uses
c_t (1 - p_t) m_{t,l}; a tensor without scores (not in the model, excluded from scoring) uses plain
1 - p_t. The spec's rule is c_t = 1, but with heavy-tailed importance the multipliers are so peaked
that clipping at 1 throws most of the keep budget away (mean keep rates of 0.001-0.01 instead of 0.1
on a real text encoder) and the 1 / k rescale of the rare survivors explodes. So c_t is chosen by
water-filling (:func:`allocate`): the rates average exactly 1 - p_t over the task's scored elements
after clipping, and the floor k_min defaults to (1 - p_t) / 4, which bounds every rescale by
4 / (1 - p_t); the plan reports each task's largest rescale and warns beyond ``rescale_warning`` x
DARE's. Multipliers of exactly 1 give c_t = 1 exactly. A level absent from the scores contributes
multipliers 1. Merge weights w_t = T softmax_t(s_hat_model / tau2) (exactly 1 for tau2 = inf or
without model scores) and lambda_t = scale * w_t. With tau1 = tau2 = inf APL is DARE + task
arithmetic bit for bit (same kernel, seed, key and keep probabilities).

Defaults and how they were chosen. Where the spec states a default it is kept: tau1 = tau2 = 1,
all three levels, p = 0.9, gradient at the base. The choices it leaves open were measured on the text
testbed (``benchmarks/apl_defaults.py``: all-MiniLM-L6-v2, 7 experts, the merge scale picked on
validation, drop rates 0.5 / 0.7 / 0.9; numbers in ``benchmarks/RESULTS.md``), deciding by the mean
validation score over the three drop rates and changing nothing for differences under 0.005:

- ``k_min`` = (1 - p) / 4: 0.1 (1 - p) and 0.5 (1 - p) scored the same (0.959 mean validation for
  all three), so the floor with the smaller rescale bound among equals stays;
- ``layer="block"``: ``"tensor"`` scored the same (0.959 / 0.959);
- ``grad_at="base"`` (the spec's): ``"finetuned"`` scored 0.925 against 0.959;
- the calibration size, 256 examples per task, was not varied.

What the same measurement says about the spec's own defaults, left as they are: no configuration
beats DARE at the same drop rate beyond noise (DARE 0.963 mean validation, 0.953 test). The spec's
defaults score 0.959 / 0.943; leaving out the hidden level (``levels=("model", "layer")``) brings
APL back to DARE's level (0.965 / 0.952); the merge weights across tasks (tau2) and the temperature
tau1 move the score by less than the noise.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .. import _ops
from .della import rows_of
from .ties import MERGE_MODES

LEVELS = ("model", "layer", "hidden")
GRAD_AT = ("base", "finetuned")
LAYER_RULES = ("block", "tensor")
BACKWARD = ("task", "batch")
COMBINE = ("task_arithmetic", "ties")
WITHIN = ("random", "magnitude")
FALLBACK = (None, "dare")
FORMAT = "mergekernels-apl-scores"
FORMAT_VERSION = 1

# Elements of one chunk of rows in the importance reductions and the magnitude selection.
CHUNK_ELEMENTS = 1 << 22
# Default k_min, as a fraction of the task's mean keep rate 1 - p: no unit keeps less than a quarter
# of the average, so no survivor is rescaled more than 4 x DARE's 1 / (1 - p).
DEFAULT_K_MIN_FRACTION = 0.25
# plan() warns when a task's largest rescale exceeds this multiple of DARE's 1 / (1 - p).
RESCALE_WARNING = 10.0


# ----------------------------------------------------------------------------------------------
# Scores.
@dataclass
class APLScores:
    """Importance scores of every task at each computed level (float64, on the CPU).

    Attributes:
        tasks: task names, in the order of the calibration mapping (the fine-tuned models' order).
        levels: the levels computed, a subset of ``("model", "layer", "hidden")``.
        layer_names: the layer ids, in the model's parameter order.
        tensor_layer: scored tensor name -> index into ``layer_names``.
        row_tensor: scored tensor name -> the tensor whose rows are its units: itself for tensors of
            >= 2 dimensions, the weight for an attached bias; tensors without units are absent.
        model: [T] scores of the whole model (None without the level).
        layer: [T, L] scores of the layers (None without the level).
        hidden: row-owning tensor name -> [T, rows] scores of its units (empty without the level).
        info: how the scores were computed (``method``: ``"gradient"`` or ``"exact"``, ``grad_at``,
            ``layer``, ``backward``, ``batches`` per task).
        numel: scored tensor name -> its number of elements (weights the keep-rate allocation; empty
            in files written before it was recorded: then every unit weighs the same).
    """

    tasks: list[str]
    levels: tuple[str, ...]
    layer_names: list[str]
    tensor_layer: dict[str, int]
    row_tensor: dict[str, str]
    model: torch.Tensor | None = None
    layer: torch.Tensor | None = None
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    _plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def save(self, path: str | os.PathLike) -> None:
        """Write the scores to one safetensors file (tensors bit for bit; the rest as JSON metadata)."""
        from safetensors.torch import save_file

        tensors = {f"hidden/{name}": x.contiguous() for name, x in self.hidden.items()}
        if self.model is not None:
            tensors["model"] = self.model.contiguous()
        if self.layer is not None:
            tensors["layer"] = self.layer.contiguous()
        meta = {
            "tasks": list(self.tasks),
            "levels": list(self.levels),
            "layer_names": list(self.layer_names),
            "tensor_layer": self.tensor_layer,
            "row_tensor": self.row_tensor,
            "info": self.info,
            "numel": self.numel,
        }
        save_file(
            tensors,
            os.fspath(path),
            metadata={"format": FORMAT, "version": str(FORMAT_VERSION), "apl": json.dumps(meta)},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> APLScores:
        """Read scores written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(
                    f"{os.fspath(path)}: not an APL scores file (format {metadata.get('format')!r})"
                )
            if int(metadata.get("version", 0)) > FORMAT_VERSION:
                raise ValueError(
                    f"{os.fspath(path)}: APL scores format version {metadata['version']} is newer than "
                    f"this mergekernels reads ({FORMAT_VERSION})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        meta = json.loads(metadata["apl"])
        return cls(
            tasks=list(meta["tasks"]),
            levels=tuple(meta["levels"]),
            layer_names=list(meta["layer_names"]),
            tensor_layer={k: int(v) for k, v in meta["tensor_layer"].items()},
            row_tensor=dict(meta["row_tensor"]),
            model=tensors.get("model"),
            layer=tensors.get("layer"),
            hidden={k[len("hidden/") :]: v for k, v in tensors.items() if k.startswith("hidden/")},
            info=meta["info"],
            numel={k: int(v) for k, v in meta.get("numel", {}).items()},
        )


Scores = APLScores


# ----------------------------------------------------------------------------------------------
# Argument checks.
def _check_levels(levels: str | Sequence[str], allowed: Sequence[str] = LEVELS) -> tuple[str, ...]:
    if isinstance(levels, str):
        levels = (levels,)
    levels = tuple(levels)
    bad = [lv for lv in levels if lv not in allowed]
    if bad:
        raise ValueError(f"levels: unknown level {bad[0]!r}; valid levels: {', '.join(allowed)}")
    if not levels:
        raise ValueError(f"levels: pass at least one of {', '.join(allowed)}")
    return tuple(lv for lv in LEVELS if lv in levels)


def _choice(value, allowed: Sequence, name: str):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def block_of(name: str) -> str:
    """The ``layer="block"`` id of a tensor name: the prefix up to and including the first purely
    numeric component (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3.``); without one,
    the module (``model.norm.weight`` -> ``model.norm.``; a top-level ``weight`` -> ``weight``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1]) + "."
    return ".".join(parts[:-1]) + "." if len(parts) > 1 else name


def _layer_rule(layer: str | Callable[[str], str]) -> Callable[[str], str]:
    if callable(layer):
        return lambda name: str(layer(name))
    _choice(layer, LAYER_RULES, "layer")
    return block_of if layer == "block" else (lambda name: name)


def _tasks_and_finetuned(
    calibration: Mapping[str, Iterable], finetuned, op: str
) -> tuple[list[str], list[Mapping[str, torch.Tensor]]]:
    if not isinstance(calibration, Mapping):
        raise TypeError(
            f"{op}: calibration must map task name -> iterable of batches, got {type(calibration).__name__}"
        )
    tasks = [str(t) for t in calibration]
    if not tasks:
        raise ValueError(
            f"{op}: calibration is empty; APL needs calibration batches for every task "
            "(to merge without data, call mk.apl.merge(..., scores=None, fallback='dare'))"
        )
    if isinstance(finetuned, Mapping) and not _is_state_dict(finetuned):
        if set(map(str, finetuned)) != set(tasks):
            raise ValueError(
                f"{op}: finetuned has tasks {sorted(map(str, finetuned))} but calibration has {sorted(tasks)}"
            )
        lookup = {str(k): v for k, v in finetuned.items()}
        fts = [lookup[t] for t in tasks]
    else:
        if isinstance(finetuned, Mapping):
            raise TypeError(f"{op}: finetuned must be a list of state dicts or a dict task -> state dict")
        fts = list(finetuned)
        if len(fts) != len(tasks):
            raise ValueError(
                f"{op}: finetuned has {len(fts)} state dicts but calibration has {len(tasks)} tasks "
                f"({', '.join(tasks)})"
            )
    for t, sd in zip(tasks, fts, strict=True):
        if not isinstance(sd, Mapping):
            raise TypeError(f"{op}: finetuned[{t!r}] must be a state dict, got {type(sd).__name__}")
    return tasks, fts


def _is_state_dict(x: Mapping) -> bool:
    """A mapping whose values are tensors (one state dict), as opposed to task -> state dict."""
    return any(isinstance(v, torch.Tensor) for v in x.values())


# ----------------------------------------------------------------------------------------------
# Structure of the scored model.
@dataclass
class _Structure:
    names: list[str]  # scored tensors, in parameter order
    params: dict[str, torch.nn.Parameter]
    layer_names: list[str]
    tensor_layer: dict[str, int]
    row_tensor: dict[str, str]
    owner_rows: dict[str, int]  # row-owning tensor -> rows


def _structure(model: torch.nn.Module, fts: list[Mapping], tasks: list[str], layer, op: str) -> _Structure:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    rule = _layer_rule(layer)
    names, params = [], {}
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        held = [name in sd for sd in fts]
        if not any(held):
            continue
        if not all(held):
            t = held.index(False)
            raise KeyError(f"{op}: finetuned[{tasks[t]!r}] lacks parameter {name!r}, which other models hold")
        for t, sd in zip(tasks, fts, strict=True):
            x = sd[name]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"{op}: finetuned[{tasks[t]!r}][{name!r}] must be a floating-point tensor")
            if x.shape != p.shape:
                raise ValueError(
                    f"{op}: finetuned[{t!r}][{name!r}] has shape {tuple(x.shape)} but the model's "
                    f"parameter has {tuple(p.shape)}"
                )
        names.append(name)
        params[name] = p
    if not names:
        raise ValueError(
            f"{op}: no parameter of the model is in the fine-tuned state dicts (check the names)"
        )
    row_tensor, owner_rows = {}, {}
    for name in names:
        if params[name].dim() >= 2 and params[name].shape[0] > 0:
            row_tensor[name] = name
            owner_rows[name] = params[name].shape[0]
    for name in names:
        if name.endswith("bias") and params[name].dim() == 1:
            weight = name[: -len("bias")] + "weight"
            if weight in owner_rows and owner_rows[weight] == params[name].numel():
                row_tensor[name] = weight
    layer_names, tensor_layer = [], {}
    index = {}
    for name in names:
        owner = row_tensor.get(name, name)
        lid = rule(owner) if owner != name else rule(name)
        if lid not in index:
            index[lid] = len(layer_names)
            layer_names.append(lid)
        tensor_layer[name] = index[lid]
    return _Structure(names, params, layer_names, tensor_layer, row_tensor, owner_rows)


def _row_shape(numel: int, shape: Sequence[int], attached: bool) -> tuple[int, int]:
    """(rows, row length) of a tensor's units: its first dimension; an attached bias is one entry per
    unit; a tensor without units is one row."""
    if attached:
        return numel, 1
    if len(shape) >= 2 and shape[0] > 0:
        return shape[0], numel // shape[0]
    return 1, numel


def _row_sums(
    grad: torch.Tensor, ft: torch.Tensor, base: torch.Tensor, rows: int, row_len: int
) -> torch.Tensor:
    """Signed sums of grad * (ft - base) per row as float64, in chunks of rows. Differences, products
    and the sum along a row are float32 (float64 for float64 inputs): the precision the kernels form
    task vectors in, whose rounding dominates that of the float32 row sums; rows, tensors and batches
    are then accumulated in float64."""
    ct = torch.float64 if torch.float64 in (grad.dtype, base.dtype, ft.dtype) else torch.float32
    dev = grad.device
    g, f, b = grad.reshape(rows, row_len), ft.reshape(rows, row_len), base.reshape(rows, row_len)
    out = torch.empty(rows, dtype=torch.float64, device=dev)
    step = max(1, CHUNK_ELEMENTS // max(1, row_len))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        prod = torch.sub(f[r0:r1].to(device=dev, dtype=ct), b[r0:r1].to(device=dev, dtype=ct))
        out[r0:r1] = prod.mul_(g[r0:r1].to(ct)).sum(1)
    return out


def _batches(batches: Iterable, max_batches: int | None, task: str, op: str) -> Iterable:
    if max_batches is not None:
        if not isinstance(max_batches, int) or max_batches < 1:
            raise ValueError(f"{op}: max_batches must be a positive int or None, got {max_batches!r}")
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(f"{op}: calibration[{task!r}] must be an iterable of batches") from None
    n = 0
    for batch in it:
        if max_batches is not None and n >= max_batches:
            break
        n += 1
        yield batch
    if n == 0:
        raise ValueError(
            f"{op}: calibration[{task!r}] has no batches; APL needs calibration data for every task"
        )


def _scalar_loss(loss, task: str, op: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise TypeError(
            f"{op}: loss_fn must return a floating-point scalar tensor (task {task!r}), got {loss!r}"
        )
    return loss.reshape(())


class _ModelState:
    """Saves a model's requires_grad flags, grads and the scored weights; restores them exactly."""

    def __init__(self, model: torch.nn.Module, st: _Structure, keep_weights: bool) -> None:
        self.flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
        self.weights = {n: st.params[n].detach().clone() for n in st.names} if keep_weights else None
        self.st = st

    def load(self, sd: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> None:
        with torch.no_grad():
            for n in self.st.names if names is None else names:
                self.st.params[n].copy_(sd[n])

    def restore_weights(self) -> None:
        if self.weights is not None:
            self.load(self.weights)

    def restore(self) -> None:
        self.restore_weights()
        for p, flag, grad in self.flags:
            p.requires_grad_(flag)
            p.grad = grad


def importance(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    calibration: Mapping[str, Iterable],
    finetuned: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, Mapping[str, torch.Tensor]],
    *,
    levels: str | Sequence[str] = LEVELS,
    grad_at: str = "base",
    layer: str | Callable[[str], str] = "block",
    backward: str = "task",
    max_batches: int | None = None,
) -> APLScores:
    """Gradient-approximated APL importance: I_t(P) ~ |sum_{i in P} g_{t,i} Delta_{t,i}|.

    Args:
        model: a module of the shared architecture holding the **base** weights; its state-dict names
            are the fine-tuned state dicts' names. Left as it was (weights, requires_grad, grads).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` (typically the batch's mean loss).
        calibration: task name -> iterable of batches (the spec suggests 32 examples per task).
        finetuned: the fine-tuned state dicts, a list in the order of ``calibration``'s keys or a dict
            with the same keys.
        levels: any of ``"model"``, ``"layer"``, ``"hidden"`` (default all).
        grad_at: ``"base"`` (default, the spec's default: g at theta_b) or ``"finetuned"`` (g at
            theta_t: theta_t is loaded into the model for task t and the base restored bit for bit).
        layer: ``"block"`` (default), ``"tensor"`` or a callable name -> layer id (module docstring).
        backward: ``"task"`` (default: one backward of the mean of the batch losses) or ``"batch"``
            (one backward per batch, reductions averaged: less activation memory).
        max_batches: use at most this many batches per task (default: all).

    Returns :class:`APLScores` on the CPU, float64. Cost: one forward and backward over each task's
    calibration data; the gradient is reduced as it arrives and never stored whole.
    """
    op = "apl.importance"
    levels = _check_levels(levels)
    _choice(grad_at, GRAD_AT, "grad_at")
    _choice(backward, BACKWARD, "backward")
    tasks, fts = _tasks_and_finetuned(calibration, finetuned, op)
    st = _structure(model, fts, tasks, layer, op)
    state = _ModelState(model, st, keep_weights=grad_at == "finetuned")
    handles = []
    T, L = len(tasks), len(st.layer_names)
    model_sum = torch.zeros(T, dtype=torch.float64)
    layer_sum = torch.zeros(T, L, dtype=torch.float64)
    hidden = {n: torch.zeros(T, r, dtype=torch.float64) for n, r in st.owner_rows.items()}
    batches_seen = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for n in st.names:
            st.params[n].requires_grad_(True)
        current: dict = {}

        def make_hook(name: str):
            owner = st.row_tensor.get(name)
            attached = owner is not None and owner != name

            def hook(p: torch.Tensor) -> None:
                grad, p.grad = p.grad, None
                if grad is None or grad.numel() == 0:
                    return
                base = state.weights[name] if state.weights is not None else p.detach()
                rows, row_len = _row_shape(p.numel(), p.shape, attached)
                sums = _row_sums(grad, current["ft"][name], base, rows, row_len)
                current["tensor"][name] = current["tensor"].get(name, 0.0) + sums.sum()
                if owner is not None and "hidden" in levels:
                    acc = current["rows"]
                    acc[owner] = acc[owner] + sums if owner in acc else sums

            return hook

        for n in st.names:
            handles.append(st.params[n].register_post_accumulate_grad_hook(make_hook(n)))
        with torch.enable_grad():
            for t, task in enumerate(tasks):
                current.clear()
                current.update(ft=fts[t], tensor={}, rows={})
                if grad_at == "finetuned":
                    state.load(fts[t])
                count, total = 0, None
                for batch in _batches(calibration[task], max_batches, task, op):
                    loss = _scalar_loss(loss_fn(model, batch), task, op)
                    count += 1
                    if backward == "batch":
                        _backward(loss, task, op)
                    else:
                        total = loss if total is None else total + loss
                if backward == "task":
                    _backward(total / count, task, op)
                    div = 1.0
                else:
                    div = float(count)
                batches_seen.append(count)
                for name, s in current["tensor"].items():
                    value = float(s) / div
                    layer_sum[t, st.tensor_layer[name]] += value
                for owner, s in current["rows"].items():
                    hidden[owner][t] = s.to("cpu", torch.float64) / div
                if grad_at == "finetuned":
                    state.restore_weights()
        model_sum = layer_sum.sum(1)
    finally:
        for h in handles:
            h.remove()
        state.restore()
    return APLScores(
        tasks=tasks,
        levels=levels,
        layer_names=st.layer_names,
        tensor_layer=st.tensor_layer,
        row_tensor=st.row_tensor,
        numel={n: st.params[n].numel() for n in st.names},
        model=model_sum.abs() if "model" in levels else None,
        layer=layer_sum.abs() if "layer" in levels else None,
        hidden={n: x.abs() for n, x in hidden.items()} if "hidden" in levels else {},
        info={
            "method": "gradient",
            "grad_at": grad_at,
            "layer": layer if isinstance(layer, str) else "callable",
            "backward": backward,
            "batches": batches_seen,
        },
    )


def _backward(loss: torch.Tensor, task: str, op: str) -> None:
    if not loss.requires_grad:
        raise ValueError(
            f"{op}: the loss of task {task!r} does not depend on any scored parameter "
            "(does loss_fn run the model?)"
        )
    loss.backward()


def exact_importance(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    calibration: Mapping[str, Iterable],
    finetuned: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, Mapping[str, torch.Tensor]],
    *,
    levels: str | Sequence[str] = ("model", "layer"),
    layer: str | Callable[[str], str] = "block",
    max_batches: int | None = None,
) -> APLScores:
    """The causal intervention itself: I_t(P) = mean_S [loss(theta_t with Delta_t zeroed on P) -
    loss(theta_t)], signed, without gradients.

    theta_t is the model with task t's scored parameters loaded (buffers stay the model's); zeroing
    Delta_t on P puts the base's values back on P. One evaluation of the calibration batches per
    partition: the model level costs one, the layer level one per layer, the hidden level one per
    unit (feasible for small models only; the default is ``("model", "layer")``). Arguments as in
    :func:`importance`; the model holds the base and is restored bit for bit.
    """
    op = "apl.exact_importance"
    levels = _check_levels(levels)
    tasks, fts = _tasks_and_finetuned(calibration, finetuned, op)
    st = _structure(model, fts, tasks, layer, op)
    state = _ModelState(model, st, keep_weights=True)
    base = state.weights
    T, L = len(tasks), len(st.layer_names)
    model_i = torch.zeros(T, dtype=torch.float64)
    layer_i = torch.zeros(T, L, dtype=torch.float64)
    hidden = {n: torch.zeros(T, r, dtype=torch.float64) for n, r in st.owner_rows.items()}
    members = [[n for n in st.names if st.tensor_layer[n] == i] for i in range(L)]
    attached = {}
    for n, owner in st.row_tensor.items():
        if owner != n:
            attached.setdefault(owner, []).append(n)
    batches_seen = []
    try:
        with torch.no_grad():
            for t, task in enumerate(tasks):
                batches = list(_batches(calibration[task], max_batches, task, op))
                batches_seen.append(len(batches))

                def mean_loss(batches=batches, task=task) -> float:
                    losses = [float(_scalar_loss(loss_fn(model, b), task, op)) for b in batches]
                    return math.fsum(losses) / len(losses)

                state.load(fts[t])
                ref = mean_loss()
                if "model" in levels:
                    state.load(base)
                    model_i[t] = mean_loss() - ref
                    state.load(fts[t])
                if "layer" in levels:
                    for i, names in enumerate(members):
                        state.load(base, names)
                        layer_i[t, i] = mean_loss() - ref
                        state.load(fts[t], names)
                if "hidden" in levels:
                    for owner, rows in st.owner_rows.items():
                        group = [owner, *attached.get(owner, [])]
                        for h in range(rows):
                            for n in group:
                                st.params[n][h] = base[n][h]
                            hidden[owner][t, h] = mean_loss() - ref
                            for n in group:
                                st.params[n][h] = fts[t][n][h]
    finally:
        state.restore()
    return APLScores(
        tasks=tasks,
        levels=levels,
        layer_names=st.layer_names,
        tensor_layer=st.tensor_layer,
        row_tensor=st.row_tensor,
        numel={n: st.params[n].numel() for n in st.names},
        model=model_i if "model" in levels else None,
        layer=layer_i if "layer" in levels else None,
        hidden=hidden if "hidden" in levels else {},
        info={
            "method": "exact",
            "layer": layer if isinstance(layer, str) else "callable",
            "batches": batches_seen,
        },
    )


# ----------------------------------------------------------------------------------------------
# From scores to keep rates and weights.
def _check_tau(tau, name: str) -> float:
    tau = float(tau)
    if math.isnan(tau) or tau <= 0.0:
        raise ValueError(f"{name} must be > 0 (float('inf') allowed), got {tau}")
    return tau


def multipliers(scores: torch.Tensor, tau: float, dim: int = -1) -> torch.Tensor:
    """Keep-rate multipliers m_P = |G| softmax_G(s_hat_P / tau) along ``dim`` (the siblings G), with
    s_hat = s / mean_G(s), in float64. Their mean over every group is 1 (up to rounding). Negative
    scores count as 0; a group of zeros, and tau = inf, give multipliers of exactly 1."""
    tau = _check_tau(tau, "tau")
    s = torch.as_tensor(scores).to(torch.float64)
    if not torch.isfinite(s).all():
        raise ValueError("multipliers: the scores contain NaN or infinite values")
    if s.numel() == 0 or math.isinf(tau):
        return torch.ones_like(s)
    s = s.clamp(min=0.0)
    size = s.shape[dim]
    mean = s.mean(dim, keepdim=True)
    zero = mean <= 0.0
    s_hat = torch.where(zero, torch.ones_like(s), s / torch.where(zero, torch.ones_like(mean), mean))
    m = size * torch.softmax(s_hat / tau, dim=dim)
    return torch.where(zero, torch.ones_like(m), m)


def keep_rates(drop: float, layer_multiplier, row_multiplier, k_min: float = 0.0) -> torch.Tensor:
    """k = clip((1 - p) * m_layer * m_row, k_min, 1) in float64 (broadcasting; multiplied in that
    order, so multipliers of exactly 1 give exactly 1 - p)."""
    base_keep = torch.tensor(1.0 - drop, dtype=torch.float64)
    return _clip_keep(base_keep, torch.as_tensor(layer_multiplier), torch.as_tensor(row_multiplier), k_min)


def allocate(target: float, rates: torch.Tensor, weights: torch.Tensor, k_min: float) -> float:
    """Water-filling: the scale c >= 0 with sum_i w_i clip(c r_i, k_min, 1) = target * sum_i w_i.

    ``rates`` are the unclipped keep rates r_i = (1 - p) m_layer m_row of one task's units and
    ``weights`` their element counts. Clipping at 1 and at k_min moves keep budget; scaling the
    unclipped rates by c hands it back to the units that are not clipped, in proportion to their
    rates, so the mean keep rate is exactly ``target``. f(c) = sum_i w_i clip(c r_i, k_min, 1) is
    piecewise linear and nondecreasing: a bisection over its breakpoints finds the segment that
    reaches the target, and c is solved on it.
    Rates that are all equal to the target give c = 1 exactly (no clipping to undo). Needs
    0 <= k_min <= target <= 1; if even c = inf cannot reach the target (rates of 0), returns the c
    at which every positive rate is 1."""
    r = rates.to(torch.float64).reshape(-1)
    w = weights.to(torch.float64).reshape(-1)
    if r.numel() == 0 or bool((r == target).all()):
        return 1.0
    goal = target * float(w.sum())

    def kept(c: float) -> float:
        return float((w * (c * r).clamp(min=k_min, max=1.0)).sum())

    # Breakpoints: at c = k_min / r an entry leaves the floor, at c = 1 / r it reaches 1.
    positive = r[r > 0]
    if positive.numel() == 0:
        return 1.0
    events = torch.unique(torch.cat([k_min / positive, 1.0 / positive]))
    if kept(float(events[-1])) < goal:
        return float(events[-1])
    lo, hi = -1, events.numel() - 1  # kept(events[hi]) >= goal; kept(events[lo]) < goal (lo = -1: c = 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if kept(float(events[mid])) >= goal:
            hi = mid
        else:
            lo = mid
    left, right = (0.0 if lo < 0 else float(events[lo])), float(events[hi])
    # Inside (left, right] no entry changes state: f(c) = const + slope * c, summed directly (a
    # running sum of the events' changes would cancel catastrophically across magnitudes).
    probe = r * (0.5 * (left + right))
    floor, top = probe < k_min, probe > 1.0
    free = ~(floor | top)
    const = float(w[floor].sum()) * k_min + float(w[top].sum())
    slope = float((w[free] * r[free]).sum())
    if slope <= 0.0:
        return right
    return min(max((goal - const) / slope, left), right)


@dataclass
class APLPlan:
    """What an APL merge needs besides the tensors: per-task drop rates, merge weights, layer and unit
    multipliers (computed once from the scores), and the merge options. Build it with :func:`plan`."""

    tasks: list[str]
    drop: list[float]
    weights: list[float]  # w_t; lambda_t = scale * w_t
    scale: float
    seed: int
    combine: str
    within: str
    k_min: list[float]  # per task
    ties_merge: str
    scores: APLScores | None
    layer_mult: torch.Tensor | None  # [T, L]
    row_mult: dict[str, torch.Tensor]  # row owner -> [T, rows]
    keep_scale: list[float] = field(default_factory=list)  # c_t of the water-filling (allocate)
    max_rescale: list[float] = field(default_factory=list)  # largest 1 / k per task (within="random")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def merge_weights(self) -> list[float]:
        """lambda_t = scale * w_t."""
        return [self.scale * w for w in self.weights]

    def keep(
        self, name: str, shape: Sequence[int], element_offset: int | None = None
    ) -> tuple[torch.Tensor, int]:
        """(float64 [T, rows] keep rates, row length) of tensor ``name`` of ``shape`` for the kernel's
        per-row mode; a tensor whose rates do not vary by row is one row long enough for any chunk.
        ``element_offset=None``: ``shape`` is the whole tensor (checked against the scores); an int:
        a chunk of whole rows starting at that global element."""
        shape = tuple(shape)
        numel = math.prod(shape)
        offset = element_offset or 0
        base_keep = torch.tensor([1.0 - d for d in self.drop], dtype=torch.float64)[:, None]
        k_min = torch.tensor(self.k_min, dtype=torch.float64)[:, None]
        s = self.scores
        if s is None or name not in s.tensor_layer:
            return _clip_keep(base_keep, 1.0, 1.0, k_min), max(1, offset + numel)
        scale = torch.tensor(self.keep_scale or [1.0] * self.num_tasks, dtype=torch.float64)[:, None]
        m_layer = self.layer_mult[:, s.tensor_layer[name]][:, None] if self.layer_mult is not None else 1.0
        owner = s.row_tensor.get(name)
        if owner is None or owner not in self.row_mult:
            return _clip_keep(base_keep, m_layer, 1.0, k_min, scale), max(1, offset + numel)
        m_row = self.row_mult[owner]
        rows = m_row.shape[1]
        if owner != name:  # an attached bias: one entry per unit
            row_len, first, count, ok = 1, offset, numel, len(shape) == 1
        else:
            row_len = numel // shape[0] if len(shape) >= 2 and shape[0] else 1
            first, count, ok = offset // row_len, (shape[0] if shape else 0), len(shape) >= 2
            ok = ok and offset % row_len == 0
        if not ok or (count != rows if element_offset is None else first + count > rows):
            what = "shape" if element_offset is None else f"chunk shape (element offset {offset})"
            raise ValueError(
                f"apl: tensor {name!r} has {what} {list(shape)} but its scores have {rows} "
                f"{'units' if owner != name else 'rows'}"
            )
        return _clip_keep(base_keep, m_layer, m_row, k_min, scale), max(1, row_len)

    def merge_tensor(
        self,
        name: str,
        base: torch.Tensor,
        finetuned: Sequence[torch.Tensor],
        *,
        element_offset: int | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Merge tensor ``name``: base + sum_t lambda_t * drop_t(Delta_t) (or the TIES variant). The masks
        are keyed by (seed, ``name``, task, element index), so they do not depend on order or chunking.
        ``element_offset``: None for a whole tensor; else the global index of the first element of a
        chunk of whole rows (``within="random"`` only)."""
        op = f"apl ({name})"
        p = _ops.prepare(base, finetuned, op)
        if len(p.finetuned) != self.num_tasks:
            raise ValueError(f"{op}: {len(p.finetuned)} fine-tuned tensors for {self.num_tasks} tasks")
        keep, row_len = self.keep(name, p.base.shape, element_offset)
        reduce_args = {
            "weights": self.weights,
            "scale": self.scale,
            "reduce": self.ties_merge if self.combine == "ties" else "sum",
            "ties": self.combine == "ties",
            "weighted_election": self.combine == "ties",
        }
        if self.within == "random":
            keep32 = keep.to(torch.float32)
            if bool((keep32 == keep32[:, :1]).all()):
                # One rate per task: the kernel's constant mode, ~3x faster on the CPU than its per-row
                # mode and the same bits (the same float32 probability per element).
                source = {"keep_source": "constant", "keep": [float(q) for q in keep32[:, 0]]}
            else:
                source = {
                    "keep_source": "row",
                    "row_keep": keep32.to(p.base.device).contiguous(),
                    "row_len": row_len,
                }
            return _ops.fused_merge(
                p,
                **reduce_args,
                sparsify="drop",
                **source,
                rescale_inverse=True,
                seed=self.seed,
                key=name,
                element_offset=element_offset or 0,
                out_dtype=out_dtype,
            )
        if element_offset:
            raise ValueError(f"{op}: within='magnitude' needs whole tensors (element_offset must be 0)")
        return _magnitude_merge(p, keep, reduce_args, out_dtype)


def _clip_keep(base_keep: torch.Tensor, m_layer, m_row, k_min, scale=1.0) -> torch.Tensor:
    """clip(base_keep * m_layer * m_row * scale, k_min, 1), float64; base_keep is 1 - p_t ([T, 1]),
    k_min and scale floats or [T, 1] (multiplied in that order: factors of exactly 1 change nothing)."""
    keep = base_keep * (m_layer if isinstance(m_layer, float) else m_layer.to(torch.float64))
    keep = keep * (m_row if isinstance(m_row, float) else m_row.to(torch.float64))
    keep = keep * scale
    return torch.maximum(keep, torch.as_tensor(k_min, dtype=torch.float64)).clamp(max=1.0)  # k_min <= 1


def _magnitude_merge(p: _ops.Prepared, keep: torch.Tensor, reduce_args: dict, out_dtype) -> torch.Tensor:
    """Keep, per row of each task vector, the round(k * row length) entries of largest |Delta| (ranks
    from the ``row_ranks`` op, ties by position: the later entry wins), no rescale; then the fused
    merge of the kept entries. Rows: the first dimension; a 1-D tensor is one row whose fraction is the
    mean of its entries' keep rates (an attached bias is ranked as a whole)."""
    _, want = _ops._check_out_dtype(out_dtype, p.out_dtype)
    shape = p.base.shape
    out = torch.empty(shape, dtype=want, device=p.base.device)
    if out.numel() == 0:
        return out
    k = len(p.finetuned)
    rows, row_len = rows_of(shape)
    if keep.shape[1] == rows:
        fraction = keep
    elif rows == 1:
        fraction = keep.mean(1, keepdim=True)
    else:  # one rate for the whole tensor
        fraction = keep.expand(k, rows)
    counts = torch.floor(fraction * row_len + 0.5).clamp(0, row_len).to(torch.int64)
    cut = (row_len - counts).to(p.base.device)  # keep ranks >= cut
    base_rows = p.base.reshape(rows, row_len)
    ft_rows = [x.reshape(rows, row_len) for x in p.finetuned]
    out_rows = out.view(rows, row_len)
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, k * row_len))
    for r0 in range(0, rows, per_chunk):
        r1 = min(rows, r0 + per_chunk)
        b = base_rows[r0:r1]
        kept = []
        for t, x in enumerate(ft_rows):
            ranks = _ops.row_ranks(b, x[r0:r1], row_len)
            kept.append(torch.where(ranks >= cut[t, r0:r1, None], x[r0:r1], b))
        out_rows[r0:r1] = _ops.fused_merge(
            _ops.Prepared(b, kept, p.out_dtype), **reduce_args, out_dtype=want
        ).view(r1 - r0, row_len)
    return out


def plan(
    scores: APLScores | None,
    *,
    num_tasks: int | None = None,
    drop: float | Sequence[float] = 0.9,
    tau1: float = 1.0,
    tau2: float = 1.0,
    scale: float = 1.0,
    seed: int = 0,
    combine: str = "task_arithmetic",
    within: str = "random",
    k_min: float | None = None,
    ties_merge: str = "sum",
    fallback: str | None = None,
    rescale_warning: float = RESCALE_WARNING,
    levels: str | Sequence[str] = LEVELS,
) -> APLPlan:
    """Merge weights, keep-rate multipliers and their allocation from the scores (parameters as in
    :func:`merge`). The plan reports each task's largest rescale 1 / k (``max_rescale``) and warns when
    one exceeds ``rescale_warning`` times DARE's 1 / (1 - p).

    ``scores=None`` is refused unless ``fallback="dare"``: then every multiplier and weight is 1
    (DARE + task arithmetic; ``num_tasks`` gives the number of models)."""
    _choice(combine, COMBINE, "combine")
    _choice(within, WITHIN, "within")
    _choice(fallback, FALLBACK, "fallback")
    if combine == "ties":
        _choice(ties_merge, MERGE_MODES, "ties_merge")
    tau1, tau2 = _check_tau(tau1, "tau1"), _check_tau(tau2, "tau2")
    levels = _check_levels(levels)
    if k_min is not None:
        k_min = float(k_min)
        if not 0.0 <= k_min <= 1.0:
            raise ValueError(f"k_min must be in [0, 1], got {k_min}")
    rescale_warning = float(rescale_warning)
    if not rescale_warning >= 1.0:
        raise ValueError(f"rescale_warning must be >= 1, got {rescale_warning}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if scores is None:
        if fallback != "dare":
            raise ValueError(
                "apl: scores is None. APL needs importance scores from calibration data (mk.apl.importance); "
                "pass fallback='dare' to merge by DARE + task arithmetic with the same drop and seed instead"
            )
        if num_tasks is None or num_tasks < 1:
            raise ValueError(
                "apl: fallback='dare' without scores needs num_tasks (the number of fine-tuned models)"
            )
        tasks = [str(t) for t in range(num_tasks)]
    else:
        if not isinstance(scores, APLScores):
            raise TypeError(f"apl: scores must be APLScores (mk.apl.importance), got {type(scores).__name__}")
        tasks = list(scores.tasks)
        if not tasks:
            raise ValueError("apl: scores has no tasks")
        if num_tasks is not None and num_tasks != len(tasks):
            raise ValueError(
                f"apl: scores has {len(tasks)} tasks but {num_tasks} fine-tuned models were given"
            )
    T = len(tasks)
    drops = _ops.per_task(drop, T, "drop")
    for t, d in enumerate(drops):
        if not 0.0 <= d < 1.0:
            raise ValueError(f"apl: drop must be in [0, 1), got {d} for task {tasks[t]!r}")
    k_mins = [DEFAULT_K_MIN_FRACTION * (1.0 - d) if k_min is None else k_min for d in drops]
    for t, (d, k) in enumerate(zip(drops, k_mins, strict=True)):
        if k > 1.0 - d:
            raise ValueError(
                f"apl: k_min = {k} is above the mean keep rate 1 - drop = {1.0 - d} of task {tasks[t]!r}; "
                "no allocation can keep that mean"
            )
    weights = [1.0] * T
    layer_mult, row_mult = None, {}
    if scores is not None:
        if "model" in levels and scores.model is not None and not math.isinf(tau2):
            weights = [float(w) for w in multipliers(scores.model, tau2)]
        if "layer" in levels and scores.layer is not None:
            layer_mult = multipliers(scores.layer, tau1)
        if "hidden" in levels and scores.hidden:
            row_mult = _row_multipliers(scores, tau1)
    scale_c, max_rescale = [1.0] * T, [1.0 / (1.0 - d) for d in drops]
    if scores is not None and scores.tensor_layer:
        units, sizes = _units(scores, layer_mult, row_mult, T)
        for t in range(T):
            rates = (1.0 - drops[t]) * units[t]
            scale_c[t] = allocate(1.0 - drops[t], rates, sizes, k_mins[t])
            lowest = float(_clip_keep(rates * scale_c[t], 1.0, 1.0, k_mins[t]).min())
            max_rescale[t] = 1.0 / lowest if lowest > 0 else math.inf
    if within == "random":
        for t in range(T):
            if max_rescale[t] > rescale_warning / (1.0 - drops[t]):
                warnings.warn(
                    f"apl: task {tasks[t]!r} rescales its rarest kept entries by {max_rescale[t]:.3g}, more "
                    f"than {rescale_warning:g} x DARE's 1 / (1 - p) = {1.0 / (1.0 - drops[t]):.3g} "
                    f"(raise k_min to bound it; k_min = {k_mins[t]:.3g})",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return APLPlan(
        tasks=tasks,
        drop=drops,
        weights=weights,
        scale=float(scale),
        seed=seed,
        combine=combine,
        within=within,
        k_min=k_mins,
        ties_merge=ties_merge,
        scores=scores,
        layer_mult=layer_mult,
        row_mult=row_mult,
        keep_scale=scale_c,
        max_rescale=max_rescale,
    )


def _units(
    scores: APLScores, layer_mult, row_mult: dict, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The multipliers m_layer * m_row of every unit of every scored tensor ([T, N] float64) and the
    units' element counts ([N]): a row of a row-owning tensor weighs its row length, an attached
    bias entry 1, a tensor without units is one unit of all its elements. Scores without element
    counts (older files) weigh every unit 1."""
    mults, sizes = [], []
    for name, layer in scores.tensor_layer.items():
        m_layer = (
            layer_mult[:, layer] if layer_mult is not None else torch.ones(num_tasks, dtype=torch.float64)
        )
        owner = scores.row_tensor.get(name)
        numel = scores.numel.get(name)
        if owner is not None and owner in row_mult:
            m_row = row_mult[owner]
            rows = m_row.shape[1]
            row_len = 1.0 if owner != name or numel is None else numel / rows
            mults.append(m_layer[:, None] * m_row)
            sizes.append(torch.full((rows,), row_len, dtype=torch.float64))
        else:
            mults.append(m_layer[:, None])
            sizes.append(torch.tensor([float(numel) if numel is not None else 1.0], dtype=torch.float64))
    return torch.cat(mults, dim=1), torch.cat(sizes)


def _row_multipliers(scores: APLScores, tau1: float) -> dict[str, torch.Tensor]:
    """Unit multipliers: the siblings of a unit are all units of its layer (all row-owning tensors
    of the layer, concatenated), per task."""
    by_layer: dict[int, list[str]] = {}
    for owner in scores.hidden:
        by_layer.setdefault(scores.tensor_layer[owner], []).append(owner)
    out = {}
    for owners in by_layer.values():
        joined = torch.cat([scores.hidden[o].to(torch.float64) for o in owners], dim=1)
        m = multipliers(joined, tau1)
        for o, part in zip(
            owners, torch.split(m, [scores.hidden[o].shape[1] for o in owners], dim=1), strict=True
        ):
            out[o] = part.contiguous()
    return out


def _plan_cached(scores, num_tasks: int, params: dict) -> APLPlan:
    if isinstance(scores, APLPlan):
        return scores
    if isinstance(scores, (str, os.PathLike)):
        scores = _load_cached(scores)
    key = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in params.items()))
    if scores is None:
        return plan(None, num_tasks=num_tasks, **params)
    cache = scores._plans
    if key not in cache:
        if len(cache) >= 4:
            cache.pop(next(iter(cache)))
        cache[key] = plan(scores, num_tasks=num_tasks, **params)
    return cache[key]


_LOADED: dict = {}


def _load_cached(path) -> APLScores:
    real = os.path.realpath(os.fspath(path))
    stat = os.stat(real)
    key = (real, stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = APLScores.load(real)
    return _LOADED[key]


def merge_tensor(
    name: str,
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    scores: APLScores | APLPlan | None,
    *,
    element_offset: int | None = None,
    out_dtype: torch.dtype | None = None,
    **params,
) -> torch.Tensor:
    """Merge one tensor by APL (for the checkpoint engine). ``scores`` is an :class:`APLPlan`
    (preferred: built once by :func:`plan`) or :class:`APLScores` (the plan is built and cached on the
    scores object for these ``params``); ``params`` as in :func:`merge`. ``finetuned`` in task order."""
    return _plan_cached(scores, len(finetuned), params).merge_tensor(
        name, base, finetuned, element_offset=element_offset, out_dtype=out_dtype
    )


def apl(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    scores: APLScores | APLPlan | str | None,
    key: str,
    drop: float | Sequence[float] = 0.9,
    tau1: float = 1.0,
    tau2: float = 1.0,
    scale: float = 1.0,
    seed: int = 0,
    combine: str = "task_arithmetic",
    within: str = "random",
    k_min: float | None = None,
    ties_merge: str = "sum",
    fallback: str | None = None,
    rescale_warning: float = RESCALE_WARNING,
    levels: str | Sequence[str] = LEVELS,
    element_offset: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The registry's per-tensor APL (``mk.merge(..., method="apl", scores=...)``): ``key`` is the
    tensor's name (``mk.merge`` passes it), ``scores`` an :class:`APLScores`, an :class:`APLPlan` or
    the path of a saved scores file; ``finetuned`` in the scores' task order. See :func:`merge`."""
    if not isinstance(key, str):
        raise TypeError(f"apl: key must be the tensor's name (a str), got {type(key).__name__}")
    params = {
        "drop": drop,
        "tau1": tau1,
        "tau2": tau2,
        "scale": scale,
        "seed": seed,
        "combine": combine,
        "within": within,
        "k_min": k_min,
        "ties_merge": ties_merge,
        "fallback": fallback,
        "rescale_warning": rescale_warning,
        "levels": levels,
    }
    return merge_tensor(
        key, base, finetuned, scores, element_offset=element_offset, out_dtype=out_dtype, **params
    )


def merge(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, Mapping[str, torch.Tensor]],
    scores: APLScores | APLPlan | None,
    *,
    drop: float | Sequence[float] = 0.9,
    tau1: float = 1.0,
    tau2: float = 1.0,
    scale: float = 1.0,
    seed: int = 0,
    combine: str = "task_arithmetic",
    within: str = "random",
    k_min: float | None = None,
    ties_merge: str = "sum",
    fallback: str | None = None,
    rescale_warning: float = RESCALE_WARNING,
    levels: str | Sequence[str] = LEVELS,
    exclude: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Merge whole state dicts by APL: theta_b + sum_t lambda_t Delta~_t.

    Args:
        base, finetuned: state dicts; ``finetuned`` a list in ``scores.tasks`` order or a dict keyed
            by the task names.
        scores: from :func:`importance` (or :func:`exact_importance`), or a prebuilt :class:`APLPlan`
            (then the other merge parameters are the plan's). ``None`` is an error unless
            ``fallback="dare"``.
        drop: p, the mean drop rate (default 0.9, the spec's default for LLM deltas), per task if a list.
        tau1: temperature of the keep-rate multipliers (layer and unit levels; default 1.0; inf: none).
        tau2: temperature of the merge weights across tasks (default 1.0; inf: equal weights).
        scale: lambda (default 1.0); lambda_t = lambda * T * softmax_t(s_hat_model / tau2).
        seed: the mask stream (default 0); masks are keyed by (seed, tensor name, task, element).
        combine: ``"task_arithmetic"`` (default: sum_t lambda_t Delta~_t) or ``"ties"``: sign election
            on sum_t lambda_t Delta~_t (an exact 0 elects +) and, without further trim, the reduction
            ``ties_merge`` of the agreeing lambda_t Delta~_t: ``"sum"`` (default, keeps the task
            arithmetic scale), ``"mean"`` or ``"weighted"``.
        within: ``"random"`` (default: Bernoulli keep with probability k, survivors divided by k) or
            ``"magnitude"`` (keep the round(k * n) entries of largest |Delta| of each row of n entries,
            round half up, no rescale; 1-D tensors are one row at their mean keep rate).
        k_min: lower clip of the keep rates (default ``None``: (1 - p) / 4 per task, so no kept entry
            is rescaled more than 4 / (1 - p)); at most 1 - p. What the clips at k_min and 1 take
            from or give to the mean keep rate is handed back by water-filling (:func:`allocate`):
            each task's keep rates average exactly 1 - p over its elements.
        rescale_warning: warn when a task's largest rescale 1 / k exceeds this multiple of DARE's
            1 / (1 - p) (default 10).
        levels: which of the scored levels shape the merge (default all three): ``"model"`` gives
            the merge weights, ``"layer"`` and ``"hidden"`` the keep-rate multipliers. A level left
            out contributes multipliers (or weights) of exactly 1.
        fallback: ``None`` (default) or ``"dare"``: without scores, merge by DARE + task arithmetic
            (``combine="ties"``: DARE-TIES) with the same drop and seed.
        exclude: glob patterns of tensor names kept at the base's value.
        device: where to compute (default: each base tensor's device); results on the base's device.

    Non-floating tensors are copied from the base. With ``tau1 = tau2 = inf`` the result equals
    ``mk.merge(base, finetuned, "dare_linear", drop=p, seed=seed, scale=scale)`` bit for bit.
    """
    if isinstance(finetuned, Mapping):
        names = scores.tasks if isinstance(scores, (APLScores, APLPlan)) else None
        if names is None or set(map(str, finetuned)) != set(names):
            raise ValueError(
                f"apl.merge: finetuned is keyed by {sorted(map(str, finetuned))} but the scores' tasks are "
                f"{names}; pass a list in the scores' task order or a dict with the same keys"
            )
        lookup = {str(k): v for k, v in finetuned.items()}
        finetuned = [lookup[t] for t in names]
    finetuned = list(finetuned)
    if not finetuned:
        raise ValueError("apl.merge: finetuned is empty; pass at least one fine-tuned state dict")
    if isinstance(scores, APLPlan):
        the_plan = scores
        if the_plan.num_tasks != len(finetuned):
            raise ValueError(
                f"apl.merge: the plan has {the_plan.num_tasks} tasks but finetuned has {len(finetuned)}"
            )
    else:
        if scores is not None and not isinstance(scores, APLScores):
            raise TypeError(
                f"apl.merge: scores must be APLScores, an APLPlan or None, got {type(scores).__name__}"
            )
        if scores is not None and scores.num_tasks != len(finetuned):
            raise ValueError(
                f"apl.merge: scores has {scores.num_tasks} tasks ({', '.join(scores.tasks)}) but finetuned "
                f"has {len(finetuned)} state dicts"
            )
        the_plan = plan(
            scores,
            num_tasks=len(finetuned),
            drop=drop,
            tau1=tau1,
            tau2=tau2,
            scale=scale,
            seed=seed,
            combine=combine,
            within=within,
            k_min=k_min,
            ties_merge=ties_merge,
            fallback=fallback,
            rescale_warning=rescale_warning,
            levels=levels,
        )
    for i, sd in enumerate(finetuned):
        missing = [n for n in base if n not in sd]
        if missing:
            raise KeyError(
                f"apl.merge: fine-tuned model {i} lacks {len(missing)} tensor(s) of the base, "
                f"e.g. {missing[0]!r}"
            )
    s = the_plan.scores
    if s is not None and s.tensor_layer and not any(n in base for n in s.tensor_layer):
        raise ValueError(
            "apl.merge: none of the scored tensors is in base (do the model's names match the state dict's?)"
        )
    merged = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point() or any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            merged[name] = tensor.clone()
            continue
        target = device if device is not None else tensor.device
        merged[name] = the_plan.merge_tensor(
            name, tensor.to(target), [sd[name].to(target) for sd in finetuned]
        ).to(tensor.device)
    return merged


__all__ = [
    "LEVELS",
    "APLPlan",
    "allocate",
    "APLScores",
    "Scores",
    "apl",
    "block_of",
    "exact_importance",
    "importance",
    "keep_rates",
    "merge",
    "merge_tensor",
    "multipliers",
    "plan",
]
