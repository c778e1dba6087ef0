"""Tokenizer merges: the output vocabulary (:mod:`.build`), each model's rows gathered into its order
(:mod:`.rows`), the configuration's settings (:mod:`.settings`) and chat templates (:mod:`.templates`)."""

from .build import TokenizerError, Vocabulary, VocabularyWarning, build_vocabulary, tokenizer_files
from .rows import RowLayout
from .settings import RowSource, TokenizerSettings, TokenSetting, parse_chat_template, parse_tokenizer
from .templates import BUILTIN_NAMES, builtin_template, resolve_template

__all__ = [
    "BUILTIN_NAMES",
    "RowLayout",
    "RowSource",
    "TokenSetting",
    "TokenizerError",
    "TokenizerSettings",
    "Vocabulary",
    "VocabularyWarning",
    "build_vocabulary",
    "builtin_template",
    "parse_chat_template",
    "parse_tokenizer",
    "resolve_template",
    "tokenizer_files",
]
