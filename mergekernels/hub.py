"""Model references: local directories or Hugging Face hub ids (``org/name``, ``org/name@revision``).

A reference that names an existing local path is that path. Otherwise a reference of the form
``org/name`` (optionally ``@revision``: a branch, tag or commit) is a hub id, resolved through
``huggingface_hub`` into its cache, fetching only what a merge reads: the safetensors shards and
their index, ``config.json``, the generation config and the tokenizer files (pickle ``.bin``
shards only when a repository has no safetensors and pickles are allowed). With
``HF_HUB_OFFLINE=1`` the cached snapshot is used as it is; an id neither cached nor reachable is an
error naming it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What a merge reads from a repository (consolidated.safetensors: Mistral's second copy of the weights).
MODEL_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.tiktoken", "*.jinja"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json"]
IGNORE_PATTERNS = ["consolidated*", "original/*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*(@[\w.\-/]+)?$")


class ModelNotFound(ValueError):
    """A model reference is neither a local path nor a hub id that can be fetched; names it."""


def is_hub_id(reference: str) -> bool:
    """Whether a reference has the form of a hub id (``org/name`` or ``org/name@revision``)."""
    return bool(_HUB_ID.match(reference)) and not reference.startswith((".", "/", "~"))


def split_revision(reference: str) -> tuple[str, str | None]:
    """(repository id, revision or None) of ``org/name@revision``."""
    repo, _, revision = reference.partition("@")
    return repo, revision or None


def resolve(
    reference: str, *, allow_pickle: bool = False, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The local directory of a model reference, fetching a hub id's files into the hub cache.

    The configuration has already resolved local paths (relative to its own directory): a reference
    of the hub-id form that reaches this function named no existing local path.

    Raises:
        ModelNotFound: naming the reference, when it is neither a local path nor a hub id that is
            cached or can be downloaded (and why: offline, not found, revision not found, ...).
    """
    if not is_hub_id(reference):
        return Path(reference)
    repo, revision = split_revision(reference)
    path = _snapshot(reference, repo, revision, MODEL_PATTERNS, cache_dir)
    if allow_pickle and not any(path.glob("*.safetensors")):
        path = _snapshot(reference, repo, revision, MODEL_PATTERNS + PICKLE_PATTERNS, cache_dir)
    return path


def _snapshot(reference: str, repo: str, revision: str | None, patterns: list[str], cache_dir) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=patterns,
                ignore_patterns=IGNORE_PATTERNS,
                cache_dir=cache_dir,
            )
        )
    except LocalEntryNotFoundError as exc:
        raise ModelNotFound(
            f"model {reference!r}: no such local directory (relative to the configuration's), and not in "
            "the hub cache while the hub cannot be "
            f"reached (offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); "
            f"download it first or give a local directory ({type(exc).__name__})"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelNotFound(
            f"model {reference!r}: no such local directory (relative to the configuration's), and the hub "
            f"refused it: {exc}"
        ) from None


__all__ = ["ModelNotFound", "is_hub_id", "resolve", "split_revision"]
