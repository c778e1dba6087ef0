"""Part of step 2, read: a tokenizer merge's vocabulary tensors, read row by row into the output
vocabulary's order (:class:`mergekernels.vocab.RowLayout` says which row goes where).

A piece of output rows [start, stop) of one model is its own rows of those tokens (read as runs of
consecutive rows: mostly one run, as tokens keep their ids), the default rows of tokens it lacks and
its padding rows. The rows every piece shares (default rows, padding means) are found once per
tensor, before its first piece, by reading only the rows they need. So a vocabulary tensor is read
in row chunks like any other, and a whole one costs at most one extra copy per input.
"""

from __future__ import annotations

import torch

from ..planner import MergePlan, TensorTask
from ..vocab import TokenizerError
from ..vocab.rows import Filler, RowLayout

# Rows of a gather closer than this are read as one run (the rows between them are read too).
RUN_GAP = 64


class VocabularyGather:
    """Reads vocabulary tensors (``TensorTask.vocab == "permute"``) through their row layout.

    Args:
        plan: the merge plan (its ``vocabulary`` and ``models``).
        checkpoints: the opened models, indexed as ``plan.models``.
    """

    def __init__(self, plan: MergePlan, checkpoints: list):
        self.plan, self.checkpoints = plan, checkpoints
        self.bytes_read = 0
        self._fillers: dict[str, Filler] = {}  # the last tensors' shared rows (a few rows each)

    def read(self, task: TensorTask, rows: tuple[int, int] | None, dtype: torch.dtype | None) -> list:
        """The task's tensors, base first then the inputs, rows [start, stop) of the output's order
        (all rows when None), in ``dtype`` (None: as stored)."""
        sources = [task.base, *task.inputs]
        by_model = {self.plan.models[s.model]: s for s in sources}
        layout = self.plan.vocabulary.layout(tuple(by_model))

        def stored(model: str, ids: torch.Tensor) -> torch.Tensor:  # as stored (often a view of the file)
            source = by_model[model]
            return self._gather(self.checkpoints[source.model], source.name, ids)

        def fetch(model: str, ids: torch.Tensor) -> torch.Tensor:  # in the compute dtype
            values = stored(model, ids)
            return values if dtype is None else values.to(dtype)

        filler = self._fillers.get(task.name)
        if filler is None:
            self._check_rows(task, layout, by_model)
            filler = layout.prepare(fetch)
            if len(self._fillers) >= 2:  # keep the last two: a chunked tensor and its pre-pass
                self._fillers.pop(next(iter(self._fillers)))
            self._fillers[task.name] = filler
        start, stop = rows if rows is not None else (0, task.shape[0])
        pieces = {m: layout.assemble(m, start, stop, stored, filler) for m in by_model}
        return [pieces[self.plan.models[s.model]] for s in sources]

    def _check_rows(self, task: TensorTask, layout: RowLayout, by_model: dict) -> None:
        for model, source in by_model.items():
            have = self.checkpoints[source.model].info(source.name).shape[0]
            need = layout.needs_rows(model)
            if have < need:
                raise TokenizerError(
                    f"{model}: tensor {source.name!r} has {have} rows, but its tokenizer gives a merged "
                    f"token id {need - 1}"
                )

    def _gather(self, checkpoint, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of a stored tensor, reading runs of nearby rows."""
        if ids.numel() == 0:
            info = checkpoint.info(name)
            return torch.empty((0, *info.shape[1:]), dtype=info.dtype)
        unique, back = torch.unique(ids, sorted=True, return_inverse=True)
        breaks = ((unique[1:] - unique[:-1]) > RUN_GAP).nonzero().squeeze(1) + 1
        bounds = [0, *breaks.tolist(), unique.numel()]
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            first, last = int(unique[lo]), int(unique[hi - 1])
            run = checkpoint.read(name, (first, last + 1))
            self.bytes_read += run.numel() * run.element_size()
            parts.append(run if last - first + 1 == hi - lo else run.index_select(0, unique[lo:hi] - first))
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        if unique.numel() == ids.numel() and bool((unique == ids).all()):
            return values
        return values.index_select(0, back)
