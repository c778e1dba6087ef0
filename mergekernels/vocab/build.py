"""The output vocabulary of a tokenizer merge, and where each model's tokens sit in it.

mergekit's rules (its ``tokenizer_source`` / ``tokenizer.source``), built with ``transformers``:

- ``base``: the base's tokenizer;
- a model: that model's tokenizer;
- ``union``: the base's tokenizer, then every token of the other models it lacks, model by model in
  the config's order: first the regular tokens (each model's in id order) as plain added tokens, then
  the added tokens with their own settings (special or not, stripping); the first model that adds a
  token decides its settings. mergekit walks the models in hash order, so its ids of new tokens can
  change from run to run; ours are fixed.

Then every ``tokenizer.tokens`` key the vocabulary lacks is added, in the file's order.

A model's tokens are its tokenizer's, limited to ids below its embedding rows (``config.json``'s
``vocab_size``, else the tokenizer's length): a tokenizer that names more tokens than the base has
rows loses the extra ones (BPE tokenizers only, as in mergekit).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .settings import TokenizerSettings

# Ids more than this far beyond a tokenizer's token count mark a corrupt file (real ones are dense).
MAX_ID_GAP = 2**16


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or merged; the message names the model and the file."""


class VocabularyWarning(UserWarning):
    """Something a tokenizer merge worked around (a token beyond a model's rows, truncated tensors)."""


@dataclass
class ModelVocabulary:
    """One model's tokens: token -> row id (ids below ``rows`` only)."""

    reference: str
    tokens: dict[str, int]
    rows: int
    template: object = None  # its tokenizer's chat template (None: none, or its tokenizer failed)


@dataclass
class Vocabulary:
    """The merged vocabulary.

    Attributes:
        tokenizer: the output tokenizer (a transformers fast tokenizer).
        tokens: output id -> token.
        size: rows of the output's vocabulary tensors (the token count rounded up to
            ``pad_to_multiple_of``).
        models: per merged model (by reference), its tokens.
        settings: the configuration's tokenizer settings.
        base: the base model's reference.
    """

    tokenizer: object
    tokens: list[str]
    size: int
    models: dict[str, ModelVocabulary]
    settings: TokenizerSettings
    base: str
    _layouts: dict = field(default_factory=dict, repr=False)

    def layout(self, models: tuple[str, ...]):
        """The :class:`mergekernels.vocab.RowLayout` of a tensor merged from these models (cached);
        TokenizerError when a configured token's row cannot come from them."""
        from .rows import RowLayout

        if models not in self._layouts:
            self._layouts[models] = RowLayout(self, models)
        return self._layouts[models]

    def files(self, chat_template: str | None = None) -> dict[str, bytes]:
        """The output tokenizer's files as transformers saves them (``tokenizer.json``,
        ``tokenizer_config.json``, ``chat_template.jinja`` ...), with ``chat_template`` set when given."""
        return tokenizer_files(
            self.tokenizer, chat_template, f"{self.base}: the tokenizer merged from its cannot be saved"
        )


