"""Model-level merges of in-memory state dicts (``mk.merge``)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence

import torch

from .methods import METHODS
from .planner import TensorTask, matrix_groups, plan_models
from .selection import MagnitudeThreshold


def _method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# Per-tensor switches that make no sense at model level (the model-level call has its own).
_INTERNAL_PARAMS = {"base", "finetuned", "return_info", "return_loss", "key", "out", "nonfinite"}


def default_memory_cap(device: torch.device) -> int:
    """Bytes one batched matrix merge may use: 70% of the GPU's free memory, or half of the host's
    available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.7 * free)
    try:
        return int(0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):  # pragma: no cover - platforms without sysconf
        return 4 << 30


def takes_matrix_path(spec, name: str, ndim: int, params: dict) -> bool:
    """Whether a mergeable tensor goes through a matrix method's batched path."""
    return spec.kind == "matrix" and ndim == 2 and (spec.selects is None or spec.selects(name, params))


def batch_layers(spec, shape: Sequence[int], experts: int, dtype: torch.dtype, memory_cap: int) -> int:
    """How many same-shape layers one batched matrix merge takes under the memory cap (at least 1)."""
    per_layer = spec.layer_bytes(*shape, experts, dtype.itemsize)
    return max(1, memory_cap // max(per_layer, 1))


def _check_params(name: str, function, params: dict, extra: Sequence[str] = ()) -> None:
    signature = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in signature.values()):
        return  # takes another method's parameters (awd's ``then``) and checks them itself
    accepted = (set(signature) | set(extra)) - _INTERNAL_PARAMS
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"method {name!r} does not take {', '.join(unknown)}; valid parameters: "
            f"{', '.join(sorted(accepted))}"
        )


