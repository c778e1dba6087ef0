"""Step 2 of the pipeline, read: a thread that reads the next units' inputs ahead of the compute.

:class:`InputReader` reads one task's tensors (lazy safetensors reads of the whole tensor or a row
range; a tokenizer merge's vocabulary tensors through :class:`.gather.VocabularyGather`), converts
them to the config's ``dtype`` and refuses NaN / Inf. :class:`Prefetcher` runs it
on a thread, unit after unit, holding at most ``budget`` bytes of inputs ahead of the compute step
(a byte budget, not a count: the inputs of the largest tensor or row chunk); before the first chunk
of a chunked tensor whose method has a pre-pass (TIES' and Breadcrumbs' thresholds, DARE's L1
norms), it reads every chunk once per pass to find what the whole tensor needs. For GPU merges it
copies each unit into one reused pinned buffer, so host-to-device copies run asynchronously.
"""

from __future__ import annotations

import queue
import threading

import torch

from ..methods import MethodSpec
from ..planner import TensorTask
from .checkpoint import Checkpoint, CheckpointError
from .gather import VocabularyGather
from .staging import PinnedStaging
from .work import WorkPlan, WorkUnit, numel_of


def _finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in x: min and max propagate both, and one aminmax pass runs at memory speed
    (isfinite(x).all() is ~40x slower on CPU for bf16)."""
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


class InputReader:
    """Reads a task's base and fine-tuned tensors from the checkpoints (counting the bytes)."""

    def __init__(self, work: WorkPlan, checkpoints: list[Checkpoint], allow_nonfinite: bool):
        self.work, self.checkpoints = work, checkpoints
        self.dtype = work.cfg.dtype
        self.allow_nonfinite = allow_nonfinite
        self.bytes_read = 0
        self.vocabulary = None
        if work.plan.vocabulary is not None:
            self.vocabulary = VocabularyGather(work.plan, checkpoints)

    def read(self, task: TensorTask, rows: tuple[int, int] | None = None):
        """(base, [fine-tuned]) of one task, whole or rows [start, stop); a vocabulary tensor's rows
        cut to the common ones (``truncate``) or gathered into the output vocabulary's order
        (``permute``)."""
        if task.vocab == "truncate" and rows is None:
            rows = (0, task.shape[0])
        if task.vocab == "permute":
            cast = self.dtype if self.work.converts(task) else None
            before = self.vocabulary.bytes_read
            tensors = self.vocabulary.read(task, rows, cast)
            self.bytes_read += self.vocabulary.bytes_read - before
            self._check_finite(task, tensors)
            return tensors[0], tensors[1:]
        base = self.checkpoints[task.base.model].read(task.base.name, rows)
        tensors = [base]
        for source in task.inputs:  # an input missing from its model (allow_missing: base) is the base's
            same = source == task.base
            tensors.append(base if same else self.checkpoints[source.model].read(source.name, rows))
        self.bytes_read += sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
        tensors = [t.to(self.work.input_dtype(task, t.dtype)) for t in tensors]
        if not self.work.in_kernels(task):  # else the merge pass checks them (Computer)
            self._check_finite(task, tensors)
        return tensors[0], tensors[1:]

    def _check_finite(self, task: TensorTask, tensors: list[torch.Tensor]) -> None:
        """NaN / Inf in a floating input (base first, as in ``task``) is an error naming the file and
        tensor (unless allowed)."""
        if not self.work.converts(task) or self.allow_nonfinite:
            return
        for index, x in enumerate(tensors):
            if x.numel() and not _finite(x):
                raise self.nonfinite_error(task, index)

    def nonfinite_error(self, task: TensorTask, index: int) -> CheckpointError:
        """The error for NaN / Inf in a task's input ``index`` (0: the base, 1 + t: input t)."""
        source = [task.base, *task.inputs][index]
        info = self.checkpoints[source.model].info(source.name)
        return CheckpointError(
            f"{info.file}: tensor {source.name!r} holds NaN or Inf "
            "(options: {allow_nonfinite: true} merges it anyway)"
        )

    def read_on(self, task: TensorTask, device: torch.device, rows=None):
        b, fts = self.read(task, rows)
        return b.to(device), [x.to(device) for x in fts]


