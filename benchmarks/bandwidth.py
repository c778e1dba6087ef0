"""Achieved memory bandwidth of every mergekernels op and method next to plain-torch references.

Usage::

    python benchmarks/bandwidth.py [--device cpu|cuda] [--k 8] [--shape 2048x4096] [--dtype bf16]
                                   [--repeats N] [--skip-slow] [--json FILE]

Measures the copy bandwidth once, then times each op, method and reference on the same inputs and
prints a markdown table: median time and spread, the minimum bytes the algorithm must move
(:func:`bench_common.bytes_moved`), achieved GB/s, its fraction of the copy bandwidth, our speed-up
over the matching torch reference and how closely our result agrees with it.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from bench_common import (
    DTYPES,
    Timing,
    bench_size,
    bytes_moved,
    device_name,
    make_inputs,
    measure_copy_bandwidth,
    parse_shape,
    report,
    time_fn,
)
from references import dare_bernoulli, ta_torch, ties_argsort, ties_kthvalue

import mergekernels as mk

TIES_DENSITY = 0.2
DARE_DROP = 0.9
KEY = "model.layers.0.mlp.up_proj.weight"


@dataclass
class Bench:
    """One timed callable."""

    name: str
    impl: str  # "mergekernels" or "torch"
    method: str  # byte-counting class, see bench_common.bytes_moved
    fn: Callable[[], object]
    slow: bool = False


@dataclass
class Row:
    """One line of the report."""

    name: str
    impl: str
    method: str
    median_ms: float
    min_ms: float
    max_ms: float
    mbytes: float
    gbps: float
    copy_fraction: float
    speedup: dict[str, float] = field(default_factory=dict)
    check: list[str] = field(default_factory=list)


class Recorder:
    """Wraps a callable and keeps its last result (for the agreement checks)."""

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn
        self.last: object = None

    def __call__(self) -> object:
        self.last = self.fn()
        return self.last


def benches(base: torch.Tensor, finetuned: list[torch.Tensor], ours: bool) -> list[Bench]:
    """Our ops and methods (if `ours`), then the references, all on (base, finetuned)."""
    mine = [
        Bench("task_vector_stats", "mergekernels", "stats", lambda: mk.task_vector_stats(base, finetuned)),
        Bench(
            "magnitude_threshold",
            "mergekernels",
            "threshold",
            lambda: mk.magnitude_threshold(base, finetuned, TIES_DENSITY),
        ),
        Bench("task_arithmetic", "mergekernels", "ta", lambda: mk.task_arithmetic(base, finetuned)),
        Bench("ties", "mergekernels", "ties", lambda: mk.ties(base, finetuned, density=TIES_DENSITY)),
        Bench(
            "dare_linear",
            "mergekernels",
            "dare",
            lambda: mk.dare(base, finetuned, drop=DARE_DROP, seed=0, key=KEY),
        ),
        Bench(
            "dare_ties",
            "mergekernels",
            "dare_ties",
            lambda: mk.dare(base, finetuned, drop=DARE_DROP, seed=0, key=KEY, consensus="ties"),
        ),
        Bench(
            "breadcrumbs",
            "mergekernels",
            "breadcrumbs",
            lambda: mk.breadcrumbs(base, finetuned, density=0.9, gamma=0.01),
        ),
        Bench(
            "della",
            "mergekernels",
            "della",
            lambda: mk.della(base, finetuned, density=0.5, epsilon=0.15, seed=0, key=KEY),
        ),
    ]
    refs = [
        Bench("ta_torch", "torch", "ta", lambda: ta_torch(base, finetuned)),
        Bench("ties_kthvalue", "torch", "ties", lambda: ties_kthvalue(base, finetuned, TIES_DENSITY)),
        Bench(
            "ties_argsort", "torch", "ties", lambda: ties_argsort(base, finetuned, TIES_DENSITY), slow=True
        ),
        Bench("dare_bernoulli", "torch", "dare", lambda: dare_bernoulli(base, finetuned, DARE_DROP)),
    ]
    return (mine if ours else []) + refs


# Our method -> the references it is compared with, and how: "exact" results should agree up to
# rounding (and, for TIES, ties of |tau| at the cut); "random" ones only in distribution.
COMPARISONS: dict[str, list[tuple[str, str]]] = {
    "task_arithmetic": [("ta_torch", "exact")],
    "ties": [("ties_kthvalue", "exact"), ("ties_argsort", "exact")],
    "dare_linear": [("dare_bernoulli", "random")],
}


def agreement(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, mode: str) -> str:
    """'exact': max |ours - ref| and how many entries differ; 'random': ||ours - base|| / ||ref - base||."""
    if mode == "exact":
        diff = (ours.float() - ref.float()).abs()
        return f"max abs diff {diff.max().item():.2e} ({int((diff > 0).sum().item())} differ)"
    delta_ours = (ours.float() - base.float()).norm().item()
    delta_ref = (ref.float() - base.float()).norm().item()
    return f"‖Δ‖ ratio {delta_ours / delta_ref:.4f}" if delta_ref > 0 else "‖Δ‖ ratio n/a"


def run(args: argparse.Namespace) -> tuple[dict, list[Row]]:
    device = torch.device(args.device)
    default_k, default_shape = bench_size(device)
    k = args.k if args.k is not None else default_k
    shape = parse_shape(args.shape) if args.shape else default_shape
    dtype = DTYPES[args.dtype]
    ours = device.type == "cpu" or mk.has_cuda_kernels()

    copy_gbps = measure_copy_bandwidth(device)
    base, finetuned = make_inputs(k, shape, dtype, device, seed=args.seed)
    numel, itemsize = base.numel(), base.element_size()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "k": k,
        "shape": list(shape),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "copy_gbps": copy_gbps,
        "mergekernels": ours,
    }

    rows: dict[str, Row] = {}
    outputs: dict[str, object] = {}
    for bench in benches(base, finetuned, ours):
        if bench.slow and args.skip_slow:
            continue
        recorder = Recorder(bench.fn)
        repeats, warmup = (min(args.repeats, 2), 0) if bench.slow else (args.repeats, 1)
        timing: Timing = time_fn(recorder, repeats=repeats, warmup=warmup, device=device)
        outputs[bench.name] = recorder.last
        nbytes = bytes_moved(bench.method, k, numel, itemsize)
        gbps = nbytes / timing.median / 1e9
        rows[bench.name] = Row(
            bench.name,
            bench.impl,
            bench.method,
            timing.median * 1e3,
            timing.min * 1e3,
            timing.max * 1e3,
            nbytes / 1e6,
            gbps,
            gbps / copy_gbps,
        )
        print(f"  {bench.name:<20} {timing.median * 1e3:10.2f} ms", flush=True)

    for name, refs in COMPARISONS.items():
        if name not in rows:
            continue
        for ref, mode in refs:
            if ref not in rows:
                continue
            rows[name].speedup[ref] = rows[ref].median_ms / rows[name].median_ms
            rows[name].check.append(f"vs {ref}: {agreement(outputs[name], outputs[ref], base, mode)}")
    return meta, list(rows.values())


def render(meta: dict, rows: list[Row]) -> str:
    """The header line and the markdown table."""
    shape = "x".join(map(str, meta["shape"]))
    lines = [
        f"{meta['date']} | {meta['device']} | torch {meta['torch']} | threads {meta['threads']} | "
        f"K={meta['k']} x {shape} {meta['dtype']} | copy bandwidth {meta['copy_gbps']:.1f} GB/s",
    ]
    if not meta["mergekernels"]:
        lines.append("(mergekernels has no CUDA kernels in this build: references only)")
    lines += [
        "",
        "| op | impl | median ms | min-max ms | MB moved | GB/s | % copy BW | speed-up | agreement |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        speedup = ", ".join(f"{s:.1f}x vs {ref}" for ref, s in r.speedup.items())
        lines.append(
            f"| {r.name} | {r.impl} | {r.median_ms:.2f} | {r.min_ms:.2f}-{r.max_ms:.2f} | "
            f"{r.mbytes:.1f} | {r.gbps:.2f} | {100 * r.copy_fraction:.1f}% | {speedup} | "
            f"{'; '.join(r.check)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--k", type=int, default=None, help="fine-tuned tensors (default 8 or MK_BENCH_K)")
    parser.add_argument(
        "--shape", default=None, help="tensor shape, e.g. 2048x4096 (default per device, or MK_BENCH_SHAPE)"
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per op (slow references: <= 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-slow", action="store_true", help="skip the argsort TIES reference")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the rows to FILE")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")

    meta, rows = run(args)
    report(meta, rows, render, args.json)


if __name__ == "__main__":
    main()
