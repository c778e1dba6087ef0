"""Model-level merges of in-memory state dicts (``mk.merge``)."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Mapping, Sequence

import torch

from .methods import METHODS
from .selection import MagnitudeThreshold


def _method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _check_params(name: str, function, params: dict) -> None:
    accepted = set(inspect.signature(function).parameters) - {"base", "finetuned"}
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
        **params: the method's parameters; any may be a list with one value per model. Methods
            that draw random masks use each tensor's name as its key.

    Non-floating tensors (integer buffers) are copied from the base.
    """
    spec = _method(method)
    if not finetuned:
        raise ValueError("merge: finetuned is empty; pass at least one fine-tuned state dict")
    if threshold_scope not in ("tensor", "global"):
        raise ValueError(f"threshold_scope must be 'tensor' or 'global', got {threshold_scope!r}")
    if threshold_scope == "global" and spec.function.__name__ != "ties":
        raise ValueError(f"threshold_scope='global' applies to ties, not {method!r}")
    kwargs = {**spec.implied, **params}
    _check_params(method, spec.function, kwargs)
    for i, sd in enumerate(finetuned):
        missing = [name for name in base if name not in sd]
        if missing:
            raise KeyError(
                f"merge: fine-tuned model {i} lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}"
            )

    def mergeable(name: str) -> bool:
        return base[name].is_floating_point() and not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)

    def inputs(name: str):
        target = device if device is not None else base[name].device
        return base[name].to(target), [sd[name].to(target) for sd in finetuned]

    if threshold_scope == "global":
        names = [n for n in base if mergeable(n)]
        target = (
            torch.device(device)
            if device is not None
            else (base[names[0]].device if names else torch.device("cpu"))
        )
        selector = MagnitudeThreshold(len(finetuned), target)
        for name in names:
            selector.count(*inputs(name))
        selector.set_density(kwargs.pop("density", 0.2))
        for name in names:
            selector.refine(*inputs(name))
        kwargs["thresholds"] = selector.thresholds()

    merged: dict[str, torch.Tensor] = {}
    for name, tensor in base.items():
        if not mergeable(name):
            merged[name] = tensor.clone()
            continue
        b, fts = inputs(name)
        call = dict(kwargs)
        if spec.uses_rng:
            call.setdefault("key", name)
        try:
            out = spec.function(b, fts, **call)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise type(exc)(f"merge: tensor {name!r}: {exc}") from exc
        merged[name] = out.to(tensor.device)
    return merged
