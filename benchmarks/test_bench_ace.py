"""pytest-benchmark suite for ACE-Merging: ours (``ace_batched``) vs the authors' reference-style loop.

Run with ``pytest benchmarks/test_bench_ace.py --benchmark-enable`` (pyproject disables benchmarks by
default, so a plain run calls each function once as a smoke test). Inputs: the ``gpt2`` preset of
mergekernels.bench (as in bench_ace.py) on the CPU (768x768, 3072x768, 768x3072 fp32, 7 experts
whose energies are spread so the gate fires), gate forced off and on. ``MK_BENCH_ACE_SCALE_DOWN=D``
divides every dimension by D.
Results of one gate setting share a benchmark group, e.g. ``cpu:ace-gate-on``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from mergekernels.bench.cases import ACE_PARAMS, PRESETS, ace_flops
from mergekernels.bench.cases import make_ace_group as make_group
from mergekernels.bench.references import ace_reference_style
from mergekernels.methods.ace import ace_batched

ROUNDS = 2
PRESET = "gpt2"
DEVICE = torch.device("cpu")
GATES = ("off", "on")

Groups = list[tuple[torch.Tensor, list[torch.Tensor]]]


@pytest.fixture(scope="module")
def groups() -> Groups:
    """One (base [L, m, n], T fine-tuned) pair per shape group of the preset."""
    experts, shapes = PRESETS[PRESET].ace_experts, PRESETS[PRESET].ace_groups
    scale_down = int(os.environ.get("MK_BENCH_ACE_SCALE_DOWN", "1"))
    return [
        make_group(layers, max(1, m // scale_down), max(1, n // scale_down), experts, DEVICE, seed=i)
        for i, (layers, m, n) in enumerate(shapes)
    ]


def _params(gate: str) -> dict:
    return dict(ACE_PARAMS, gate=gate)


def _ours(groups: Groups, gate: str) -> list[torch.Tensor]:
    """One ``ace_batched`` call per shape group."""
    return [ace_batched(base, finetuned, **_params(gate))[0] for base, finetuned in groups]


def _reference_style(groups: Groups, gate: str) -> list[torch.Tensor]:
    """The per-tensor, per-expert loop over every layer."""
    out = []
    for base, finetuned in groups:
        layers = ace_reference_style(
            list(base.unbind(0)), [list(ft.unbind(0)) for ft in finetuned], **_params(gate)
        )
        out.append(torch.stack(layers))
    return out


def _run(benchmark, groups: Groups, gate: str, impl: str, fn: Callable[[], list[torch.Tensor]]) -> None:
    benchmark.group = f"{DEVICE.type}:ace-gate-{gate}"
    experts = len(groups[0][1])
    # What the package computes for these inputs (the same for both impls, so rates compare).
    flops = [
        (base.shape[0], ace_flops(base.shape[1], base.shape[2], experts, het=gate == "on"))
        for base, _ in groups
    ]
    benchmark.extra_info.update(
        impl=impl,
        experts=experts,
        shapes=["x".join(map(str, base.shape)) for base, _ in groups],
        gflop_ours_fp32=sum(layers * f32 for layers, (f32, _) in flops) / 1e9,
        gflop_ours_fp64=sum(layers * f64 for layers, (_, f64) in flops) / 1e9,
    )
    outputs = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    for out, (base, _) in zip(outputs, groups, strict=True):
        assert out.shape == base.shape and out.dtype == base.dtype
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("gate", GATES)
def test_ace_ours(benchmark, groups: Groups, gate: str) -> None:
    _run(benchmark, groups, gate, "mergekernels", lambda: _ours(groups, gate))


@pytest.mark.parametrize("gate", GATES)
def test_ace_reference_style(benchmark, groups: Groups, gate: str) -> None:
    _run(benchmark, groups, gate, "reference-style", lambda: _reference_style(groups, gate))