def tokenizer_files(
    tokenizer, chat_template: str | None = None, what: str = "the output tokenizer cannot be saved"
) -> dict[str, bytes]:
    """A tokenizer saved with ``save_pretrained`` into a scratch directory: relative name -> bytes
    (a TokenizerError ``what: ...`` when transformers cannot save it)."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    with tempfile.TemporaryDirectory(prefix="mergekernels-tokenizer-") as tmp:
        with _malformed(what):
            tokenizer.save_pretrained(tmp)
        root = Path(tmp)
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_tokenizer(directory: Path, reference: str, trust_remote_code: bool = False):
    """A model's fast tokenizer; TokenizerError naming the model when it has none or it is unreadable."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency of tokenizer merges
        raise TokenizerError(
            "tokenizer merges need transformers: pip install 'mergekernels[tokenizers]'"
        ) from exc
    if not directory.is_dir() or not any(
        (directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        raise TokenizerError(
            f"{reference}: no tokenizer files (tokenizer.json, tokenizer_config.json) in {directory}"
        )
    with _malformed(
        f"{reference}: cannot load its tokenizer from {directory}", lambda: _config_problem(directory)
    ):
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(f"{reference}: its tokenizer has no tokenizer.json (a fast tokenizer is needed)")
    vocab = tokenizer.get_vocab()
    token, largest = max(vocab.items(), key=lambda item: item[1], default=("", 0))
    if largest >= len(vocab) + MAX_ID_GAP:
        # tokenizers saves a BPE vocabulary by walking every id up to the largest (one entry per
        # hole): a corrupt id of 2**31 would take minutes and gigabytes when the merge saves it
        raise TokenizerError(
            f"{reference}: its tokenizer ({directory}) gives {token!r} id {largest}, far beyond its "
            f"{len(vocab)} tokens"
        )
    return tokenizer


def _is_rust_panic(exc: BaseException) -> bool:
    """A panic inside tokenizers' Rust code on a malformed file: pyo3 raises it as a PanicException,
    a BaseException (not an Exception), which has no importable class."""
    return type(exc).__name__ == "PanicException"


def _config_problem(directory: Path) -> str:
    """A note that the model's config.json does not load either, when so: AutoTokenizer reads it too,
    and its errors name a field but not the file."""
    if not (directory / "config.json").is_file():
        return ""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # noqa: BLE001 - as in _malformed: any failure means "unreadable"
        return (
            f" ({directory / 'config.json'}, which it reads too, does not load either: {type(exc).__name__})"
        )
    return ""


def config_rows(directory: Path) -> int | None:
    """A model's vocabulary rows as its ``config.json`` gives them (``vocab_size``, or
    ``text_config.vocab_size`` for multimodal configs); None when it gives none."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict) and holder.get("vocab_size") is not None:
            rows = holder["vocab_size"]
            # the rows decide which tokens a model has: a bool, zero or negative count is no count
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
                raise TokenizerError(
                    f"{directory / 'config.json'}: vocab_size must be a positive integer, got {rows!r:.40}"
                )
            return rows
    return None


def _model_vocabulary(reference: str, tokenizer, rows: int | None) -> ModelVocabulary:
    vocab = tokenizer.get_vocab()
    rows = rows if rows is not None else len(vocab)
    kept = {}
    for token, index in vocab.items():
        if index < rows:
            kept[token] = index
        else:
            warnings.warn(
                f"{reference}: token {token!r} has id {index}, beyond the model's {rows} rows; "
                "it counts as missing from that model",
                VocabularyWarning,
                stacklevel=3,
            )
    return ModelVocabulary(reference, kept, rows, getattr(tokenizer, "chat_template", None))


def _reload(tokenizer, edit=None, reference: str = "the base model"):
    """A copy of a tokenizer through save / load (transformers has no deep copy of a fast tokenizer);
    ``edit(directory)`` may change the saved files first. A malformed tokenizer can load and still
    fail here (a merge naming a token its vocabulary lacks): a TokenizerError naming ``reference``."""
    from transformers import AutoTokenizer

    what = f"{reference}: its tokenizer cannot be saved and loaded again"
    with tempfile.TemporaryDirectory(prefix="mergekernels-tokenizer-") as tmp:
        with _malformed(what):
            tokenizer.save_pretrained(tmp)
        if edit is not None:
            edit(Path(tmp))
        with _malformed(what):
            return AutoTokenizer.from_pretrained(tmp)


@contextlib.contextmanager
def _malformed(what: str, note: Callable[[], str] = lambda: ""):
    """transformers' and tokenizers' errors on a malformed tokenizer as a TokenizerError ``what: ...``
    (they raise many kinds, all meaning "malformed", and a panic in tokenizers' Rust code is not an
    Exception); ``note()`` adds what else is known about an exception's cause."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise TokenizerError(f"{what}: {type(exc).__name__}: {exc}{note()}") from None
    except BaseException as exc:
        if not _is_rust_panic(exc):
            raise
        raise TokenizerError(f"{what}: tokenizers failed on its files ({exc})") from None


def strip_tokenizer(tokenizer, rows: int, reference: str):
    """The tokenizer without the tokens whose ids are at or beyond ``rows`` (a tokenizer naming more
    tokens than its model has rows); BPE only."""
    vocab = tokenizer.get_vocab()
    unused = {token for token, index in vocab.items() if index >= rows}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = data.get("model", {}).get("type")
    if kind != "BPE":
        raise TokenizerError(
            f"{reference}: its tokenizer names {len(unused)} token(s) beyond the model's {rows} rows, "
            f"and only BPE tokenizers can be trimmed (this one is {kind})"
        )

    def keep(merge) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not (set(parts) & unused or "".join(parts) in unused)

    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if i < rows}
    data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < rows]

    def content(entry) -> object:
        return entry.get("content") if isinstance(entry, dict) else entry

    def edit(directory: Path) -> None:
        (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            config_file = directory / name
            if not config_file.is_file():
                continue
            config = json.loads(config_file.read_text())
            decoder = config.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < rows}
            for key in ("extra_special_tokens", "additional_special_tokens"):  # loading re-adds these
                if isinstance(config.get(key), list):
                    config[key] = [t for t in config[key] if content(t) not in unused]
            config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2))

    return _reload(tokenizer, edit, reference)


