"""Chat templates: ``chat_template: auto``, a built-in name, or a literal Jinja template.

The built-in templates (``chat_templates/<name>.jinja``) are our own text; each renders the same
conversation text as mergekit's template of that name (tests/test_chat_templates.py checks it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from importlib import resources

BUILTIN_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def builtin_template(name: str) -> str:
    """The Jinja text of a built-in template."""
    if name not in BUILTIN_NAMES:
        raise ValueError(f"unknown chat template {name!r}; built-in: {', '.join(BUILTIN_NAMES)}")
    return resources.files(__package__).joinpath("chat_templates", f"{name}.jinja").read_text()


def _default_of(template: object) -> str | None:
    """A tokenizer's template as one string: a dict of named templates gives its ``default``."""
    if isinstance(template, dict):
        template = template.get("default")
    if isinstance(template, str) and template.strip():
        return template.strip()
    return None


def most_common_template(templates: Iterable[object]) -> str | None:
    """``auto``: the template most of the models have (the first seen among equals), None if none has
    one (the output then keeps its tokenizer's own)."""
    found = [t for t in map(_default_of, templates) if t is not None]
    if not found:
        return None
    counts = Counter(found)
    best = max(counts.values())
    return next(t for t in found if counts[t] == best)


def resolve_template(setting: str, templates: Iterable[object]) -> str | None:
    """The template text for a ``chat_template`` setting; ``templates`` are the models' own (in the
    config's order), needed only for ``auto``."""
    if setting == "auto":
        return most_common_template(templates)
    if setting in BUILTIN_NAMES:
        return builtin_template(setting)
    return setting
