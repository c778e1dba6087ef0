"""The machine's ceilings: copy bandwidth and matmul rate, measured so that they are hard to beat.

A kernel can only appear to beat a ceiling when the ceiling was under-measured. The usual causes,
and what is done here against each:

- buffers or matrices too small: per-call overhead (thread wake-up on a CPU, a launch on a GPU)
  dominates and the rate comes out low. Both ceilings sweep sizes upward (copies start at 4x the
  last-level cache, so they also never run from the cache) and keep the best.
- a noisy machine: each size keeps its best repeat, not the median (a ceiling is what the machine
  can do; the kernels, timed by their median, are not flattered by this).
- the ceiling measured in a quiet moment or a busy one: when a kernel exceeds 1.05 x a ceiling, the
  runner measures that ceiling again, larger and longer, and keeps the higher of the two figures;
  only if the kernel still exceeds it is its fraction clamped to 1 and flagged (the raw rate stays).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from .inputs import free_memory_bytes, llc_bytes
from .timing import synchronize, timed_call

MIN_COPY_BYTES = 64 << 20
MAX_COPY_BYTES = {"cpu": 1 << 30, "cuda": 2 << 30}
MATMUL_MAX_N = {"cpu": 4096, "cuda": 16384}
MATMUL_START_N = 256
# The dtypes the methods compute in: float32 everywhere, float64 in ACE's solves; the storage dtype
# (bf16 / fp16) is added when it is the one benchmarked, TF32 on CUDA.
MATMUL_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "tf32": torch.float32,
}


@dataclass
class BandwidthCeiling:
    """Best copy rate in GB/s (1e9 bytes; bytes read + bytes written per copy)."""

    kind: str  # "device-to-device copy" or "host memory copy"
    gbps: float
    buffer_bytes: int  # size of each buffer at the best rate
    sweep: dict[int, float] = field(default_factory=dict)  # buffer bytes -> best GB/s
    measurements: int = 1  # 2 once re-measured


@dataclass
class MatmulCeiling:
    """Best n x n by n x n matmul rate in GFLOP/s (2 n^3 FLOPs per product)."""

    dtype: str
    gflops: float
    n: int
    sweep: dict[int, float] = field(default_factory=dict)  # n -> best GFLOP/s
    measurements: int = 1


@dataclass
class Ceilings:
    device: str
    copy: BandwidthCeiling
    host_copy: BandwidthCeiling  # the same object as copy on a CPU
    matmul: dict[str, MatmulCeiling]

    def to_json(self) -> dict:
        data = {
            "device": self.device,
            "copy": asdict(self.copy),
            "host_copy": asdict(self.host_copy),
            "matmul": {k: asdict(v) for k, v in self.matmul.items()},
        }
        return data


def _copy_sizes(device: torch.device, max_bytes: int | None) -> list[int]:
    """Buffer sizes to sweep: powers of two from max(64 MiB, 4 x last-level cache) up to max_bytes
    (never below the start), two buffers together taking at most a quarter of the free memory."""
    start = max(MIN_COPY_BYTES, 4 * llc_bytes(device))
    start = 1 << math.ceil(math.log2(start))
    cap = max(start, MAX_COPY_BYTES[device.type] if max_bytes is None else max_bytes)
    fits = free_memory_bytes(device) // 8
    if start > fits:  # little free memory: the largest pair that fits (may be served from a cache)
        return [max(1 << 20, 1 << int(math.log2(max(fits, 1))))]
    sizes = [start]
    while sizes[-1] * 2 <= min(cap, fits):
        sizes.append(sizes[-1] * 2)
    return sizes


def _copy_rate(device: torch.device, nbytes: int, repeats: int) -> float:
    """Best GB/s of ``dst.copy_(src)`` over `repeats`, float32 buffers of `nbytes` each."""
    numel = max(1, nbytes // 4)
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.5)  # touched: pages mapped
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = min(timed_call(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * numel * 4 / best / 1e9


def measure_copy(
    device: torch.device | str = "cpu",
    *,
    repeats: int = 10,
    max_bytes: int | None = None,
    nbytes: int | None = None,
) -> BandwidthCeiling:
    """Copy bandwidth: ``dst.copy_(src)`` between preallocated buffers on `device` (device memory on
    a GPU, host memory on a CPU), best of `repeats` per size, over sizes doubling from
    max(64 MiB, 4 x last-level cache) up to max_bytes (default 1 GiB CPU, 2 GiB CUDA; at most a
    quarter of the free memory); the sweep stops once doubling gains less than 3%. `nbytes` measures
    that one size only."""
    device = torch.device(device)
    sizes = [nbytes] if nbytes is not None else _copy_sizes(device, max_bytes)
    sweep: dict[int, float] = {}
    for size in sizes:
        sweep[size] = _copy_rate(device, size, repeats)
        if len(sweep) > 1 and sweep[size] < 1.03 * max(v for k, v in sweep.items() if k != size):
            break
    best = max(sweep, key=sweep.get)
    kind = "device-to-device copy" if device.type == "cuda" else "host memory copy"
    return BandwidthCeiling(kind, sweep[best], best, sweep)


def measure_copy_bandwidth(
    device: torch.device | str = "cpu", nbytes: int | None = None, repeats: int = 10
) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written): :func:`measure_copy`'s figure."""
    return measure_copy(device, repeats=repeats, nbytes=nbytes).gbps


