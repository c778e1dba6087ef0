"""pytest-benchmark suite: every mergekernels op and method next to its plain-torch reference.

Run with ``pytest benchmarks --benchmark-enable`` (pyproject disables benchmarks by default, so a
plain ``pytest benchmarks`` only runs each function once as a smoke test). Sizes: CPU 8 x 2048x4096
bf16, CUDA 8 x 4096x11008 bf16; override with MK_BENCH_K and MK_BENCH_SHAPE (e.g. ``256x512``).
Results of one device and method share a benchmark group, e.g. ``cpu:ties``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from bench_common import bench_size, bytes_moved, make_inputs, synchronize
from references import dare_bernoulli, ta_torch, ties_argsort, ties_kthvalue

import mergekernels as mk

DTYPE = torch.bfloat16
ROUNDS = 3
SLOW_ROUNDS = 1  # the argsort reference sorts every task vector in full
TIES_DENSITY = 0.2
DARE_DROP = 0.9
KEY = "model.layers.0.mlp.up_proj.weight"

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
    ),
]


@dataclass
class Case:
    """One set of benchmark inputs."""

    device: torch.device
    base: torch.Tensor
    finetuned: list[torch.Tensor]

    @property
    def k(self) -> int:
        return len(self.finetuned)


@pytest.fixture(scope="module", params=DEVICES)
def case(request: pytest.FixtureRequest) -> Case:
    device = torch.device(request.param)
    k, shape = bench_size(device)
    base, finetuned = make_inputs(k, shape, DTYPE, device, seed=0)
    return Case(device, base, finetuned)


def _needs_kernels(case: Case) -> None:
    if case.device.type == "cuda" and not mk.has_cuda_kernels():
        pytest.skip("mergekernels was built without CUDA kernels")


def _run(
    benchmark, case: Case, method: str, fn: Callable[[], object], rounds: int = ROUNDS, warmup: int = 1
) -> object:
    """Benchmark `fn` (synchronised on CUDA), tagging it with the bytes `method` must move."""
    nbytes = bytes_moved(method, case.k, case.base.numel(), case.base.element_size())
    benchmark.group = f"{case.device.type}:{method}"
    benchmark.extra_info.update(
        k=case.k, shape="x".join(map(str, case.base.shape)), dtype=str(DTYPE), bytes_moved=nbytes
    )

    def call() -> object:
        out = fn()
        synchronize(case.device)
        return out

    result = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)
    return result


def _check_merged(out: object, case: Case) -> None:
    assert isinstance(out, torch.Tensor)
    assert out.shape == case.base.shape and out.dtype == case.base.dtype


# ---- our ops and methods ---------------------------------------------------------------------
def test_stats(benchmark, case: Case) -> None:
    _needs_kernels(case)
    stats = _run(benchmark, case, "stats", lambda: mk.task_vector_stats(case.base, case.finetuned))
    assert stats.gram.shape == (case.k, case.k)


def test_threshold(benchmark, case: Case) -> None:
    _needs_kernels(case)
    thr = _run(
        benchmark, case, "threshold", lambda: mk.magnitude_threshold(case.base, case.finetuned, TIES_DENSITY)
    )
    assert thr.shape == (case.k,)


# Merge methods: benchmark group (and byte count) -> call.
MERGES: dict[str, Callable[[Case], torch.Tensor]] = {
    "ta": lambda c: mk.task_arithmetic(c.base, c.finetuned),
    "ties": lambda c: mk.ties(c.base, c.finetuned, density=TIES_DENSITY),
    "dare": lambda c: mk.dare(c.base, c.finetuned, drop=DARE_DROP, seed=0, key=KEY),
    "dare_ties": lambda c: mk.dare(c.base, c.finetuned, drop=DARE_DROP, seed=0, key=KEY, consensus="ties"),
    "breadcrumbs": lambda c: mk.breadcrumbs(c.base, c.finetuned, density=0.9, gamma=0.01),
    "della": lambda c: mk.della(c.base, c.finetuned, density=0.5, epsilon=0.15, seed=0, key=KEY),
}


@pytest.mark.parametrize("method", list(MERGES))
def test_merge(benchmark, case: Case, method: str) -> None:
    _needs_kernels(case)
    _check_merged(_run(benchmark, case, method, lambda: MERGES[method](case)), case)


# ---- plain-torch references ------------------------------------------------------------------
# (id, benchmark group, call, rounds); the argsort reference sorts every task vector in full.
REFERENCES = [
    ("ta_torch", "ta", lambda c: ta_torch(c.base, c.finetuned), ROUNDS),
    ("ties_kthvalue", "ties", lambda c: ties_kthvalue(c.base, c.finetuned, TIES_DENSITY), ROUNDS),
    ("ties_argsort", "ties", lambda c: ties_argsort(c.base, c.finetuned, TIES_DENSITY), SLOW_ROUNDS),
    ("dare_bernoulli", "dare", lambda c: dare_bernoulli(c.base, c.finetuned, DARE_DROP), ROUNDS),
]


@pytest.mark.parametrize(
    ("group", "reference", "rounds"), [r[1:] for r in REFERENCES], ids=[r[0] for r in REFERENCES]
)
def test_reference(benchmark, case: Case, group: str, reference, rounds: int) -> None:
    out = _run(benchmark, case, group, lambda: reference(case), rounds=rounds, warmup=1 if rounds > 1 else 0)
    _check_merged(out, case)
