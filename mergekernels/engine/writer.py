"""Output in HF layout, written so that nothing half-written can look complete.

Everything goes into ``OUT_DIR.partial`` first. Each shard is written to a ``.tmp`` name, fsynced
and renamed, so a shard file with its final name is always whole; the plan (``.plan.json``: the
fingerprint of the inputs and config, and the shard layout) lets ``resume`` skip finished shards.
The index JSON is written last, then the partial directory is renamed to ``OUT_DIR``: an
``OUT_DIR`` exists only when the merge finished. A killed writer can leave temporary files behind
(ours and safetensors' own ``.tmpXXXXXX``); they are removed on resume and before publishing, so the
output holds exactly the planned files. A merge holds a lock beside the partial directory while it
runs (:mod:`.guard`); SIGINT / SIGTERM wait out the rename that publishes it (:mod:`.signals`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..cachedir import umask
from .signals import deferred_signals

PLAN_FILE = ".plan.json"
INDEX_FILE = "model.safetensors.index.json"


class OutputError(RuntimeError):
    """The output cannot be written as asked; the message names the path."""


class OutputWarning(UserWarning):
    """The output may not be written as asked (the disk looks too small for it)."""


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    names: tuple[str, ...]
    nbytes: int
    filename: str
    sizes: tuple[int, ...]  # bytes of each tensor, in the order of names


def plan_shards(entries: list[tuple[str, int]], shard_size: int) -> list[Shard]:
    """Greedy split of (name, bytes) in the given order into shards of at most shard_size bytes (a
    larger tensor gets a shard of its own); file names follow HF's model-0000i-of-0000N pattern."""
    groups: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    size = 0
    for name, nbytes in entries:
        if current and size + nbytes > shard_size:
            groups.append(current)
            current, size = [], 0
        current.append((name, nbytes))
        size += nbytes
    if current or not groups:
        groups.append(current)
    total = len(groups)
    return [
        Shard(
            i,
            tuple(n for n, _ in g),
            sum(b for _, b in g),
            f"model-{i + 1:05d}-of-{total:05d}.safetensors",
            tuple(b for _, b in g),
        )
        for i, g in enumerate(groups)
    ]