@contextmanager
def _tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def measure_matmul(
    name: str,
    device: torch.device | str = "cpu",
    *,
    max_call_s: float = 0.3,
    max_n: int | None = None,
    repeats: int = 3,
) -> MatmulCeiling:
    """Matmul rate of dtype `name` (a key of MATMUL_DTYPES; "tf32" is float32 with TF32 allowed,
    "fp32" float32 with it forbidden): square products of sizes doubling from 256, best of
    `repeats` per size; the next size is tried while its predicted call time (8x) stays under
    max_call_s and n <= max_n (default 4096 CPU, 16384 CUDA)."""
    device = torch.device(device)
    dtype = MATMUL_DTYPES[name]
    max_n = MATMUL_MAX_N[device.type] if max_n is None else max_n
    gen = torch.Generator(device=device).manual_seed(0)
    sweep: dict[int, float] = {}
    n = MATMUL_START_N
    with _tf32(name == "tf32") if device.type == "cuda" else _null():
        while n <= max_n:
            a = torch.randn(n, n, generator=gen, device=device).to(dtype)
            b = torch.randn(n, n, generator=gen, device=device).to(dtype)
            out = torch.empty(n, n, device=device, dtype=dtype)
            torch.mm(a, b, out=out)  # warm-up (and library initialisation)
            synchronize(device)
            best = min(timed_call(lambda: torch.mm(a, b, out=out), device) for _ in range(repeats))  # noqa: B023
            sweep[n] = 2 * n**3 / best / 1e9
            del a, b, out
            if best * 8 > max_call_s:
                break
            n *= 2
    top = max(sweep, key=sweep.get)
    return MatmulCeiling(name, sweep[top], top, sweep)


@contextmanager
def _null():
    yield


def matmul_dtypes(device: torch.device | str, storage: str) -> list[str]:
    """The matmul dtypes measured for a run: fp32, fp64, the storage dtype, and tf32 on CUDA."""
    names = ["fp32", "fp64"]
    if storage in ("bf16", "fp16"):
        names.append(storage)
    if torch.device(device).type == "cuda":
        names.append("tf32")
    return names


def measure_ceilings(
    device: torch.device | str, storage: str = "bf16", *, quick: bool = False, matmul: bool = True
) -> Ceilings:
    """Copy bandwidth (and, on CUDA, the host's too) and the matmul rates of :func:`matmul_dtypes`."""
    device = torch.device(device)
    repeats = 5 if quick else 10
    max_bytes = (256 << 20) if quick and device.type == "cpu" else None
    copy = measure_copy(device, repeats=repeats, max_bytes=max_bytes)
    host = copy if device.type == "cpu" else measure_copy("cpu", repeats=repeats, max_bytes=max_bytes)
    rates = {}
    if matmul:
        max_call_s = 0.3 if quick else 1.0
        for name in matmul_dtypes(device, storage):
            rates[name] = measure_matmul(name, device, max_call_s=max_call_s)
    return Ceilings(str(device), copy, host, rates)


def remeasure_copy(ceiling: BandwidthCeiling, device: torch.device | str) -> BandwidthCeiling:
    """Measure again, twice the repeats and up to twice the largest size; keep the better figure."""
    device = torch.device(device)
    again = measure_copy(device, repeats=20, max_bytes=2 * max(max(ceiling.sweep), MIN_COPY_BYTES))
    best = again if again.gbps > ceiling.gbps else ceiling
    sweep = {**ceiling.sweep}
    for size, rate in again.sweep.items():
        sweep[size] = max(rate, sweep.get(size, 0.0))
    return BandwidthCeiling(best.kind, best.gbps, best.buffer_bytes, sweep, ceiling.measurements + 1)


def remeasure_matmul(ceiling: MatmulCeiling, device: torch.device | str) -> MatmulCeiling:
    """Measure again with larger sizes and more repeats; keep the better figure."""
    again = measure_matmul(
        ceiling.dtype, device, max_call_s=2.0, max_n=2 * max(max(ceiling.sweep), 2048), repeats=5
    )
    best = again if again.gflops > ceiling.gflops else ceiling
    sweep = {**ceiling.sweep}
    for n, rate in again.sweep.items():
        sweep[n] = max(rate, sweep.get(n, 0.0))
    return MatmulCeiling(ceiling.dtype, best.gflops, best.n, sweep, ceiling.measurements + 1)
