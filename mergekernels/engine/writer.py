"""Output in HF layout, written so that nothing half-written can look complete.

Everything goes into ``OUT_DIR.partial`` first. Each shard is written to a ``.tmp`` name, fsynced
and renamed, so a shard file with its final name is always whole; the plan (``.plan.json``: the
fingerprint of the inputs and config, and the shard layout) lets ``resume`` skip finished shards.
The index JSON is written last, then the partial directory is renamed to ``OUT_DIR``: an
``OUT_DIR`` exists only when the merge finished. A killed writer can leave temporary files behind
(ours and safetensors' own ``.tmpXXXXXX``); they are removed on resume and before publishing, so the
output holds exactly the planned files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..cachedir import umask

PLAN_FILE = ".plan.json"
INDEX_FILE = "model.safetensors.index.json"


class OutputError(RuntimeError):
    """The output cannot be written as asked; the message names the path."""


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_error(path: Path, exc: OSError) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"{path}: the disk is full ({exc.strerror}); finished shards are kept in the partial "
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
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_error(final, exc) from exc

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

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
            (self.partial / PLAN_FILE).unlink()
            _fsync_dir(self.partial)
        except OSError as exc:
            raise _disk_error(self.partial, exc) from exc
        if self.out_dir.exists():  # overwrite: move the old output aside, publish, then delete it
            old = self.out_dir.with_name(self.out_dir.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out_dir, old)
            os.replace(self.partial, self.out_dir)
            shutil.rmtree(old)
        else:
            os.replace(self.partial, self.out_dir)
        _fsync_dir(self.out_dir.parent)
