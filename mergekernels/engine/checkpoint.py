"""Lazy reads of checkpoints on disk.

Accepted layouts: an HF-style directory with sharded ``*.safetensors`` and
``model.safetensors.index.json``, a directory with one ``model.safetensors``, a bare
``.safetensors`` file, and -- only when the caller passes ``allow_pickle=True`` -- pickle ``.bin``
checkpoints (``pytorch_model.bin``, its index, or a bare file), loaded with
``torch.load(weights_only=True, mmap=True)``. Safetensors reads go through ``safe_open``: only the
header is read up front, and tensors (or row ranges of them) are handed out as views of the file's
private map when asked for: nothing is copied, and the pages are read when a kernel touches them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read as asked; the message names the file and, where known, the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _inside(directory: Path, relative: str, index: Path) -> Path:
    """The file an index names, which must lie inside the index's directory."""
    candidate = Path(relative)
    resolved = (directory / candidate).resolve()
    if candidate.is_absolute() or directory.resolve() not in resolved.parents:
        raise CheckpointError(f"{index}: points outside its directory ({relative!r})")
    return resolved


class Checkpoint:
    """One model on disk: tensor names in file order, their shapes and dtypes, lazy reads."""

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self.files, self.index_file = self._resolve()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self._scan(file)

    # -- layout ----------------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def _resolve(self) -> tuple[list[Path], Path | None]:
        p = self.path
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")
        if p.is_file():
            if p.suffix == ".safetensors":
                return [p], None
            if p.suffix in (".bin", ".pt", ".pth"):
                self._check_pickle(p)
                return [p], None
            raise CheckpointError(f"{p}: not a .safetensors file (pickle .bin needs allow_pickle)")
        for index_name, pickled in ((SAFETENSORS_INDEX, False), (PICKLE_INDEX, True)):
            index = p / index_name
            if index.exists():
                if pickled:
                    self._check_pickle(index)
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CheckpointError(f"{index}: not a valid index ({exc})") from exc
                files = []
                for relative in dict.fromkeys(weight_map.values()):  # file order, no repeats
                    file = _inside(p, relative, index)
                    if not file.exists():
                        raise CheckpointError(f"{file}: missing (listed in {index})")
                    files.append(file)
                return files, index
        if (p / SAFETENSORS_SINGLE).exists():
            return [p / SAFETENSORS_SINGLE], None
        if (p / PICKLE_SINGLE).exists():
            self._check_pickle(p / PICKLE_SINGLE)
            return [p / PICKLE_SINGLE], None
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found, None
        raise CheckpointError(
            f"{p}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}"
            + (f" (and {len(found)} .safetensors files without an index)" if found else "")
        )

    def _check_pickle(self, file: Path) -> None:
        if not self.allow_pickle:
            raise CheckpointError(
                f"{file}: pickle checkpoints can run code when loaded; pass allow_pickle=True "
                "(CLI: --allow-pickle) to load it with torch.load(weights_only=True)"
            )

    def _scan(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            with self._open(file) as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    dtype = piece.get_dtype()
                    if dtype not in _DTYPES:
                        raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
                    self._add(TensorInfo(name, tuple(piece.get_shape()), _DTYPES[dtype], file))
        else:
            for name, tensor in self._pickle(file).items():
                self._add(TensorInfo(name, tuple(tensor.shape), tensor.dtype, file))

    def _add(self, info: TensorInfo) -> None:
        if info.name in self.tensors:
            raise CheckpointError(
                f"{info.file}: tensor {info.name!r} also appears in {self.tensors[info.name].file}"
            )
        self.tensors[info.name] = info

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc

    def _pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickled:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for a bad pickle
                raise CheckpointError(f"{file}: cannot be loaded with weights_only=True ({exc})") from exc
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{file}: expected a flat dict of tensors")
            self._pickled[file] = state
        return self._pickled[file]

    # -- reads -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        return self.tensors[name]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or its rows [start, stop) along the first dimension (only those are read)."""
        info = self.info(name)
        try:
            if info.file.suffix == ".safetensors":
                # A fresh handle per read, closed at once. safetensors hands back a view of its
                # private (copy-on-write) map of the file, which lives as long as this tensor: the
                # kernels read the page cache directly (no copy, no fresh anonymous pages to fault
                # in: 5x faster than a clone when the file is cached), and the pages leave this
                # process's RSS when the tensor is freed.
                with self._open(info.file) as handle:
                    piece = handle.get_slice(name)
                    tensor = piece[rows[0] : rows[1]] if rows is not None else piece[:]
            else:
                tensor = self._pickle(info.file)[name]
                tensor = tensor[rows[0] : rows[1]] if rows is not None else tensor
                tensor = tensor.clone()
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{info.file}: tensor {name!r} cannot be read ({exc})") from exc
        if not info.shape:  # safetensors gives 0-d tensors back as they are; keep the shape
            tensor = tensor.reshape(())
        return tensor

    def close(self) -> None:
        self._pickled.clear()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors in {len(self.files)} file(s))"
