"""Helpers shared by the benchmark scripts: all of them live in :mod:`mergekernels.bench`, so that
``benchmarks/`` and ``mergekernels bench`` measure with one implementation. Re-exported here for
the scripts and the pytest-benchmark suites."""

from __future__ import annotations

from mergekernels.bench.cases import METHODS, bytes_moved
from mergekernels.bench.ceilings import measure_copy, measure_copy_bandwidth
from mergekernels.bench.inputs import (
    BASE_STD,
    DEFAULT_K,
    DEFAULT_SHAPES,
    DELTA_STD,
    DTYPES,
    bench_size,
    device_name,
    make_inputs,
    parse_shape,
)
from mergekernels.bench.results import report
from mergekernels.bench.timing import Timing, synchronize, time_fn

__all__ = [
    "BASE_STD",
    "DEFAULT_K",
    "DEFAULT_SHAPES",
    "DELTA_STD",
    "DTYPES",
    "METHODS",
    "Timing",
    "bench_size",
    "bytes_moved",
    "device_name",
    "make_inputs",
    "measure_copy",
    "measure_copy_bandwidth",
    "parse_shape",
    "report",
    "synchronize",
    "time_fn",
]
