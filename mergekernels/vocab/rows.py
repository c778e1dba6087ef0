"""Each model's vocabulary rows gathered into the output vocabulary's order, before the merge.

For a vocabulary tensor (embeddings, LM heads: the token is axis 0) and the models merged into it,
:class:`RowLayout` says where every output row of every model comes from (mergekit's rules):

- the model's own row of that token, when it has the token and the token is not ``force``-d;
- otherwise the token's *default row*, the same for every model that lacks the token:
  a configured ``tokenizer.tokens`` source (a model's row of the token or of another token, or zero);
  else the row of the only model that has the token; else the base's row; else the plain average
  of the rows of the models that have it (zero, with a warning, when none has it);
- rows beyond the tokens (``pad_to_multiple_of``): the mean of the model's own gathered rows.

The permuted tensors are then merged by the method like any others: a token that only some models
have gets the others' default row, so a linear merge keeps that row and a task vector is zero there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .build import TokenizerError, Vocabulary, VocabularyWarning
from .settings import RowSource


@dataclass(frozen=True)
class DefaultRow:
    """A token's default row: ``zero``, ``copy`` (``model``'s row ``row``) or ``average`` (the mean of
    ``rows``, pairs of (model, row))."""

    kind: str
    model: str | None = None
    row: int | None = None
    rows: tuple[tuple[str, int], ...] = ()


class RowLayout:
    """Where each output row of each model comes from, for one set of merged models.

    Args:
        vocabulary: the merged vocabulary.
        models: the references of the models merged into the tensor (the base among them, if it is).
    """

    def __init__(self, vocabulary: Vocabulary, models: Sequence[str]):
        self.vocabulary, self.models = vocabulary, list(dict.fromkeys(models))
        tokens = vocabulary.tokens
        self.count = len(tokens)
        # per model, output id -> its own row id (-1: lacks the token, or the token is forced)
        self.own: dict[str, torch.Tensor] = {}
        for model in self.models:
            known = vocabulary.models[model].tokens
            self.own[model] = torch.tensor([known.get(t, -1) for t in tokens], dtype=torch.long)
        settings = vocabulary.settings.tokens
        self.defaults: dict[int, DefaultRow] = {}
        for index, token in enumerate(tokens):
            setting = settings.get(token)
            present = [m for m in self.models if self.own[m][index] >= 0]
            if setting is None and len(present) == len(self.models):
                continue  # every model has it: its own rows
            if setting is not None and not setting.force and len(present) == len(self.models):
                continue  # configured, but every model has it and it is not forced (mergekit ignores it)
            self.defaults[index] = self._default(token, index, present, setting.source if setting else None)
        forced = [i for i, t in enumerate(tokens) if settings.get(t) is not None and settings[t].force]
        for model in self.models:
            self.own[model][forced] = -1

    def _default(self, token: str, index: int, present: list[str], source: RowSource | None) -> DefaultRow:
        if source is not None:
            return self._configured(token, index, source)
        if len(present) == 1:
            return DefaultRow("copy", present[0], int(self.own[present[0]][index]))
        if not present:
            warnings.warn(
                f"tokenizer: token {token!r} is in none of the merged models; its row is zero",
                VocabularyWarning,
                stacklevel=4,
            )
            return DefaultRow("zero")
        base = self.vocabulary.base
        if base in present:
            return DefaultRow("copy", base, int(self.own[base][index]))
        return DefaultRow("average", rows=tuple((m, int(self.own[m][index])) for m in present))

    def _configured(self, token: str, index: int, source: RowSource) -> DefaultRow:
        where = f"tokenizer.tokens[{token!r}]"
        if source.kind == "zero":
            return DefaultRow("zero")
        if source.model not in self.models:
            raise TokenizerError(
                f"{where}: takes its row from {source.model}, which is not among the models merged into "
                f"this tensor ({', '.join(self.models)})"
            )
        known = self.vocabulary.models[source.model]
        if source.kind == "model":
            row = known.tokens.get(token)
            if row is None:
                raise TokenizerError(f"{where}: model {source.model} has no token {token!r}")
            return DefaultRow("copy", source.model, row)
        if source.token is not None:
            row = known.tokens.get(source.token)
            if row is None:
                raise TokenizerError(f"{where}: model {source.model} has no token {source.token!r}")
            return DefaultRow("copy", source.model, row)
        if source.token_id >= known.rows:
            raise TokenizerError(
                f"{where}: token_id {source.token_id} is beyond the {known.rows} rows of {source.model}"
            )
        return DefaultRow("copy", source.model, source.token_id)

    def needs_rows(self, model: str) -> int:
        """How many rows the model's vocabulary tensors must have (one past its largest merged id)."""
        own = self.own[model]
        return int(own.max()) + 1 if own.numel() else 0

    def prepare(self, fetch: Fetch) -> Filler:
        """The rows a tensor's pieces share: every default row (each model's padding row is added
        by the first piece that needs it, see :meth:`assemble`).

        Args:
            fetch: ``fetch(model, ids)`` gives the model's rows ``ids`` (a long tensor), in the
                dtype the merge computes in.
        """
        probe = next((m for m in self.models if (self.own[m] >= 0).any()), None)
        if probe is not None:
            first = self.own[probe][self.own[probe] >= 0][:1]
            sample = fetch(probe, first)[0]
        else:  # no model has any of the tokens: the rows are configured zeros / model_token rows
            copy = next((d for d in self.defaults.values() if d.kind == "copy"), None)
            if copy is None:
                raise TokenizerError("none of the merged models has any token of the output vocabulary")
            sample = fetch(copy.model, torch.tensor([copy.row]))[0]
        dtype, shape = sample.dtype, tuple(sample.shape)
        ids = sorted(self.defaults)
        rows = self._default_rows([self.defaults[i] for i in ids], fetch, dtype, shape)
        slot = torch.full((self.count,), -1, dtype=torch.long)
        slot[ids] = torch.arange(len(ids))
        return Filler(dtype, shape, rows, slot, {})

    @staticmethod
    def _default_rows(defaults: list[DefaultRow], fetch: Fetch, dtype, shape) -> torch.Tensor:
        """The default rows in order, each model's needed rows fetched at once."""
        needed: dict[str, set[int]] = {}
        for d in defaults:
            pairs = ((d.model, d.row),) if d.kind == "copy" else d.rows
            for model, row in pairs:
                needed.setdefault(model, set()).add(row)
        fetched = {}
        for model, wanted in needed.items():
            order = sorted(wanted)
            values = fetch(model, torch.tensor(order, dtype=torch.long))
            fetched.update({(model, row): values[k] for k, row in enumerate(order)})
        out = torch.zeros((len(defaults), *shape), dtype=dtype)
        for k, d in enumerate(defaults):
            if d.kind == "copy":
                out[k] = fetched[(d.model, d.row)]
            elif d.kind == "average":  # in the models' order, in the compute dtype, as mergekit sums
                total = torch.zeros(shape, dtype=dtype)
                for pair in d.rows:
                    total = total + fetched[pair]
                out[k] = total / len(d.rows)
        return out

    def assemble(self, model: str, start: int, stop: int, fetch: Fetch, filler: Filler) -> torch.Tensor:
        """Output rows [start, stop) of one model: its own rows, default rows, padding rows, in the
        filler's dtype (``fetch`` may give the model's rows in another: they are converted)."""
        out = torch.empty((stop - start, *filler.shape), dtype=filler.dtype)
        self._token_rows(out, model, start, min(stop, self.count), fetch, filler)
        if stop > self.count:
            if model not in filler.pad:  # a piece from row 0 holds the rows it averages already
                whole = out[: self.count] if start == 0 else None
                filler.pad[model] = self._padding_row(model, fetch, filler, whole)
            out[max(start, self.count) - start :] = filler.pad[model]
        return out

    def _token_rows(self, out, model: str, start: int, end: int, fetch: Fetch, filler: Filler) -> None:
        """out[: end - start] = the model's rows of output ids [start, end)."""
        if start >= end:
            return
        ids = self.own[model][start:end]
        have = (ids >= 0).nonzero().squeeze(1)
        if have.numel():
            self._copy_own(out, have, ids[have], lambda rows: fetch(model, rows))
        lacking = (ids < 0).nonzero().squeeze(1)
        if lacking.numel():
            out[lacking] = filler.rows[filler.slot[start + lacking]]

    def _padding_row(self, model: str, fetch: Fetch, filler: Filler, whole: torch.Tensor | None):
        """The mean of the model's rows of every token: blocks summed in float32, their sums in float64,
        in the
        same blocks whether they come from ``whole`` or are gathered here, so every chunking gives
        the same bits."""
        total = torch.zeros(filler.shape, dtype=torch.float64)
        step = PAD_BLOCK_ROWS
        for b in range(0, self.count, step):
            if whole is not None:
                block = whole[b : b + step]
            else:
                block = torch.empty((min(step, self.count - b), *filler.shape), dtype=filler.dtype)
                self._token_rows(block, model, b, b + block.shape[0], fetch, filler)
            total += block.sum(dim=0, dtype=torch.float32).double()  # float32 within a block: 15x faster
        return (total / max(self.count, 1)).to(filler.dtype)

    @staticmethod
    def _copy_own(out: torch.Tensor, at: torch.Tensor, rows: torch.Tensor, fetch) -> None:
        """out[at] = the model's rows ``rows``: run by run as slice copies (converting the dtype on
        the way) when both go up by one, as tokens that keep their ids do; else one gather."""
        step = ((at[1:] - at[:-1]) != 1) | ((rows[1:] - rows[:-1]) != 1)
        breaks = step.nonzero().squeeze(1) + 1
        if breaks.numel() > 64:
            out.index_copy_(0, at, fetch(rows).to(out.dtype))
            return
        bounds = [0, *breaks.tolist(), at.numel()]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            first = int(at[lo])
            out[first : first + hi - lo] = fetch(rows[lo:hi])

    def permute(self, tensors: dict[str, torch.Tensor], name: str = "tensor") -> dict[str, torch.Tensor]:
        """Each model's whole tensor (vocabulary on axis 0) in the output's order, in memory:
        ``vocabulary.size`` rows each. Raises TokenizerError naming the tensor when a model's tensor
        has fewer rows than its tokens need."""
        for model in self.models:
            if tensors[model].shape[0] < self.needs_rows(model):
                raise TokenizerError(
                    f"{model}: tensor {name!r} has {tensors[model].shape[0]} rows, but its tokenizer gives "
                    f"a merged token id {self.needs_rows(model) - 1}"
                )

        def fetch(model: str, ids: torch.Tensor) -> torch.Tensor:
            return tensors[model].index_select(0, ids)

        filler = self.prepare(fetch)
        return {m: self.assemble(m, 0, self.vocabulary.size, fetch, filler) for m in self.models}


Fetch = Callable[[str, torch.Tensor], torch.Tensor]
# Rows summed at a time (in float32) for a padding row; fixed, so that any chunking gives its bits.
PAD_BLOCK_ROWS = 1024


@dataclass
class Filler:
    """What every piece of a vocabulary tensor shares (:meth:`RowLayout.prepare`): the default rows
    (``rows[slot[i]]`` for output id i; slot -1: none), and each model's padding row once a piece
    has needed it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    rows: torch.Tensor
    slot: torch.Tensor
    pad: dict[str, torch.Tensor]
