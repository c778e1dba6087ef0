"""Build and load the emulated CUDA kernels: the sources of ``csrc/cuda/*.cu`` compiled as host C++
against ``csrc/cuda/emulation.h``, registered as ``torch.ops.mergekernels_emu`` on CPU tensors, with
the package's op schemas. Test-only: not part of the installed package or of ``make build``.

The shared object is cached outside the clone, keyed by the hash of every source under ``csrc/``,
the compile flags, the torch version and the Python version, so a clean clone with unchanged
kernels loads it without compiling. ``MK_EMULATION_CACHE`` overrides the cache folder.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NAME = "mergekernels_emu"
# -ffp-contract=off: no FMA contraction, the rule the CPU and CUDA kernels share;
# hidden visibility: these kernels never bind to the same-named symbols of mergekernels._C.
CFLAGS = [
    "-O2",
    "-DMK_CUDA_EMULATION",
    "-ffp-contract=off",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-Wno-unknown-pragmas",
]


_loaded = False


def _sources() -> list[Path]:
    return sorted(CSRC.glob("cuda/*.cu")) + sorted(CSRC.glob("emulation/*.cpp"))


def _cache_key() -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in CSRC.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(CSRC)).encode())
        h.update(path.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("MK_EMULATION_CACHE")
    if base:
        return Path(base) / _cache_key()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mergekernels" / f"emulation-{_cache_key()}"


def load():
    """``torch.ops.mergekernels_emu``, building the extension first if the cache has no copy."""
    global _loaded
    if _loaded:
        return getattr(torch.ops, NAME)
    build = cache_dir()
    library, complete = build / f"{NAME}.so", build / "complete"
    # `complete` is written after a whole build: a concurrent process (pytest-xdist) never loads a
    # half-linked library; it takes torch's build lock instead, which waits for the running build.
    if not complete.exists():
        from torch.utils.cpp_extension import load as build_extension

        build.mkdir(parents=True, exist_ok=True)
        # torch's builder picks nvcc for .cu files: compile each through a one-line C++ wrapper.
        wrappers = []
        for cu in _sources():
            if cu.suffix != ".cu":
                continue
            wrapper = build / f"emulated_{cu.stem}.cpp"
            text = f'#include "{cu}"\n'
            if not wrapper.exists() or wrapper.read_text() != text:
                wrapper.write_text(text)
            wrappers.append(str(wrapper))
        cpp = [str(p) for p in _sources() if p.suffix == ".cpp"]
        build_extension(
            name=NAME,
            sources=wrappers + cpp,
            extra_cflags=CFLAGS,
            extra_include_paths=[str(CSRC)],
            build_directory=str(build),
            is_python_module=False,
            verbose=bool(os.environ.get("MK_EMULATION_VERBOSE")),
        )
        complete.touch()
    else:
        torch.ops.load_library(str(library))
    _loaded = True
    return getattr(torch.ops, NAME)
