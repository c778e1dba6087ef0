"""Benchmarks of every kernel and method on this machine, against its ceilings and torch references.

``mergekernels bench`` (see ``mergekernels bench --help``) and ``benchmarks/`` share this module::

    import mergekernels as mk
    results = mk.bench.run(device="cpu", dtype="bf16", experts=8, size=(2048, 4096))
    print(results.table())
    results.to_json()          # plain data: environment, settings, ceilings, cases
    results.plot("bench.png")  # needs matplotlib: pip install 'mergekernels[plot]'

How it measures:

- Ceilings first (:mod:`.ceilings`): the copy bandwidth (device-to-device on CUDA, host memory on a
  CPU) and the matmul rate in fp32, fp64, the storage dtype and (CUDA) TF32, each the best over a
  sweep of sizes.
- Each case times ours and the plain-torch references (:mod:`.references`) on the same fresh random
  inputs (never zeros), rotating through enough input sets to exceed twice the last-level cache,
  after one warm-up call: the median, min-max and quartiles over the repeats (CUDA events on a GPU,
  ``time.perf_counter`` on a CPU).
- The bytes moved (:func:`.cases.bytes_moved`) or FLOPs (:func:`.cases.ace_flops`) give the rate and
  its fraction of the ceiling (never above 1.05: see :mod:`.ceilings`); a speed-up whose difference
  is within the spread of the repeats is "no clear difference" (:func:`.timing.compare`).
"""

from __future__ import annotations

from .cases import OPS, PRESETS, ace_flops, bytes_moved, make_ace_group
from .ceilings import Ceilings, measure_ceilings, measure_copy, measure_copy_bandwidth, measure_matmul
from .inputs import DTYPES, bench_size, device_name, make_inputs, parse_shape
from .plot import INSTALL_HINT, PlotUnavailable
from .results import CEILING_TOLERANCE, BenchResults, CaseResult, Measurement
from .runner import available_ops, resolve_ops, run
from .timing import Comparison, Timing, compare, synchronize, time_fn

__all__ = [
    "CEILING_TOLERANCE",
    "DTYPES",
    "INSTALL_HINT",
    "OPS",
    "PRESETS",
    "BenchResults",
    "CaseResult",
    "Ceilings",
    "Comparison",
    "Measurement",
    "PlotUnavailable",
    "Timing",
    "ace_flops",
    "available_ops",
    "bench_size",
    "bytes_moved",
    "compare",
    "device_name",
    "make_ace_group",
    "make_inputs",
    "measure_ceilings",
    "measure_copy",
    "measure_copy_bandwidth",
    "measure_matmul",
    "parse_shape",
    "resolve_ops",
    "run",
    "synchronize",
    "time_fn",
]
