"""Benchmark inputs: fresh random tensors, and enough input sets that repeats never hit the cache."""

from __future__ import annotations

import glob
import math
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_K = 8
DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {"cpu": (2048, 4096), "cuda": (4096, 11008)}
QUICK_SHAPE = (512, 1024)
BASE_STD = 0.02
DELTA_STD = 0.002
FALLBACK_LLC = 64 << 20  # bytes, when the cache size cannot be read
# The input sets of one case rotate over at least this many times the last-level cache, and take at
# most this fraction of the free memory.
ROTATION_CACHE_FACTOR = 2
MEMORY_FRACTION = 0.25


def parse_shape(text: str) -> tuple[int, ...]:
    """``"256x512"`` -> ``(256, 512)``."""
    try:
        shape = tuple(int(part) for part in str(text).lower().replace("×", "x").split("x"))
    except ValueError as exc:
        raise ValueError(f"bad shape {text!r}: expected sizes joined by 'x', e.g. 2048x4096") from exc
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"bad shape {text!r}: sizes must be positive, e.g. 2048x4096")
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


def _read_size(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip().upper()
    except OSError:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except ValueError:
        return None


def llc_bytes(device: torch.device | str) -> int:
    """Total last-level cache of the device: the GPU's L2, or the sum over the distinct instances of
    the CPU's highest cache level (from sysfs; FALLBACK_LLC when unreadable)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or FALLBACK_LLC)
    best_level, instances = -1, {}
    for index in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "shared_cpu_list")) as f:
                shared = f.read().strip()
        except (OSError, ValueError):
            continue
        size = _read_size(os.path.join(index, "size"))
        if size is None:
            continue
        if level > best_level:
            best_level, instances = level, {}
        if level == best_level:
            instances[shared] = size
    return sum(instances.values()) or FALLBACK_LLC


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory of the device (MemAvailable on the host), 8 GiB when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def rotation_sets(set_bytes: int, device: torch.device | str, llc: int | None = None) -> int:
    """How many input sets to rotate so that a repeat never finds its inputs in the cache: together
    at least ROTATION_CACHE_FACTOR x the last-level cache, and at least 2; capped so that they take
    at most MEMORY_FRACTION of the free memory (at least 1)."""
    llc = llc_bytes(device) if llc is None else llc
    want = max(2, math.ceil(ROTATION_CACHE_FACTOR * llc / max(set_bytes, 1)))
    fit = int(MEMORY_FRACTION * free_memory_bytes(device) // max(set_bytes, 1))
    return max(1, min(want, fit))


@dataclass
class InputSets:
    """Several independent input sets of one kind; a :class:`Rotating` call cycles through them."""

    sets: list[tuple]
    set_bytes: int

    def __len__(self) -> int:
        return len(self.sets)

    @property
    def total_bytes(self) -> int:
        return self.set_bytes * len(self.sets)


def elementwise_sets(
    k: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, seed: int, count: int
) -> InputSets:
    sets = [make_inputs(k, shape, dtype, device, seed=seed + 1000 * i) for i in range(count)]
    numel = math.prod(shape)
    return InputSets(sets, (k + 1) * numel * torch.empty((), dtype=dtype).element_size())


class Rotating:
    """``fn(*inputs)`` on the next input set at each call; keeps the result of the first call (on
    set 0) so that outputs of different implementations can be compared on the same inputs."""

    def __init__(self, fn: Callable[..., object], sets: Sequence[tuple]):
        if not sets:
            raise ValueError("Rotating needs at least one input set")
        self.fn, self.sets = fn, sets
        self.calls = 0
        self.first: object = None

    def __call__(self) -> object:
        out = self.fn(*self.sets[self.calls % len(self.sets)])
        if self.calls == 0:
            self.first = out
        self.calls += 1
        return out
