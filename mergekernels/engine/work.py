"""Step 1 of the pipeline, plan: the planner's tensor tasks cut into work units, and the shards.

A work unit is what the reader reads and the compute step merges in one go, chosen by what the
method needs (:class:`mergekernels.methods.MethodSpec`):

- ``copy``: a tensor kept from the base (non-floating, excluded, or a slice of the base alone);
- ``tensor``: one whole tensor;
- ``rows``: a row range of a tensor larger than ``chunk_bytes`` per input, for methods with
  ``chunks`` (any row range for element-wise ones, blocks of whole rows for DELLA), so a
  128k x 8k embedding never needs K full copies in memory;
- ``group``: same-shape 2-D tensors of a matrix method (ACE, TSV-M, Iso, WUDI, RegMean), batched
  under the memory cap.

Shards are planned up front from the tasks' output sizes in processing order, so the layout, and
with it every output byte, is the same on every run, on resume and on any number of ranks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..config import MergeConfig
from ..merge import batch_layers, takes_matrix_path
from ..methods import METHODS
from ..planner import MergePlan, TensorTask, is_excluded, matrix_groups
from .writer import Shard, plan_shards


@dataclass
class WorkUnit:
    """One piece of work: a tensor, a row range of one, or a group of same-shape tensors."""

    tasks: tuple[TensorTask, ...]
    kind: str  # "copy" | "tensor" | "rows" | "group"
    rows: tuple[int, int] | None = None
    inputs: tuple | None = None  # filled by the reader: (base, [fine-tuned]) per task
    params: dict | None = None  # filled by the reader: what a chunked tensor's pre-pass found
    nbytes: int = 0  # input bytes held while the unit is in flight (the prefetch budget)
    staging: object | None = None  # its region of the pinned staging buffer (GPU merges)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)


class WorkPlan:
    """The units of a merge in processing order, the row pieces of each tensor, the prefetch
    budget and the output dtype of each tensor."""

    def __init__(
        self,
        cfg: MergeConfig,
        plan: MergePlan,
        memory_cap: int,
        chunk_bytes: int,
        memory_cap_source: str = "options.memory_cap",
    ):
        """``memory_cap``: the bytes one matrix-method layer may use; ``memory_cap_source`` says
        where that number came from, for the error when a tensor does not fit."""
        self.cfg, self.plan = cfg, plan
        self.spec = METHODS[cfg.method]
        self.tasks = {task.name: task for task in plan.tasks}
        groups = matrix_groups(
            plan.tasks, lambda t: takes_matrix_path(self.spec, t.name, len(t.shape), t.params)
        )
        grouped = {task.name: key for key, members in groups.items() for task in members}
        self.units: list[WorkUnit] = []
        scheduled: set[str] = set()
        for task in plan.tasks:
            if task.name in scheduled:
                continue
            if task.name in grouped:
                members = groups[grouped[task.name]]
                self._check_fits(task, memory_cap, memory_cap_source)
                size = batch_layers(self.spec, task.shape, len(task.inputs), task.dtype, memory_cap)
                for start in range(0, len(members), size):
                    batch = tuple(members[start : start + size])
                    self.units.append(WorkUnit(batch, "group"))
                    scheduled.update(t.name for t in batch)
                continue
            scheduled.add(task.name)
            nbytes = _nbytes(task)
            if not task.merge:
                self.units.append(WorkUnit((task,), "copy"))
            elif nbytes > chunk_bytes and self._splits(task):
                step = max(1, chunk_bytes // max(1, nbytes // task.shape[0]))
                for r0 in range(0, task.shape[0], step):
                    self.units.append(WorkUnit((task,), "rows", (r0, min(task.shape[0], r0 + step))))
            else:
                self.units.append(WorkUnit((task,), "tensor"))
        self.order = list(dict.fromkeys(name for u in self.units for name in u.names))
        self.pieces: dict[str, list[tuple[int, int] | None]] = defaultdict(list)
        for u in self.units:
            for task in u.tasks:
                self.pieces[task.name].append(u.rows)
            u.nbytes = sum(self.read_bytes(task, u.rows) for task in u.tasks)
        # The prefetch budget: the inputs of the largest tensor (or row chunk). A unit larger than
        # the budget (a batched matrix group) is read only when nothing else is in flight.
        self.budget = max(
            (self.read_bytes(self.tasks[n], r) for n in self.order for r in self.pieces[n]), default=0
        )

    def _check_fits(self, task: TensorTask, memory_cap: int, source: str) -> None:
        """A matrix method merges each layer whole (no row chunks): refuse, before anything is read
        or written, a layer whose working set is over the cap, instead of failing mid-way or being
        killed by the OOM killer."""
        needed = self.spec.layer_bytes(*task.shape, len(task.inputs), task.dtype.itemsize)
        if needed > memory_cap:
            raise MemoryCapError(
                f"tensor {task.name!r} ({' x '.join(map(str, task.shape))}, {len(task.inputs)} models): "
                f"{self.cfg.method} merges it whole, which needs about {_gib(needed)} of working memory, "
                f"over the memory cap of {_gib(memory_cap)} ({source}); raise options.memory_cap if "
                "the memory is there, or merge on a machine (or device) with more"
            )

    def _splits(self, task: TensorTask) -> bool:
        shape, chunks = task.shape, self.spec.chunks_for(task.params)
        if chunks == "elements":
            return len(shape) >= 1 and shape[0] > 1
        return chunks == "rows" and len(shape) >= 2 and shape[0] > 1

    def converts(self, task: TensorTask) -> bool:
        """Whether the config's dtype and out_dtype apply to a tensor (floating, not excluded)."""
        return task.dtype.is_floating_point and not is_excluded(task.name, self.cfg.exclude)

    def in_kernels(self, task: TensorTask) -> bool:
        """Whether the method's fused kernels read this tensor's inputs as stored and check them for
        NaN / Inf themselves (a merged tensor of a ``fused_io`` method whose rows are not gathered
        from a merged vocabulary)."""
        return self.spec.fused_io and task.merge and task.vocab != "permute"

    def input_dtype(self, task: TensorTask, stored: torch.dtype) -> torch.dtype:
        """The dtype a stored input is handed to the method in: the config's ``dtype``, except that
        the fused kernels take bfloat16 / float16 as stored where the config asks for float32 (they
        compute in float32 from the same exact values, without a widening copy)."""
        dtype = self.cfg.dtype
        if dtype is None or not self.converts(task):
            return stored
        if self.in_kernels(task) and dtype == torch.float32 and stored in (torch.bfloat16, torch.float16):
            return stored
        return dtype

    def read_bytes(self, task: TensorTask, rows: tuple[int, int] | None) -> int:
        """Bytes of a task's input tensors (or of a row range of them), as stored."""
        nbytes = _nbytes(task)
        if rows is not None:
            nbytes = nbytes // task.shape[0] * (rows[1] - rows[0])
        return nbytes * (1 + sum(source != task.base for source in task.inputs))

    def out_dtype(self, name: str) -> torch.dtype:
        task = self.tasks[name]
        if self.converts(task) and self.cfg.out_dtype is not None:
            return self.cfg.out_dtype
        return task.dtype

    def out_bytes(self, name: str) -> int:
        task = self.tasks[name]
        return numel_of(task.shape) * self.out_dtype(name).itemsize

    def shards(self, shard_bytes: int) -> list[Shard]:
        return plan_shards([(n, self.out_bytes(n)) for n in self.order], shard_bytes)


class MemoryCapError(ValueError):
    """A tensor that must be merged whole needs more memory than the cap allows."""


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB ({nbytes} bytes)"


def numel_of(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nbytes(task: TensorTask) -> int:
    return numel_of(task.shape) * task.dtype.itemsize
