"""Timing: median and spread over repeats after warm-up, and the comparison that decides a win."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# A speed-up must also clear this relative margin to count (run-to-run noise the repeats of one run
# do not show, e.g. a neighbour's load that changes between the two measurements).
WIN_MARGIN = 0.05


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and spread over the timed repeats (``samples``)."""

    median: float
    min: float
    max: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float] | tuple[float, ...]) -> Timing:
        if not samples:
            raise ValueError("Timing needs at least one sample")
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))

    @property
    def quartiles(self) -> tuple[float, float]:
        """(q1, q3) of the samples (both the median for fewer than 2 samples)."""
        if len(self.samples) < 2:
            return self.median, self.median
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    @property
    def spread(self) -> float:
        """max - min, seconds."""
        return self.max - self.min


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on `device` (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of fn (CUDA events on a GPU, perf_counter on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_fn(
    fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    *,
    budget_s: float | None = None,
    min_repeats: int = 2,
) -> Timing:
    """Time `fn` after `warmup` untimed calls. CUDA: CUDA events around each call, synchronised;
    CPU: time.perf_counter.

    budget_s: when given, the number of timed calls is cut so that they take about budget_s in all
    (estimated from the first timed call), never below ``min(min_repeats, repeats)``."""
    device = torch.device(device)
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    while len(samples) < repeats:
        samples.append(timed_call(fn, device))
        if budget_s is not None and len(samples) == 1:
            allowed = int(budget_s / samples[0]) if samples[0] > 0 else repeats
            repeats = max(min(min_repeats, repeats), min(repeats, allowed))
    return Timing.of(samples)


@dataclass(frozen=True)
class Comparison:
    """Ours against one reference: ``speedup`` = reference median / our median, and the verdict."""

    reference: str
    speedup: float
    verdict: str  # "faster", "slower" or "no clear difference"
    agreement: str | None = None

    def describe(self) -> str:
        if self.verdict == "no clear difference":
            text = f"{self.speedup:.2f}x, no clear difference vs {self.reference}"
        elif self.verdict == "faster":
            text = f"{self.speedup:.1f}x faster than {self.reference}"
        else:
            text = f"{1 / self.speedup:.1f}x slower than {self.reference}"
        return text


def compare(ours: Timing, reference: Timing, margin: float = WIN_MARGIN) -> tuple[float, str]:
    """(speed-up, verdict) of `ours` against `reference`.

    A win ("faster") needs the two ranges of repeats to be disjoint: our slowest repeat beats the
    reference's fastest, i.e. the difference of the medians exceeds both spreads; the speed-up must
    also exceed 1 + margin. Likewise for "slower". Anything else, a difference within the spread,
    is "no clear difference".
    """
    speedup = reference.median / ours.median if ours.median > 0 else float("inf")
    if ours.max < reference.min and speedup > 1 + margin:
        return speedup, "faster"
    if reference.max < ours.min and speedup < 1 / (1 + margin):
        return speedup, "slower"
    return speedup, "no clear difference"