class Budget:
    """Bytes of input the reader may hold ahead of the compute step."""

    def __init__(self, limit: int, stop: threading.Event):
        self.limit, self.used, self.stop = limit, 0, stop
        self.cond = threading.Condition()

    def acquire(self, nbytes: int) -> bool:
        """Wait until nbytes fit (always, when nothing is held); False if the merge is stopping."""
        with self.cond:
            while self.used and self.used + nbytes > self.limit:
                if self.stop.is_set():
                    return False
                self.cond.wait(0.1)
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()


class Failed:
    """An exception raised on the reader thread, handed to the compute step."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher:
    """The reader thread: puts each unit, its inputs read, on :attr:`queue` (then None at the end,
    or a :class:`Failed`)."""

    def __init__(
        self,
        work: WorkPlan,
        units: list[WorkUnit],
        reader: InputReader,
        device: torch.device,
        stop: threading.Event,
    ):
        self.work, self.units, self.reader, self.device, self.stop = work, units, reader, device, stop
        self.spec: MethodSpec = work.spec
        self.queue: queue.Queue = queue.Queue()  # unbounded: the byte budget bounds what it holds
        self.budget = Budget(work.budget, stop)
        # GPU merges copy inputs through one reused pinned buffer as large as the budget.
        experts = max((len(t.inputs) for t in work.plan.tasks), default=0)
        self.staging = PinnedStaging(work.budget + 256 * (experts + 1)) if device.type == "cuda" else None
        self._found: dict[str, dict] = {}  # tensor name -> what its pre-pass found
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _hand_over(self, item) -> bool:
        """Put on the queue unless the merge is being stopped (then give up)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for unit in self.units:
                if self.stop.is_set():
                    return
                if unit.kind == "rows" and self.spec.prepass is not None:
                    task = unit.tasks[0]
                    if unit.rows[0] == 0:
                        self._found[task.name] = self._prepass(task)
                    unit.params = self._found[task.name]
                    if unit.rows[1] == task.shape[0]:
                        del self._found[task.name]
                if not self.budget.acquire(unit.nbytes):
                    return
                unit.inputs = tuple(self.reader.read(task, unit.rows) for task in unit.tasks)
                if self.staging is not None and not self._stage(unit):
                    return
                if not self._hand_over(unit):
                    return
            self._hand_over(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the compute step
            self._hand_over(Failed(exc))

    def _stage(self, unit: WorkUnit) -> bool:
        staged = self.staging.stage([t for b, fts in unit.inputs for t in (b, *fts)], self.stop)
        if staged is None:
            return False
        copies, unit.staging = iter(staged[0]), staged[1]
        unit.inputs = tuple((next(copies), [next(copies) for _ in fts]) for _, fts in unit.inputs)
        return True

    def _prepass(self, task: TensorTask) -> dict:
        """A chunked tensor's pre-pass: every chunk read once per pass, before its merge."""
        numel = numel_of(task.shape)
        worker = self.spec.prepass(len(task.inputs), numel, task_call(self.spec, task), self.device)
        if worker is None:
            return {}
        row_len = numel // task.shape[0]
        for index in range(worker.passes):
            for rows in self.work.pieces[task.name]:
                nbytes = self.work.read_bytes(task, rows)
                if not self.budget.acquire(nbytes):
                    return {}
                try:
                    b, fts = self.reader.read_on(task, self.device, rows)
                    worker.update(index, b, fts, rows[0] * row_len)
                    del b, fts
                finally:
                    self.budget.release(nbytes)
            worker.end_pass(index)
        return worker.params()


def task_call(spec: MethodSpec, task: TensorTask) -> dict:
    """The per-tensor call's keyword arguments: the task's, without matrix-only ones, and the tensor's
    name as the key of random methods' masks."""
    call = {k: v for k, v in task.params.items() if k not in spec.matrix_params}
    if spec.uses_rng:
        call.setdefault("key", task.name)
    return call
