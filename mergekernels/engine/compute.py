"""Step 3 of the pipeline, compute: merge one work unit on the compute device.

Inputs arrive from the reader on the host (pinned for GPU merges) and are copied to the device
without blocking; the method runs there (the fused kernels, CPU or CUDA). A ``rows`` unit merges
its row range into the tensor's output buffer; the tensor is handed on when its last range is in.
A ``group`` unit stacks its same-shape tensors and runs the matrix method's batched path.

Methods whose fused kernels read the inputs (``MethodSpec.fused_io``) write the output dtype
directly, on the CPU straight into the tensor's place in its shard buffer (``slot``), and report
NaN / Inf inputs from the merge pass itself: the error names the tensor as the reader's own check
would, without a second read of every input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..planner import TensorTask
from .checkpoint import CheckpointError
from .reader import InputReader, task_call
from .work import WorkPlan, WorkUnit, numel_of


class Computer:
    """Runs units; :meth:`run` returns the tensors it finished, as (task, merged tensor) pairs."""

    def __init__(
        self,
        work: WorkPlan,
        reader: InputReader,
        device: torch.device,
        per_tensor_params: dict[str, dict],
        diagnostics: dict[str, dict],
        staging=None,
        slot: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None,
    ):
        self.work, self.reader, self.device, self.spec = work, reader, device, work.spec
        self.per_tensor_params, self.diagnostics = per_tensor_params, diagnostics
        self.staging = staging
        self.slot = slot  # where a tensor's output goes (ShardOutput.slot), for CPU merges
        self._partial: dict[str, torch.Tensor] = {}  # row-chunked outputs being filled

    def run(self, unit: WorkUnit) -> list[tuple[TensorTask, torch.Tensor]]:
        inputs = [
            (b.to(self.device, non_blocking=True), [x.to(self.device, non_blocking=True) for x in fts])
            for b, fts in unit.inputs
        ]
        unit.inputs = None
        if unit.staging is not None:  # reusable once these copies have finished
            copied = torch.cuda.Event()
            copied.record()
            self.staging.give_back(unit.staging, copied)
        try:
            if unit.kind == "copy":
                return [(unit.tasks[0], inputs[0][0])]
            if unit.kind == "group":
                return self._group(unit, inputs)
            return self._tensor(unit, *inputs[0])
        except (ValueError, TypeError, RuntimeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise type(exc)(f"merge: tensor(s) {', '.join(unit.names[:3])}: {exc}") from exc

    def _group(self, unit: WorkUnit, inputs) -> list[tuple[TensorTask, torch.Tensor]]:
        experts = len(unit.tasks[0].inputs)
        b = torch.stack([i[0] for i in inputs])
        fts = [torch.stack([i[1][t] for i in inputs]) for t in range(experts)]
        del inputs
        out, diag = self.spec.batched(b, fts, list(unit.names), **unit.tasks[0].params)
        if diag is not None:
            for i, name in enumerate(unit.names):
                self.diagnostics[name] = diag[i]
        return [(task, out[i]) for i, task in enumerate(unit.tasks)]

    def _tensor(self, unit: WorkUnit, b, fts) -> list[tuple[TensorTask, torch.Tensor]]:
        task = unit.tasks[0]
        call = {
            **task_call(self.spec, task),
            **self.per_tensor_params.get(task.name, {}),
            **(unit.params or {}),
        }
        flags = into = None
        if self.work.in_kernels(task):
            call["out_dtype"] = self.work.out_dtype(task.name)
            if not self.reader.allow_nonfinite:
                flags = call["nonfinite"] = torch.zeros(len(fts) + 1, dtype=torch.int32, device=b.device)
            if self.slot is not None:
                into = self.slot(task.name, task.shape)
        if unit.kind != "rows":
            if into is not None:
                call["out"] = into
            merged = self.spec.function(b, fts, **call)
            self._check_flags(task, flags)
            return [(task, merged)]
        if self.spec.uses_rng or self.spec.offsets or "tie_cuts" in call:  # by global element index
            call["element_offset"] = unit.rows[0] * numel_of(task.shape[1:])
        start, stop = unit.rows
        if into is not None:
            full, call["out"] = into, into[start:stop]
        else:
            full = self._partial.setdefault(
                task.name, torch.empty(task.shape, dtype=self.work.out_dtype(task.name))
            )
        piece = self.spec.function(b, fts, **call)
        self._check_flags(task, flags)
        if into is None:
            full[start:stop] = piece.to("cpu", full.dtype)
        del piece
        if stop == task.shape[0]:
            self._partial.pop(task.name, None)
            return [(task, full)]
        return []

    def _check_flags(self, task: TensorTask, flags: torch.Tensor | None) -> None:
        """Raise the reader's error for the first input the merge pass found NaN / Inf in."""
        if flags is not None and bool(flags.any()):
            raise self.reader.nonfinite_error(task, int(flags.nonzero()[0, 0]))
