"""The tokenizer settings of a merge configuration, mergekit's language.

- ``tokenizer_source: base | union | <model>``: the output's vocabulary is the base's, the union of
  every model's, or one model's;
- ``tokenizer:`` the same choice as ``source`` (default ``union``), plus ``tokens`` (where the row of a
  token comes from, optionally ``force``-d onto every model) and ``pad_to_multiple_of``;
- ``chat_template``: ``auto``, a built-in name (:data:`mergekernels.vocab.templates.BUILTIN_NAMES`)
  or a literal Jinja template.

A token's row source is a model (that model's row for the same token), ``{kind: zero}``, or
``{kind: model_token, model: M, token: T}`` / ``{..., token_id: N}`` (M's row of another token).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

SOURCES = ("base", "union")


@dataclass(frozen=True)
class RowSource:
    """Where a token's row comes from.

    Attributes:
        kind: ``"model"`` (the model's row for the same token), ``"model_token"`` (the model's row of
            ``token`` or of id ``token_id``) or ``"zero"``.
        model: the model's reference, resolved as the config's model paths are (None for zero).
    """

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None

    def describe(self) -> str:
        if self.kind == "zero":
            return "zero"
        if self.kind == "model":
            return str(self.model)
        other = repr(self.token) if self.token is not None else f"id {self.token_id}"
        return f"{self.model}'s token {other}"


@dataclass(frozen=True)
class TokenSetting:
    """One entry of ``tokenizer.tokens``: the token's row source, and whether it replaces the row in
    every model (``force``) or only fills it in models that lack the token."""

    source: RowSource
    force: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    """The output vocabulary: ``source`` is ``"base"``, ``"union"`` or a model reference."""

    source: str
    tokens: dict[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    @property
    def source_model(self) -> str | None:
        """The model whose tokenizer is the output's (None for base and union)."""
        return None if self.source in SOURCES else self.source


Fail = Callable[[str], NoReturn]
Resolve = Callable[[str], str]


def parse_tokenizer(data: dict, resolve: Resolve, fail: Fail) -> TokenizerSettings | None:
    """``tokenizer_source`` or the ``tokenizer`` block of a config mapping (None: neither given)."""
    given = [key for key in ("tokenizer_source", "tokenizer") if data.get(key) is not None]
    if len(given) == 2:
        fail("give either `tokenizer_source` or a `tokenizer` block, not both (mergekit refuses both)")
    if not given:
        return None
    if given[0] == "tokenizer_source":
        return TokenizerSettings(_source(data["tokenizer_source"], "tokenizer_source", resolve, fail))
    block = data["tokenizer"]
    if not isinstance(block, dict):
        fail(f"`tokenizer` must be a mapping with source / tokens / pad_to_multiple_of, got {block!r}")
    unknown = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
    if unknown:
        listed = ", ".join(map(repr, unknown))
        fail(f"tokenizer: unknown key(s) {listed}; valid: source, tokens, pad_to_multiple_of")
    source = _source(block.get("source", "union"), "tokenizer.source", resolve, fail)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        fail(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        fail(f"tokenizer.tokens must map token strings to settings, got {tokens!r}")
    settings = {}
    for token, entry in tokens.items():
        if not isinstance(token, str) or not token:
            fail(f"tokenizer.tokens: keys must be token strings, got {token!r}")
        settings[token] = _token_setting(token, entry, resolve, fail)
    return TokenizerSettings(source, settings, pad)


def _source(value: Any, where: str, resolve: Resolve, fail: Fail) -> str:
    if not isinstance(value, str) or not value.strip():
        fail(f"{where} must be 'base', 'union' or a model path, got {value!r}")
    return value if value in SOURCES else resolve(value)


def _token_setting(token: str, entry: Any, resolve: Resolve, fail: Fail) -> TokenSetting:
    where = f"tokenizer.tokens[{token!r}]"
    if entry is None:
        entry = {}
    if not isinstance(entry, dict):
        fail(f"{where} must be a mapping with `source` and `force`, got {entry!r}")
    unknown = sorted(set(entry) - {"source", "force"})
    if unknown:
        fail(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid: source, force")
    force = entry.get("force", False)
    if not isinstance(force, bool):
        fail(f"{where}.force must be true or false, got {force!r}")
    if entry.get("source") is None:
        fail(
            f"{where} needs a `source`: a model, {{kind: zero}}, or "
            "{kind: model_token, model: M, token: T} (mergekit fails on it later, when the row is needed)"
        )
    return TokenSetting(_row_source(entry["source"], where + ".source", resolve, fail), force)


def _row_source(value: Any, where: str, resolve: Resolve, fail: Fail) -> RowSource:
    if isinstance(value, str):
        return RowSource("model", _source(value, where, resolve, fail))
    if not isinstance(value, dict):
        fail(f"{where} must be a model path or a mapping with `kind`, got {value!r}")
    kind = value.get("kind")
    if kind == "zero":
        return RowSource("zero")
    model = value.get("model")
    if kind not in ("model", "model_token") or not isinstance(model, str) or not model:
        fail(
            f"{where} must be a model path, {{kind: zero}}, or "
            f"{{kind: model_token, model: M, token: T | token_id: N}}; got {value!r}"
        )
    model = resolve(model)
    token, token_id = value.get("token"), value.get("token_id")
    if kind == "model" or (token is None and token_id is None):
        if kind == "model_token":  # mergekit reads this as the model's row of the same token
            warnings.warn(
                f"{where}: model_token without `token` or `token_id` takes {model}'s row of the same token",
                stacklevel=2,
            )
        return RowSource("model", model)
    if token is not None and token_id is not None:
        fail(f"{where}: give `token` or `token_id`, not both")
    if token is not None and (not isinstance(token, str) or not token):
        fail(f"{where}.token must be a token string, got {token!r}")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        fail(f"{where}.token_id must be a non-negative integer, got {token_id!r}")
    return RowSource("model_token", model, token, token_id)


def parse_chat_template(value: Any, fail: Fail) -> str | None:
    """``chat_template``: None, ``"auto"``, a built-in name, or a literal Jinja template."""
    from .templates import BUILTIN_NAMES

    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        fail(f"chat_template must be 'auto', a built-in name or a Jinja template, got {value!r}")
    if value == "auto" or value in BUILTIN_NAMES or "{" in value:
        return value
    fail(
        f"unknown chat_template {value!r}: give 'auto', one of the built-in names "
        f"({', '.join(BUILTIN_NAMES)}) or a Jinja template"
    )
