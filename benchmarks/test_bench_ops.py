"""pytest-benchmark suite: every mergekernels op and method next to its plain-torch reference.

Run with ``pytest benchmarks --benchmark-enable`` (pyproject disables benchmarks by default, so a
plain ``pytest benchmarks`` only runs each function once as a smoke test). Sizes: CPU 8 x 2048x4096
bf16, CUDA 8 x 4096x11008 bf16; override with MK_BENCH_K and MK_BENCH_SHAPE (e.g. ``256x512``).
The cases (calls, parameters, references, byte counts) are ``mergekernels bench``'s
(:mod:`mergekernels.bench.cases`). Results of one device and case share a benchmark group, e.g.
``cpu:ties``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import mergekernels as mk
from mergekernels.bench.cases import Case, bytes_moved, elementwise_cases
from mergekernels.bench.inputs import bench_size, make_inputs
from mergekernels.bench.runner import available_ops
from mergekernels.bench.timing import synchronize

DTYPE = torch.bfloat16
ROUNDS = 3
SLOW_ROUNDS = 1  # the argsort reference sorts every task vector in full

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
    ),
]
# The element-wise cases of `mergekernels bench` (ACE has its own suite, test_bench_ace.py).
CASES = elementwise_cases([op for op in available_ops() if op not in ("ace", "stream")], mk.METHODS)
MERGES = ("ta", "ties", "dare", "dare_ties", "breadcrumbs", "della", "awd")


@dataclass
class Inputs:
    """One set of benchmark inputs."""

    device: torch.device
    base: torch.Tensor
    finetuned: list[torch.Tensor]

    @property
    def k(self) -> int:
        return len(self.finetuned)


@pytest.fixture(scope="module", params=DEVICES)
def inputs(request: pytest.FixtureRequest) -> Inputs:
    device = torch.device(request.param)
    k, shape = bench_size(device)
    base, finetuned = make_inputs(k, shape, DTYPE, device, seed=0)
    return Inputs(device, base, finetuned)


def _run(
    benchmark, inputs: Inputs, case: Case, fn: Callable[[], object], rounds: int = ROUNDS, warmup: int = 1
) -> object:
    """Benchmark `fn` (synchronised on CUDA), tagging it with the bytes the case must move."""
    nbytes = bytes_moved(case.method, inputs.k, inputs.base.numel(), inputs.base.element_size())
    benchmark.group = f"{inputs.device.type}:{case.name}"
    benchmark.extra_info.update(
        k=inputs.k, shape="x".join(map(str, inputs.base.shape)), dtype=str(DTYPE), bytes_moved=nbytes
    )

    def call() -> object:
        out = fn()
        synchronize(inputs.device)
        return out

    result = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)
    return result


def _check(out: object, case: Case, inputs: Inputs) -> None:
    if case.name in MERGES:
        assert isinstance(out, torch.Tensor)
        assert out.shape == inputs.base.shape and out.dtype == inputs.base.dtype
    elif case.name == "threshold":
        assert out.shape == (inputs.k,)
    elif case.name == "masked_drop":
        assert out.shape == inputs.base.shape and out.dtype == torch.float32
    elif case.name == "stats":
        assert out.gram.shape == (inputs.k, inputs.k)


@pytest.mark.parametrize("case", CASES, ids=[c.ours.name for c in CASES])
def test_ours(benchmark, inputs: Inputs, case: Case) -> None:
    if inputs.device.type == "cuda" and not mk.has_cuda_kernels():
        pytest.skip("mergekernels was built without CUDA kernels")
    out = _run(benchmark, inputs, case, lambda: case.ours.fn(inputs.base, inputs.finetuned))
    _check(out, case, inputs)


REFERENCES = [(c, r) for c in CASES for r in c.references]


@pytest.mark.parametrize(("case", "reference"), REFERENCES, ids=[r.name for _, r in REFERENCES])
def test_reference(benchmark, inputs: Inputs, case: Case, reference) -> None:
    rounds = SLOW_ROUNDS if reference.slow else ROUNDS
    out = _run(
        benchmark,
        inputs,
        case,
        lambda: reference.fn(inputs.base, inputs.finetuned),
        rounds=rounds,
        warmup=0 if reference.slow else 1,
    )
    _check(out, case, inputs)
