"""mergekit's language for parameter values: scalars, per-layer gradients and name filters.

A parameter in a merge configuration (under ``parameters`` at the top level, in a slice, or per
model) is written as one of::

    weight: 0.5                          # a scalar: every tensor
    weight: [0.0, 0.3, 1.0]              # a gradient: anchors spread evenly over the layers
    weight:                              # filters: the first entry whose filter is a substring
      - {filter: self_attn, value: [0, 1]}     # of the tensor's name wins; an entry without
      - {filter: mlp, value: 0.2}              # a filter (or with "*") matches every tensor
      - value: 0.5

A gradient is read at a position t in [0, 1]: a layer's position in its slice, idx / (n - 1) for a
slice of n > 1 layers, 1 for a one-layer slice; tensors outside the layers (embeddings, final norm,
lm_head) have t = 0, the first anchor. Numeric anchors are interpolated piecewise-linearly:
with s = t (N - 1) for N anchors, i = floor(s), the value is (1 - (s - i)) v[i] + (s - i) v[i+1];
anchors that are not numbers (true / false, strings) pick v[floor(t (N - 1))]. A filter list with
no matching entry, or an empty gradient, leaves the parameter unset at that level, so the next
level down (slice source > slice > global ``parameters``) decides.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Scalar = bool | int | float | str | None


class Unset:
    """The value of a setting that does not apply to a tensor (no filter matched)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset()


@dataclass(frozen=True)
class Gradient:
    """Anchor values spread evenly over a slice's layers."""

    anchors: tuple[Scalar, ...]

    def at(self, t: float) -> Scalar | Unset:
        values = self.anchors
        if not values:
            return UNSET
        if not all(_is_number(v) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * values[low] + frac * values[high]


@dataclass(frozen=True)
class Filtered:
    """(filter, value) pairs: the first whose filter is a substring of the tensor name applies."""

    entries: tuple[tuple[str | None, Scalar | Gradient], ...]

    def at(self, tensor_name: str, t: float) -> Scalar | Unset:
        for pattern, value in self.entries:
            if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
                return value.at(t) if isinstance(value, Gradient) else value
        return UNSET


Setting = Scalar | Gradient | Filtered


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate(setting: Setting, tensor_name: str, t: float) -> Scalar | Unset:
    """The value of one setting for a tensor at gradient position t (UNSET if it does not apply)."""
    if isinstance(setting, Gradient):
        return setting.at(t)
    if isinstance(setting, Filtered):
        return setting.at(tensor_name, t)
    return setting


def is_scalar(setting: Setting) -> bool:
    return not isinstance(setting, (Gradient, Filtered))


def parse(
    value: Any,
    what: str,
    check: Callable[[Any, str], Any],
    fail: Callable[[str], None],
    ignore: Callable[[str], None] | None = None,
) -> Setting:
    """Reads one parameter value as written in YAML into a :data:`Setting`.

    Args:
        value: the YAML value: a scalar, a list of scalars (a gradient), a ``{filter, value}``
            mapping or a list of them.
        what: where it was written (for errors), e.g. ``"models[1] (./a) parameters.weight"``.
        check: validates one scalar (type and range) and returns it in the form the method takes;
            called on every anchor and filtered value, so a gradient is valid wherever it is read
            (intervals are convex: interpolated values stay inside).
        fail: raises the configuration error.
        ignore: if given, keys of a filtered entry other than ``filter`` and ``value`` are reported
            to it and ignored, as mergekit ignores them (e.g. the old ``pattern:``: the entry then
            has no filter and matches every tensor); otherwise they are an error.
    """
    if isinstance(value, dict):
        return Filtered((_conditional(value, what, check, fail, ignore),))
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return Filtered(
                tuple(_conditional(v, f"{what}[{i}]", check, fail, ignore) for i, v in enumerate(value))
            )
        return _gradient(value, what, check, fail)
    return check(value, what)


def _gradient(value: list, what: str, check, fail) -> Gradient:
    anchors = []
    for i, v in enumerate(value):
        if isinstance(v, (list, dict)):
            fail(
                f"{what}[{i}]: a gradient's anchors must be single values; filtered entries "
                "({filter: ..., value: ...}) cannot be mixed with anchors in one list"
            )
        anchors.append(check(v, f"{what}[{i}]"))
    numbers = [_is_number(a) for a in anchors]
    if any(numbers) and not all(numbers):
        fail(f"{what}: a gradient mixes numbers and other values: {value!r}")
    if all(numbers) and not all(math.isfinite(a) for a in anchors):
        fail(f"{what}: a gradient's anchors must be finite numbers, got {value!r}")
    return Gradient(tuple(anchors))


def _conditional(entry: dict, what: str, check, fail, ignore) -> tuple[str | None, Scalar | Gradient]:
    for key in sorted(set(entry) - {"filter", "value"}, key=str):
        if ignore is None:
            fail(f"{what}: unknown key {key!r} in a filtered value; valid: filter, value")
        ignore(f"{what}.{key}")
    if "value" not in entry:
        fail(f"{what}: a filtered entry needs `value` (and optionally `filter`, a substring of tensor names)")
    pattern = entry.get("filter")
    if pattern is not None and not isinstance(pattern, str):
        fail(f"{what}.filter must be a string (a substring of tensor names), got {pattern!r}")
    value = entry["value"]
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
        fail(f"{what}.value: filtered entries cannot be nested")
    if isinstance(value, list):
        return pattern, _gradient(value, f"{what}.value", check, fail)
    return pattern, check(value, f"{what}.value")


__all__ = ["UNSET", "Filtered", "Gradient", "Setting", "evaluate", "is_scalar", "parse"]