def union_tokenizer(base, others: list[tuple[object, ModelVocabulary]], reference: str = "the base model"):
    """The base's tokenizer with every other model's tokens it lacks (see the module docstring)."""
    from tokenizers import AddedToken

    regular: dict[str, None] = {}
    added: dict[str, AddedToken] = {}
    for tokenizer, vocab in others:
        decoder = tokenizer.added_tokens_decoder
        for token, index in sorted(vocab.tokens.items(), key=lambda item: item[1]):
            if index in decoder:
                first = added.setdefault(decoder[index].content, decoder[index])
                if _settings(first) != _settings(decoder[index]):
                    warnings.warn(
                        f"{vocab.reference}: added token {token!r} has other settings than in an earlier "
                        "model; the first model's are kept",
                        VocabularyWarning,
                        stacklevel=3,
                    )
            else:
                regular.setdefault(token)
    out = _reload(base, reference=reference)
    have = out.get_vocab()
    out.add_tokens([t for t in regular if t not in have])
    have = out.get_vocab()
    for token in added.values():
        if token.content not in have:
            out.add_tokens([token], special_tokens=token.special)
    return out


def _settings(token) -> tuple:
    return (token.special, token.lstrip, token.rstrip, token.single_word, token.normalized)


def build_vocabulary(
    settings: TokenizerSettings,
    base: str,
    directories: dict[str, Path],
    source_directory: Path | None = None,
    trust_remote_code: bool = False,
) -> Vocabulary:
    """The output tokenizer and every merged model's tokens.

    Args:
        settings: the configuration's tokenizer settings.
        base: the base model's reference (a key of ``directories``).
        directories: per merged model (by reference, in the config's order), its local directory.
        source_directory: the directory of the model ``settings.source`` names, when that is not
            one of the merged models.

    A merged model other than the base and the source whose tokenizer cannot be loaded is taken to
    share the base's tokens, with a warning (as mergekit does); the base's and the source's must load.
    """
    base_tokenizer = load_tokenizer(directories[base], base, trust_remote_code)
    base_rows = config_rows(directories[base])
    base_tokenizer = strip_tokenizer(base_tokenizer, base_rows or len(base_tokenizer), base)
    tokenizers = {base: base_tokenizer}
    models: dict[str, ModelVocabulary] = {base: _model_vocabulary(base, base_tokenizer, base_rows)}
    for reference, directory in directories.items():
        if reference in models:
            continue
        rows = config_rows(directory)
        try:
            tokenizers[reference] = load_tokenizer(directory, reference, trust_remote_code)
        except TokenizerError as exc:
            if reference == settings.source_model:
                raise
            warnings.warn(f"{exc}; its tokens are taken to be the base's", VocabularyWarning, stacklevel=2)
            models[reference] = ModelVocabulary(
                reference, dict(models[base].tokens), rows or models[base].rows
            )
            continue
        models[reference] = _model_vocabulary(reference, tokenizers[reference], rows)

    if settings.source == "base":
        out = _reload(base_tokenizer, reference=base)
    elif settings.source == "union":
        others = [(tokenizers[m], models[m]) for m in models if m in tokenizers]
        out = union_tokenizer(base_tokenizer, others, reference=base)
    else:
        directory = directories.get(settings.source, source_directory)
        # a copy, as in the other cases: one that cannot be saved fails here, not after the merge
        out = _reload(
            load_tokenizer(directory, settings.source, trust_remote_code), reference=settings.source
        )
    have = out.get_vocab()
    out.add_tokens([t for t in settings.tokens if t not in have])
    return _finish(out, models, settings, base)


def _finish(out, models: dict[str, ModelVocabulary], settings: TokenizerSettings, base: str) -> Vocabulary:
    vocab = out.get_vocab()
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        if index >= len(tokens):
            raise TokenizerError(
                f"the output tokenizer has {len(vocab)} tokens but gives {token!r} id {index}: its ids "
                "have gaps, so it cannot index embedding rows"
            )
        tokens[index] = token
    size = len(tokens)
    multiple = settings.pad_to_multiple_of
    if multiple and size % multiple:
        size += multiple - size % multiple
    return Vocabulary(out, tokens, size, models, settings, base)


def chat_template_files(setting: str, base: str, directories: dict[str, Path]) -> dict[str, bytes] | None:
    """The base's tokenizer with a ``chat_template`` setting applied (no tokenizer merge), as saved
    files; None for ``auto`` when no model has a template (the base's files are then copied)."""
    from .templates import resolve_template

    templates = []
    if setting == "auto":
        for reference, directory in directories.items():
            try:
                templates.append(getattr(load_tokenizer(directory, reference), "chat_template", None))
            except TokenizerError as exc:
                warnings.warn(f"chat_template auto: {exc}", VocabularyWarning, stacklevel=2)
    template = resolve_template(setting, templates)
    if template is None:
        return None
    return tokenizer_files(
        load_tokenizer(directories[base], base), template, f"{base}: its tokenizer cannot be saved"
    )
