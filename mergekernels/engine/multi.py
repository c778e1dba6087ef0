"""Multi-document configurations (mergekit-multi): several merges in one YAML file, run in order.

Each document is a merge configuration with a ``name``, except possibly the last: the final merge.
A named document is merged into ``OUT_DIR.parts/<name>`` while the run goes on, and a later
document may use its name as a model reference (``model: <name>``, also ``<name>+lora``). The
final document (the unnamed one, else the last) is merged into ``OUT_DIR``; then the intermediate
merges move to ``OUT_DIR/<name>``. An intermediate merge already finished by an earlier run of the
same document is kept (its ``merge_config.yml`` must match) unless an earlier document was redone
or ``overwrite`` is given, so a re-run after a failure resumes where it stopped. Changed input
files are not detected there: give ``overwrite`` (``--overwrite``) after changing them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..config import load_config

PARTS_SUFFIX = ".parts"


def _fail(path: Path, message: str) -> None:
    raise ValueError(f"{path}: {message}")


def plan_documents(path: Path, documents: list[Any]) -> list[tuple[str | None, dict]]:
    """(name, configuration without its name) per document, in order, the final one last.

    Raises:
        ValueError: naming the file and the document, for a document that is not a mapping, a
            missing or repeated name, an unnamed document that is not the last.
    """
    out: list[tuple[str | None, dict]] = []
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            _fail(
                path, f"document {i + 1} must be a mapping (a merge configuration), got {type(doc).__name__}"
            )
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None and (
            not isinstance(name, str) or not name or "/" in name or name.startswith(".")
        ):
            _fail(path, f"document {i + 1}: name must be a plain directory name, got {name!r}")
        if name is None and i != len(documents) - 1:
            _fail(
                path, f"document {i + 1} has no name; only the last document (the final merge) may be unnamed"
            )
        if name is not None and name in [n for n, _ in out]:
            _fail(path, f"document {i + 1}: the name {name!r} is used twice")
        out.append((name, doc))
    return out


def _rewrite(value: Any, outputs: dict[str, str]) -> Any:
    """A model reference that names an earlier merge, replaced by that merge's directory."""
    if not isinstance(value, str):
        return value
    model, plus, lora = value.partition("+")
    if model in outputs:
        return outputs[model] + (plus + lora if plus else "")
    return value


def _with_outputs(doc: dict, outputs: dict[str, str]) -> dict:
    """The document with references to earlier merges (base_model, models, slice sources) resolved."""
    doc = dict(doc)
    if "base_model" in doc:
        doc["base_model"] = _rewrite(doc["base_model"], outputs)
    if isinstance(doc.get("models"), list):
        doc["models"] = [
            {**m, "model": _rewrite(m.get("model"), outputs)} if isinstance(m, dict) else _rewrite(m, outputs)
            for m in doc["models"]
        ]
    if isinstance(doc.get("modules"), dict):
        doc["modules"] = {
            prefix: _with_outputs(spec, outputs) if isinstance(spec, dict) else spec
            for prefix, spec in doc["modules"].items()
        }
    if isinstance(doc.get("slices"), list):
        slices = []
        for sl in doc["slices"]:
            if isinstance(sl, dict):
                sl = dict(sl)
                if "base_model" in sl:
                    sl["base_model"] = _rewrite(sl["base_model"], outputs)
                if isinstance(sl.get("sources"), list):
                    sl["sources"] = [
                        {**s, "model": _rewrite(s.get("model"), outputs)} if isinstance(s, dict) else s
                        for s in sl["sources"]
                    ]
            slices.append(sl)
        doc["slices"] = slices
    return doc


def merge_documents(
    path: Path, documents: list[Any], out_dir: str | os.PathLike, merge: Callable[..., Any], **kwargs
):
    """Runs every document of a multi-document configuration; returns the final merge's report.

    Args:
        path: the configuration file (relative paths in it are resolved against its directory).
        documents: its YAML documents.
        out_dir: where the final merge goes; intermediate merges end up in ``out_dir/<name>``.
        merge: :func:`mergekernels.engine.merge_checkpoints` (given each document's configuration).
        kwargs: merge_checkpoints' options, for every merge (``overwrite`` and ``resume`` apply to the
            final merge; intermediates are kept when finished, redone otherwise).
    """
    out_dir = Path(out_dir)
    plan = plan_documents(path, documents)
    parts = Path(str(out_dir) + PARTS_SUFFIX)
    root = path.resolve().parent
    strict = kwargs.pop("strict", False)
    outputs: dict[str, str] = {}
    report = None
    # Once one intermediate merge is redone, every later one is too: it may read the redone one.
    redo = bool(kwargs.get("overwrite"))
    for i, (name, doc) in enumerate(plan):
        final = i == len(plan) - 1
        label = f"{path} (document {i + 1}{f', {name!r}' if name else ''})"
        cfg = load_config(_with_outputs(doc, outputs), strict=strict, root=root, label=label)
        if final:
            report = merge(cfg, out_dir, **kwargs)
            break
        target = (parts / name).resolve()
        outputs[name] = str(target)
        if not redo and _finished(target, cfg.source):
            continue
        redo = True
        merge(cfg, target, **{**kwargs, "overwrite": True, "resume": True})
    if _rank() == 0:  # the intermediates join the published output (one process moves them)
        for name in outputs:
            destination = out_dir / name
            if destination.exists():
                shutil.rmtree(destination)
            os.replace(parts / name, destination)
        if parts.exists():
            shutil.rmtree(parts)
    return report


def _rank() -> int:
    """This process's rank under torch.distributed (torchrun's RANK when the group is closed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _finished(directory: Path, source: dict) -> bool:
    """Whether an intermediate merge of this same document was published by an earlier run."""
    saved = directory / "merge_config.yml"
    if not saved.is_file():
        return False
    try:
        return yaml.safe_load(saved.read_text()) == source
    except yaml.YAMLError:
        return False


__all__ = ["merge_documents", "plan_documents"]