def merge(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    method: str = "task_arithmetic",
    *,
    device: torch.device | str | None = None,
    exclude: Sequence[str] = (),
    threshold_scope: str = "tensor",
    memory_cap: int | None = None,
    diagnostics: dict | None = None,
    **params,
) -> dict[str, torch.Tensor]:
    """Merge whole models given as state dicts.

    Args:
        base: the base model's state dict.
        finetuned: the fine-tuned models' state dicts, with the base's keys and shapes.
        method: a name from :data:`mergekernels.methods.METHODS` (``task_arithmetic``, ``ties``,
            ``dare_ties``, ``breadcrumbs``, ``della`` ... and mergekit's aliases).
        device: where to compute (default: each base tensor's device); results are returned on
            the base tensor's device.
        exclude: glob patterns of tensor names kept at the base's value.
        threshold_scope: for ``ties``: ``"tensor"`` (paper / mergekit) or ``"global"`` (one
            threshold per model over every merged tensor, FusionBench), found exactly in two passes.
        memory_cap: for matrix methods (``ace``, ``tsv_m``, ``iso_c``, ``iso_cts``, ``wudi``,
            ``regmean``), the bytes one batch of same-shape 2-D tensors may use (default:
            :func:`default_memory_cap` of the compute device). A tensor too large for the cap is still
            merged, alone.
        diagnostics: if a dict is given, it receives per-tensor diagnostics of the methods that
            report them (ACE: het, gamma, energies, fallback, refined; WUDI: the loss reached; AWD:
            mean |cos| before/after, ||delta||, how far delta moved, under "awd" for the whole model
            and, per tensor or row, under each tensor's name).
        **params: the method's parameters; any may be a list with one value per model. Methods
            that draw random masks use each tensor's name as its key. ``regmean`` takes
            ``grams={tensor name: [one input Gram per model]}`` (see
            :func:`mergekernels.methods.collect_input_grams`); 2-D tensors without Grams get the mean.

    Non-floating tensors (integer buffers) are copied from the base. Matrix methods merge every 2-D
    tensor of one shape as one batch (under ``memory_cap``) and give other tensors the mean of the task
    vectors.
    """
    spec = _method(method)
    if method == "passthrough":
        raise ValueError(
            "passthrough takes one model per tensor (a slice's source in a configuration); mk.merge merges "
            "fine-tuned models into a base: use mk.passthrough(tensor, scale=...) per tensor"
        )
    if not finetuned:
        raise ValueError("merge: finetuned is empty; pass at least one fine-tuned state dict")
    if threshold_scope not in ("tensor", "global"):
        raise ValueError(f"threshold_scope must be 'tensor' or 'global', got {threshold_scope!r}")
    if threshold_scope == "global" and spec.function.__name__ != "ties":
        raise ValueError(f"threshold_scope='global' applies to ties, not {method!r}")
    kwargs = {**spec.implied, **params}
    _check_params(method, spec.function, kwargs, spec.matrix_params)
    missing = [p for p in spec.required if p not in kwargs]
    if missing:
        raise ValueError(f"method {method!r} needs {', '.join(missing)} (see the method's docstring)")
    for i, sd in enumerate(finetuned):
        missing = [name for name in base if name not in sd]
        if missing:
            raise KeyError(
                f"merge: fine-tuned model {i} lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}"
            )

    plan = plan_models(base, finetuned, method, kwargs, exclude)
    merged_tasks = [task for task in plan.tasks if task.merge]

    def inputs(name: str):
        target = device if device is not None else base[name].device
        return base[name].to(target), [sd[name].to(target) for sd in finetuned]

    if threshold_scope == "global":
        names = [task.name for task in merged_tasks]
        # The selector makes its device concrete (cuda -> cuda:N), as the tensors moved there report.
        target = device if device is not None else (base[names[0]].device if names else "cpu")
        selector = MagnitudeThreshold(len(finetuned), target)
        for name in names:
            selector.count(*inputs(name))
        selector.set_density(kwargs.pop("density", 0.2))
        for name in names:
            selector.refine(*inputs(name))
        kwargs["thresholds"] = selector.thresholds()

    per_tensor: dict[str, dict] = {}
    if spec.prepare_stats is not None:  # a statistics pass over the merged tensors (AWD's Grams)
        shared, per_tensor, found = spec.prepare_stats(inputs, [task.name for task in merged_tasks], kwargs)
        kwargs.update(shared)
        if diagnostics is not None:
            diagnostics.update(found)

    merged: dict[str, torch.Tensor] = {}
    groups = matrix_groups(plan.tasks, lambda t: takes_matrix_path(spec, t.name, len(t.shape), kwargs))
    for group in groups.values():
        _merge_matrices(base, finetuned, spec, group, inputs, kwargs, memory_cap, merged, diagnostics, device)
    tensor_kwargs = {k: v for k, v in kwargs.items() if k not in spec.matrix_params}
    for task in plan.tasks:
        name = task.name
        if name in merged:
            continue
        if not task.merge:
            merged[name] = base[name].clone()
            continue
        b, fts = inputs(name)
        call = {**tensor_kwargs, **per_tensor.get(name, {})}
        if spec.uses_rng:
            call.setdefault("key", name)
        try:
            out = spec.function(b, fts, **call)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise type(exc)(f"merge: tensor {name!r}: {exc}") from exc
        merged[name] = out.to(base[name].device)
    return {name: merged[name] for name in base}


def _merge_matrices(
    base,
    finetuned,
    spec,
    group: list[TensorTask],
    inputs,
    kwargs,
    memory_cap,
    merged,
    diagnostics,
    target_device,
) -> None:
    """Merge same-shape 2-D tensors in batches under the memory cap."""
    first = base[group[0].name]
    shape, dtype = tuple(first.shape), first.dtype
    device = first.device if target_device is None else torch.device(target_device)
    cap = memory_cap if memory_cap is not None else default_memory_cap(device)
    size = batch_layers(spec, shape, len(finetuned), dtype, cap)
    names = [task.name for task in group]
    for start in range(0, len(names), size):
        chunk = names[start : start + size]
        pairs = [inputs(name) for name in chunk]
        b = torch.stack([p[0] for p in pairs])
        fts = [torch.stack([p[1][t] for p in pairs]) for t in range(len(finetuned))]
        del pairs
        try:
            out, diag = spec.batched(b, fts, chunk, **kwargs)
        except (ValueError, TypeError, RuntimeError) as exc:
            shown = ", ".join(repr(n) for n in chunk[:3]) + (", ..." if len(chunk) > 3 else "")
            raise type(exc)(f"merge: tensors {shown} (shape {list(shape)}): {exc}") from exc
        for i, name in enumerate(chunk):
            merged[name] = out[i].to(base[name].device)
            if diagnostics is not None and diag is not None:
                diagnostics[name] = diag[i]