def partial_progress(partial: Path) -> tuple[int, int] | None:
    """(finished shards, planned shards) of a partial directory, from its plan; None when it has no
    readable plan (nothing written yet, or a publish under way)."""
    try:
        shards = [name for name, _ in json.loads((partial / PLAN_FILE).read_text())["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sum((partial / name).is_file() for name in shards), len(shards)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**8 else f"{nbytes / 1e6:.2f} MB"


def _free_bytes(path: Path) -> int:
    """Free bytes where path lives (its nearest existing ancestor)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _os_error(exc: OSError | SafetensorError) -> OSError:
    """safetensors reports its writes' I/O errors as SafetensorError("... (os error N)"): the OSError."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"\(os error (\d+)\)", str(exc))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code))


def _disk_error(path: Path, exc: OSError, remaining: int | None = None) -> OutputError:
    """An OSError while writing as an OutputError naming the path; a full disk also says how much
    of the output is left to write (``remaining`` bytes) against the space free now."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        need = "" if remaining is None else (
            f"; the rest of the output needs about {_size(remaining)}, {_size(_free_bytes(path))} is free"
        )  # fmt: skip
        return OutputError(
            f"{path}: the disk is full ({exc.strerror}){need}; finished shards are kept in the partial "
            "directory, free space and run again with --resume"
        )
    return OutputError(f"{path}: cannot be written ({exc})")


class CheckpointWriter:
    """Writes the planned shards, then the index and side files, and publishes OUT_DIR at the end."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shards: list[Shard],
        fingerprint: dict,
        *,
        overwrite: bool,
        resume: bool,
        attach: bool = False,
    ):
        self.out_dir = Path(out_dir)
        self.partial = self.out_dir.with_name(self.out_dir.name + ".partial")
        self.shards = shards
        self.overwrite = overwrite
        self._umask = umask()
        plan = {"fingerprint": fingerprint, "shards": [[s.filename, list(s.names)] for s in shards]}
        if self.out_dir.exists() and not overwrite:
            raise OutputError(f"{self.out_dir}: already exists; pass --overwrite to replace it")
        plan_path = self.partial / PLAN_FILE
        if attach:  # another rank (rank 0) created or validated the partial directory
            if not plan_path.exists() or json.loads(plan_path.read_text()) != plan:
                raise OutputError(
                    f"{self.partial}: the ranks disagree on the plan (inputs, config or shards)"
                )
        elif resume and plan_path.exists():
            try:
                previous = json.loads(plan_path.read_text())
            except json.JSONDecodeError:
                previous = None
            if previous != plan:
                raise OutputError(
                    f"{self.partial}: was started with other inputs, config or shard layout; "
                    "run without --resume to start over"
                )
            self._remove_strays({PLAN_FILE, *(s.filename for s in shards)})
        else:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            try:
                self.partial.mkdir(parents=True)
                self._atomic_write(plan_path, json.dumps(plan, indent=1).encode())
            except OSError as exc:
                raise _disk_error(self.partial, exc) from exc

    def _remove_strays(self, keep: set[str]) -> None:
        """Delete what a killed run left in the partial directory besides the planned files
        (half-written temporaries); the directory holds nothing else of ours."""
        for entry in self.partial.iterdir():
            if entry.name not in keep:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def done(self, shard: Shard) -> bool:
        """Whether the shard was finished by this run or an earlier one (its final name exists)."""
        return (self.partial / shard.filename).exists()

    def remaining_bytes(self) -> int:
        """Tensor bytes of the planned shards not written yet (headers and side files are small)."""
        return sum(s.nbytes for s in self.shards if not self.done(s))

    def warn_if_short_of_space(self) -> None:
        """Warn up front when the output will not fit on its disk: the merge would stop part-way."""
        remaining, free = self.remaining_bytes(), _free_bytes(self.partial)
        if remaining > free:
            warnings.warn(
                f"{self.partial}: the output needs about {_size(remaining)} more, but {_size(free)} is "
                "free there; the merge will stop when the disk is full (finished shards are kept "
                "for --resume)",
                OutputWarning,
                stacklevel=2,
            )

    def write_shard(self, shard: Shard, tensors: dict[str, torch.Tensor]) -> None:
        final = self.partial / shard.filename
        tmp = final.with_name(final.name + ".tmp")
        ordered = {name: tensors[name].contiguous() for name in shard.names}
        try:
            save_file(ordered, str(tmp), metadata={"format": "pt"})
            # safetensors writes through a private temporary file (mode 0600); give the shard the
            # permissions any other file created here gets
            os.chmod(tmp, 0o666 & ~self._umask)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.partial)
        except (OSError, SafetensorError) as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_error(final, _os_error(exc), self.remaining_bytes()) from exc

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def discard(self) -> None:
        """Remove the partial directory (shards that must not be resumed)."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def finish(self, side_files: dict[str, bytes], total_size: int) -> None:
        """Side files (config.json, tokenizer, the merge config), the index last, then publish."""
        weight_map = {name: s.filename for s in self.shards for name in s.names}
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        try:
            for name, data in side_files.items():  # a name may hold a folder (chat_templates/x.jinja)
                (self.partial / name).parent.mkdir(parents=True, exist_ok=True)
                self._atomic_write(self.partial / name, data)
            self._atomic_write(self.partial / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
            tops = {Path(name).parts[0] for name in side_files}
            self._remove_strays({INDEX_FILE, PLAN_FILE, *tops, *(s.filename for s in self.shards)})
        except OSError as exc:
            raise _disk_error(self.partial, exc) from exc
        old = self.out_dir.with_name(self.out_dir.name + ".old")
        if self.out_dir.exists() and old.exists():
            shutil.rmtree(old)
        # SIGINT / SIGTERM wait for the end of this section: without its plan the partial directory
        # no longer resumes, so a signal finds either it whole (with its plan) or OUT_DIR published
        # (and an output it replaced deleted: unlinking a model's few files takes milliseconds)
        with deferred_signals():
            try:
                (self.partial / PLAN_FILE).unlink()
                _fsync_dir(self.partial)
            except OSError as exc:
                raise _disk_error(self.partial, exc) from exc
            replaced = self.out_dir.exists()
            if replaced:  # overwrite: move the old output aside, publish, then delete it
                os.replace(self.out_dir, old)
            os.replace(self.partial, self.out_dir)
            _fsync_dir(self.out_dir.parent)
            if replaced:
                shutil.rmtree(old)
