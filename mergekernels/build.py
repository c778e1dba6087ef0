"""The torch the compiled extension was built against, and what to say when it is not the installed one.

``mergekernels._C`` is C++ against torch's C++ API, which is not stable from one torch release to
the next, nor between its CPU and CUDA builds: the extension must be compiled against the torch it
runs with. setup.py records that torch in ``mergekernels/_build_info.py``; at import the package
compares it with the installed one, so a mismatch is named instead of surfacing as a missing
symbol or library (``libc10_cuda.so``) from the dynamic loader.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

REBUILD = (
    "Rebuild mergekernels against the installed torch, without build isolation (which would build "
    "against a fresh torch from the index instead): `pip install --no-build-isolation "
    "--force-reinstall --no-deps mergekernels` (or, in a source checkout, `pip install "
    "--no-build-isolation -e .`; MK_CUDA=0 for a CPU-only build)."
)


def built_against() -> dict | None:
    """{"torch": version, "cuda": CUDA version or None, "cuda_kernels": bool}, or None when the
    build left no record (a build older than the record, or no build at all)."""
    try:
        from . import _build_info as info
    except ImportError:
        return None
    return {"torch": info.TORCH_VERSION, "cuda": info.TORCH_CUDA_VERSION, "cuda_kernels": info.CUDA_KERNELS}


def _describe(version: str, cuda: str | None) -> str:
    return f"torch {version} ({f'CUDA {cuda}' if cuda else 'CPU only'})"


def installed() -> tuple[str, str | None]:
    """The running torch: (version, CUDA version or None)."""
    return torch.__version__, torch.version.cuda


def mismatch(built: dict | None, running: tuple[str, str | None] | None = None) -> str | None:
    """A sentence naming both torches when the build's differs from the running one, else None."""
    version, cuda = running or installed()
    if built is None or (built["torch"], built["cuda"]) == (version, cuda):
        return None
    return (
        f"mergekernels._C was built against {_describe(built['torch'], built['cuda'])}, but "
        f"{_describe(version, cuda)} is installed."
    )


def _extension_missing() -> bool:
    try:
        return importlib.util.find_spec("mergekernels._C") is None
    except (ImportError, ValueError):
        return True


def load_error(
    exc: BaseException, built: dict | None = None, running: tuple[str, str | None] | None = None
) -> str:
    """The ImportError message when the extension does not load (defaults: this build's record and
    the running torch)."""
    built = built_against() if built is None else built
    running = running or installed()
    found = mismatch(built, running)
    if found is not None:
        return f"mergekernels: {found} It cannot load there ({exc}). {REBUILD}"
    if built is None or _extension_missing():
        return (
            f"mergekernels: the compiled extension mergekernels._C is missing or failed to load ({exc}). "
            f"It must be built against the installed torch ({_describe(*running)}). {REBUILD}"
        )
    return f"mergekernels: the compiled extension mergekernels._C failed to load ({exc}). {REBUILD}"


def warn_if_mismatched() -> None:
    """The extension loaded, but its build's torch is not the running one: it may still crash."""
    found = mismatch(built_against())
    if found is not None:
        warnings.warn(f"{found} {REBUILD}", RuntimeWarning, stacklevel=3)
