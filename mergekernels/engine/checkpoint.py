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


# bits per element of every dtype safetensors accepts (for the header diagnosis below)
_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8}
_BITS.update({"F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16})
_BITS.update({"BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64})


class CheckpointError(ValueError):
    """A checkpoint cannot be read as asked; the message names the file and, where known, the tensor."""


def _count(x) -> bool:
    """A non-negative integer a safetensors header may hold (a u64)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**64


def header_problem(file: Path) -> str | None:
    """What is wrong with the header of a safetensors file that safetensors refused, naming the
    tensor at fault (safetensors' own messages give a JSON line and column, or no tensor); None when
    nothing is found here (its message then says it)."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                return f"the file holds {size} bytes, less than the 8 of its header length"
            length = int.from_bytes(f.read(8), "little")
            if length > size - 8:
                return f"its header length ({length} bytes) is larger than the file ({size} bytes)"
            header = json.loads(f.read(length))
    except (OSError, ValueError):  # unreadable, or not JSON: safetensors' message is the one to give
        return None
    if not isinstance(header, dict):
        return f"its header is a JSON {type(header).__name__}, not an object"
    data_bytes, spans = size - 8 - length, []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                return "__metadata__ must map strings to strings"
            continue
        what = f"tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            return f"{what}: expected an object with dtype, shape and data_offsets, got {entry!r:.80}"
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _BITS:
            return f"{what}: unknown dtype {dtype!r:.40}"
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            return f"{what}: shape must be a list of non-negative integers, got {shape!r:.80}"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
            return f"{what}: data_offsets must be [begin, end] byte offsets, got {offsets!r:.80}"
        if not offsets[0] <= offsets[1] <= data_bytes:
            return f"{what}: data_offsets {offsets} lie outside the {data_bytes} data bytes"
        numel = 1
        for d in shape:
            numel *= d
        if numel * _BITS[dtype] != 8 * (offsets[1] - offsets[0]):
            return (
                f"{what}: shape {shape} of {dtype} needs {numel * _BITS[dtype] / 8:g} bytes, data_offsets "
                f"{offsets} hold {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            what = "overlap" if begin < end else "leave a gap"
            return f"tensor {name!r}: data_offsets {[begin, stop]} {what}"
        end = stop
    if end != data_bytes:
        return f"the tensors' data_offsets end at byte {end}, the file holds {data_bytes} data bytes"
    return None


def json_object(file: Path, data: bytes | None = None) -> dict:
    """A JSON object file (``data``: its bytes, when already read); CheckpointError naming the file
    when it is unreadable, not UTF-8, not JSON or not an object (a broken download would otherwise
    fail later naming no file)."""
    try:
        value = json.loads(file.read_bytes() if data is None else data)
    except (OSError, ValueError) as exc:  # unreadable, UnicodeDecodeError, JSONDecodeError
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


class InputChangedError(CheckpointError):
    """An input file's size or modification time changed after the merge opened it."""


def file_stamps(files) -> dict[Path, tuple[int, int]]:
    """(size, mtime in ns) of each file: what says a file is still the one the merge opened."""
    stamps = {}
    for file in files:
        st = Path(file).stat()
        stamps[Path(file)] = (st.st_size, st.st_mtime_ns)
    return stamps


def check_unchanged(stamps: dict[Path, tuple[int, int]], files=None) -> None:
    """Raise InputChangedError naming the first of ``files`` (default: all) whose size or mtime is
    no longer the stamped one: an output built from two versions of an input must never be
    published."""
    for file in stamps if files is None else files:
        size, mtime = stamps[file]
        try:
            st = file.stat()
            now = (st.st_size, st.st_mtime_ns)
        except OSError as exc:
            raise InputChangedError(f"{file}: disappeared while the merge read it ({exc.strerror})") from None
        if now != (size, mtime):
            what = f"size {size} -> {st.st_size} bytes" if st.st_size != size else "modified"
            raise InputChangedError(
                f"{file}: changed while the merge read it ({what}); nothing was published, "
                "run the merge again once the inputs are stable"
            )


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


def _inside(directory: Path, relative: str, index: Path, name: str) -> Path:
    """The file an index names for tensor ``name``, which must lie inside the index's directory."""
    candidate = Path(relative)
    try:
        resolved = (directory / candidate).resolve()
    except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
        raise CheckpointError(f"{index}: weight_map[{name!r}] is not a usable file name ({exc})") from None
    if candidate.is_absolute() or directory.resolve() not in resolved.parents:
        raise CheckpointError(f"{index}: weight_map[{name!r}] points outside its directory ({relative!r})")
    return resolved


def _weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor name -> file name), its types checked: a broken download or a
    hand-edited index would otherwise fail later with a TypeError naming neither."""
    try:
        data = json.loads(index.read_bytes())
    except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError, an unreadable file
        raise CheckpointError(f"{index}: not a valid index ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        got = type(data).__name__ if not isinstance(data, dict) else repr(weight_map)[:80]
        raise CheckpointError(
            f"{index}: not a valid index (weight_map must map tensor names to file names, got {got})"
        )
    for name, relative in weight_map.items():
        if not isinstance(relative, str) or not relative:
            raise CheckpointError(f"{index}: weight_map[{name!r}] must be a file name, got {relative!r}")
    return weight_map


class Checkpoint:
    """One model on disk: tensor names in file order, their shapes and dtypes, lazy reads."""

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._listed: dict[str, tuple[str, Path]] = {}  # an index's weight_map: (as written, resolved)
        self.files, self.index_file = self._resolve()
        self.stamps = file_stamps(self.files)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self._scan(file)
        if self.index_file is not None:
            self._check_index()

    # -- layout ----------------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def _resolve(self) -> tuple[list[Path], Path | None]:
        p = self.path
        try:
            found = p.exists()
        except OSError as exc:  # a name too long for the file system, a permission error
            raise CheckpointError(f"{p}: cannot be opened ({exc.strerror})") from None
        if not found:
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
                files: dict[Path, None] = {}  # file order, no repeats
                for name, relative in _weight_map(index).items():
                    file = _inside(p, relative, index, name)
                    self._listed[name] = (relative, file)
                    # a safetensors index naming another kind of file must not load it as a pickle
                    if not pickled and file.suffix != ".safetensors":
                        raise CheckpointError(
                            f"{index}: weight_map[{name!r}] names {relative!r}, not a .safetensors file"
                        )
                    if file not in files:
                        try:
                            found = file.is_file()
                        except OSError as exc:  # a name too long for the file system
                            raise CheckpointError(
                                f"{index}: weight_map[{name!r}] names an unusable file ({exc.strerror})"
                            ) from None
                        if not found:
                            raise CheckpointError(f"{file}: missing (listed in {index} for {name!r})")
                        files[file] = None
                return list(files), index
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

    def _check_index(self) -> None:
        """Every tensor the index lists is in the file it names (readers that trust the index, as
        mergekit's, would otherwise fail on it or read another tensor)."""
        for name, (relative, file) in self._listed.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{file}: has no tensor {name!r}, which {self.index_file} lists there")
            if info.file != file:
                raise CheckpointError(
                    f"{self.index_file}: weight_map lists tensor {name!r} in {relative!r}, but it is in "
                    f"{info.file.name}"
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
            problem = header_problem(file) if isinstance(exc, SafetensorError) else None
            raise CheckpointError(f"{file}: not a readable safetensors file ({problem or exc})") from exc

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
        check_unchanged(self.stamps, [info.file])  # a replaced file would mix versions silently
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
