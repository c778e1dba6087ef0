"""Helpers shared by the benchmarks: inputs, timing, copy bandwidth and the bytes a merge must move."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_K = 8
DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {"cpu": (2048, 4096), "cuda": (4096, 11008)}
BASE_STD = 0.02
DELTA_STD = 0.002

# Passes over the inputs each method needs at the least (see bytes_moved).
_READ_ONLY = ("stats", "threshold")
_ONE_PASS = ("ta", "dare", "dare_linear", "dare_ties", "della")
_TWO_PASS = ("ties", "breadcrumbs")
METHODS = _READ_ONLY + _ONE_PASS + _TWO_PASS


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and spread over the timed repeats."""

    median: float
    min: float
    max: float
    samples: tuple[float, ...]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"256x512"`` -> ``(256, 512)``."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise ValueError(f"bad shape {text!r}: expected sizes joined by 'x', e.g. 256x512") from exc
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"bad shape {text!r}: sizes must be positive")
    return shape


def bench_size(device: torch.device | str) -> tuple[int, tuple[int, ...]]:
    """(K, shape) for a device: the defaults, overridden by MK_BENCH_K and MK_BENCH_SHAPE."""
    kind = torch.device(device).type
    k = int(os.environ.get("MK_BENCH_K", DEFAULT_K))
    shape_env = os.environ.get("MK_BENCH_SHAPE")
    shape = parse_shape(shape_env) if shape_env else DEFAULT_SHAPES[kind]
    return k, shape


def make_inputs(
    k: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fresh random (base, finetuned): base ~ N(0, 0.02), finetuned_t = base + N(0, 0.002), both
    rounded to `dtype`, so the task vectors have realistic, non-zero magnitudes."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    base = (torch.randn(shape, generator=gen, device=device) * BASE_STD).to(dtype)
    base32 = base.float()
    finetuned = []
    for t in range(k):
        noise = torch.randn(shape, generator=gen, device=device).mul_(DELTA_STD)
        ft = (base32 + noise).to(dtype)
        if torch.equal(ft, base):
            raise RuntimeError(f"make_inputs: fine-tuned tensor {t} equals base (dtype {dtype} too coarse?)")
        finetuned.append(ft)
    return base, finetuned


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on `device` (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: torch.device | str = "cpu"
) -> Timing:
    """Time `fn` after `warmup` untimed calls. CUDA: CUDA events around each call, synchronised;
    CPU: time.perf_counter."""
    device = torch.device(device)
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), min(samples), max(samples), tuple(samples))


def measure_copy_bandwidth(
    device: torch.device | str = "cpu", nbytes: int | None = None, repeats: int = 10
) -> float:
    """Copy bandwidth in GB/s (1e9 bytes): median over `repeats` of ``dst.copy_(src)`` between
    preallocated buffers of `nbytes` each (default 256 MiB on CPU, 1 GiB on CUDA), counting the
    bytes read plus the bytes written (2 * nbytes per copy)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    numel = max(1, nbytes // 4)
    src = torch.ones(numel, dtype=torch.float32, device=device)  # touched: pages are mapped
    dst = torch.zeros_like(src)
    timing = time_fn(lambda: dst.copy_(src), repeats=repeats, warmup=2, device=device)
    return 2 * numel * 4 / timing.median / 1e9


def bytes_moved(method: str, k: int, numel: int, itemsize: int) -> int:
    """Lower bound on the bytes a merge of K fine-tuned tensors must move through memory.

    One "input set" is base plus the K fine-tuned tensors, (K + 1) * numel * itemsize bytes; the
    output is numel * itemsize bytes. Counting:

    - ``stats``, ``threshold``: read the inputs once, nothing written (the threshold is counted
      as one pass although the radix selection reads the inputs twice).
    - ``ta``, ``dare``/``dare_linear``, ``dare_ties``, ``della``: one fused merge pass, reading the
      inputs once and writing the output once (DELLA's ranks are per row, which can stay in cache).
    - ``ties``, ``breadcrumbs``: two passes, since their cuts are order statistics of the whole
      tensor: a threshold pass reading the inputs, then the merge pass reading them again and
      writing the output.

    The torch references are charged the bound of the method they implement, so their GB/s and
    ours compare directly. Intermediates (float32 task vectors, masks, indices) are not counted.
    """
    inputs = (k + 1) * numel * itemsize
    output = numel * itemsize
    if method in _READ_ONLY:
        return inputs
    if method in _ONE_PASS:
        return inputs + output
    if method in _TWO_PASS:
        return 2 * inputs + output
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def device_name(device: torch.device | str) -> str:
    """GPU name from torch, or the CPU model from /proc/cpuinfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(meta: dict, rows: list, render: Callable[[dict, list], str], json_path: str | None) -> None:
    """Print a script's table and, when asked, write its meta data and rows (dataclasses) as JSON."""
    import json
    from dataclasses import asdict

    print()
    print(render(meta, rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=2)
