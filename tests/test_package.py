"""Packaging behaviour: a clear error without the compiled extension."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch

import mergekernels


def test_import_without_extension_says_how_to_build(tmp_path):
    pkg = Path(mergekernels.__file__).parent
    shutil.copytree(pkg, tmp_path / "mergekernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # -S: no site hooks, so an editable install's import finder cannot bring in the built package.
    site_packages = Path(torch.__file__).parent.parent
    proc = subprocess.run(
        [sys.executable, "-S", "-c", "import mergekernels"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{tmp_path}:{site_packages}", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    assert "mergekernels._C is missing" in proc.stderr
    assert "pip install --no-build-isolation -e ." in proc.stderr
