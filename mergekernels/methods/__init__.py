"""Merge methods, one file each, composed from the ops in :mod:`mergekernels._ops`.

``METHODS`` maps every accepted method name (ours and mergekit's) to the per-tensor function and
the keyword arguments the name implies. ``kind`` tells the model-level driver how a method
consumes tensors: ``elementwise`` methods may be chunked below tensor size once any per-tensor
threshold is known; ``needs_stats`` methods need a pass over the whole model first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .breadcrumbs import breadcrumbs
from .dare import dare
from .della import della
from .ta import task_arithmetic
from .ties import ties


@dataclass(frozen=True)
class MethodSpec:
    function: Callable
    implied: dict = field(default_factory=dict)
    kind: str = "elementwise"
    uses_rng: bool = False


METHODS: dict[str, MethodSpec] = {
    "task_arithmetic": MethodSpec(task_arithmetic),
    "linear": MethodSpec(task_arithmetic, {"normalize": True}),
    "ties": MethodSpec(ties),
    "dare": MethodSpec(dare, uses_rng=True),
    "dare_linear": MethodSpec(dare, {"consensus": None}, uses_rng=True),
    "dare_ties": MethodSpec(dare, {"consensus": "ties"}, uses_rng=True),
    "breadcrumbs": MethodSpec(breadcrumbs, {"consensus": None}),
    "breadcrumbs_ties": MethodSpec(breadcrumbs, {"consensus": "ties"}),
    "della": MethodSpec(della, {"consensus": "ties"}, uses_rng=True),
    "della_linear": MethodSpec(della, {"consensus": None, "merge": "sum"}, uses_rng=True),
}

__all__ = ["METHODS", "MethodSpec", "breadcrumbs", "dare", "della", "task_arithmetic", "ties"]
