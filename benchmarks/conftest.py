"""pytest setup for the benchmark suite (``pytest benchmarks --benchmark-enable``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # the suite imports bench_common and references as top-level modules
    sys.path.insert(0, _HERE)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """pyproject's addopts carry ``--benchmark-disable``, which pytest-benchmark refuses to combine
    with ``--benchmark-only``; asking for only the benchmarks implies enabling them."""
    if getattr(config.option, "benchmark_only", False):
        config.option.benchmark_enable = True
