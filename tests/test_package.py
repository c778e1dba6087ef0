"""Packaging behaviour: clear errors without the compiled extension or with one built for another torch."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch

import mergekernels
import mergekernels.build


def _import_a_copy(
    tmp_path: Path, *python_flags: str, ignore=("__pycache__",), build_info: str | None = None
):
    """``import mergekernels`` from a copy of the package (without the ``ignore`` patterns, with
    ``build_info`` as its _build_info.py when given) in a fresh interpreter."""
    pkg = Path(mergekernels.__file__).parent
    shutil.copytree(pkg, tmp_path / "mergekernels", ignore=shutil.ignore_patterns(*ignore))
    if build_info is not None:
        (tmp_path / "mergekernels" / "_build_info.py").write_text(build_info)
    # -S: no site hooks, so an editable install's import finder cannot bring in the built package.
    site_packages = Path(torch.__file__).parent.parent
    return subprocess.run(
        [sys.executable, "-S", *python_flags, "-c", "import mergekernels"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{tmp_path}:{site_packages}", "PATH": "/usr/bin:/bin"},
    )


def test_import_without_extension_says_how_to_build(tmp_path):
    proc = _import_a_copy(tmp_path, ignore=("*.so", "__pycache__"))
    assert proc.returncode != 0
    assert "mergekernels._C is missing" in proc.stderr
    assert "pip install --no-build-isolation -e ." in proc.stderr


def test_the_build_records_the_torch_it_was_compiled_against():
    """setup.py's record (mergekernels/_build_info.py) is this torch: the one the tests run with."""
    built = mergekernels.build.built_against()
    assert built is not None
    assert (built["torch"], built["cuda"]) == (torch.__version__, torch.version.cuda)
    assert built["cuda_kernels"] == mergekernels.has_cuda_kernels()
    assert mergekernels.build.mismatch(built) is None


def test_a_build_for_another_torch_names_both_and_how_to_rebuild():
    """The issue's case: a wheel built in isolation against torch 2.14.1 (CUDA 13.0), installed next
    to torch 2.13.0 (CPU); the loader's error alone named only libc10_cuda.so."""
    built = {"torch": "2.14.1+cu130", "cuda": "13.0", "cuda_kernels": True}
    exc = ImportError("libc10_cuda.so: cannot open shared object file: No such file or directory")
    message = mergekernels.build.load_error(exc, built, ("2.13.0+cpu", None))
    assert (
        "built against torch 2.14.1+cu130 (CUDA 13.0), but torch 2.13.0+cpu (CPU only) is installed"
        in message
    )
    assert "libc10_cuda.so" in message
    assert "pip install --no-build-isolation" in message
    # the same versions with another CUDA build count as a mismatch too
    assert mergekernels.build.mismatch(built, ("2.14.1+cu128", "12.8")) is not None
    assert mergekernels.build.mismatch(built, ("2.14.1+cu130", "13.0")) is None


def test_a_mismatched_build_that_loads_warns(tmp_path):
    """An extension that loads although its build's torch is another one may still crash: warned."""
    info = 'TORCH_VERSION = "2.11.0+cu130"\nTORCH_CUDA_VERSION = "13.0"\nCUDA_KERNELS = True\n'
    proc = _import_a_copy(tmp_path, "-W", "error::RuntimeWarning", build_info=info)
    assert proc.returncode != 0
    assert "built against torch 2.11.0+cu130 (CUDA 13.0)" in proc.stderr
