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
from collections.abc import Sequence
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

    def permute(self, tensors: dict[str, torch.Tensor], name: str = "tensor") -> dict[str, torch.Tensor]:
        """Each model's tensor (vocabulary on axis 0) in the output's order, ``vocabulary.size`` rows.

        ``tensors`` is emptied as it goes, so at most one original and one permuted copy are alive
        beyond the results. Raises TokenizerError naming the tensor when a model's tensor has fewer
        rows than its tokens need."""
        for model in self.models:
            need = int(self.own[model].max()) + 1 if self.count else 0
            if tensors[model].shape[0] < need:
                raise TokenizerError(
                    f"{model}: tensor {name!r} has {tensors[model].shape[0]} rows, but its tokenizer gives "
                    f"a merged token id {need - 1}"
                )
        dtype = tensors[self.models[0]].dtype
        for t in tensors.values():
            dtype = torch.promote_types(dtype, t.dtype)
        defaults = {i: self._default_row(d, tensors, dtype) for i, d in self.defaults.items()}
        filler = sorted(defaults)
        fill_rows = torch.stack([defaults[i] for i in filler]) if filler else None
        out = {}
        for model in self.models:
            x = tensors.pop(model)
            own = self.own[model]
            have = (own >= 0).nonzero().squeeze(1)
            rows = torch.zeros((self.vocabulary.size, *x.shape[1:]), dtype=dtype)
            rows.index_copy_(0, have, x.index_select(0, own[have]).to(dtype))
            del x
            if filler:
                lacking = [k for k, i in enumerate(filler) if own[i] < 0]
                rows.index_copy_(0, torch.tensor(filler)[lacking], fill_rows[lacking])
            if self.vocabulary.size > self.count:
                rows[self.count :] = rows[: self.count].mean(dim=0)
            out[model] = rows
        return out

    @staticmethod
    def _default_row(
        default: DefaultRow, tensors: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        shape = next(iter(tensors.values())).shape[1:]
        if default.kind == "zero":
            return torch.zeros(shape, dtype=dtype)
        if default.kind == "copy":
            return tensors[default.model][default.row].to(dtype)
        total = torch.zeros(shape, dtype=dtype)
        for model, row in default.rows:  # in the models' order, in the tensors' dtype, as mergekit sums
            total = total + tensors[model][row].to(dtype)
        return total / len(default.rows)
