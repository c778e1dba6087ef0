"""End-to-end checkpoint merges against the I/O floor, on generated Llama-shaped checkpoints.

Usage::

    python benchmarks/bench_engine.py [--dir DIR] [--layers 8] [--hidden 1024] [--experts 3]
                                      [--methods task_arithmetic ties dare_ties breadcrumbs della]
                                      [--dtypes bfloat16 float32] [--repeats 3] [--device cpu]

The script writes a base and ``--experts`` fine-tuned checkpoints (bf16, sharded safetensors with an
index, HF layout; about 340 MB per model at the defaults) once into ``--dir``, then, in one run:

- the I/O floor: reading every byte of every input tensor once (safetensors' file map, one
  reduction, no copy) and writing a model-sized output in shards (what any merge tool must do at
  least), timed the same way, once as is and once with each shard fsynced (what the engine must do
  before it names a shard finished); the fastest of ``--repeats`` runs (the first run in a process
  pays for warming up and was once taken for the floor, which made every ratio look 2-4x better);
- for each method and each ``--dtypes`` entry (the YAML's ``dtype``: the arithmetic's precision;
  the output stays bf16 through ``out_dtype``), ``mergekernels merge`` in a fresh subprocess, the
  fastest of ``--repeats``: time inside the merge, the ratio to both floors, end-to-end GB/s, and
  the subprocess's peak RSS (with the bound the engine promises: (K + 2) x the largest tensor + 2
  shard buffers + 300 MB; with ``dtype: float32`` a method that widens its inputs holds float32
  copies, twice that).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

# Checkpoint generation and the I/O floor are mergekernels.bench's (the streaming case of
# `mergekernels bench` uses them too).
from mergekernels.bench.checkpoints import DEFAULT_SHARD_BYTES as SHARD_BYTES
from mergekernels.bench.checkpoints import ModelSize, cached_models, io_floor, layer_shapes, write_model

__all__ = ["SHARD_BYTES", "io_floor", "layer_shapes", "main", "run_merge", "write_model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/mk-bench-engine")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument(
        "--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della"]
    )
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    size = ModelSize(args.layers, args.hidden, args.inter, args.vocab)
    root = Path(args.dir)
    models = cached_models(root, size, args.experts)
    shapes = size.shapes()
    model_bytes = sum(2 * torch.Size(s).numel() for s in shapes.values())
    largest = max(2 * torch.Size(s).numel() for s in shapes.values())
    working_bound = (args.experts + 2) * largest + 2 * SHARD_BYTES
    bound = working_bound + 300 * 1024**2
    print(
        f"{len(shapes)} tensors, {model_bytes / 1e6:.0f} MB per model, "
        f"largest tensor {largest / 1e6:.0f} MB; RSS bound (K+2) x largest + 2 shards + 300 MB = "
        f"{bound / 1e6:.0f} MB, of which the merge's own working set {working_bound / 1e6:.0f} MB"
    )

    floor = min(io_floor(models, root / "floor-out") for _ in range(args.repeats))
    durable = min(io_floor(models, root / "floor-out", durable=True) for _ in range(args.repeats))
    rows = [
        {"method": "I/O floor", "seconds": floor},
        {"method": "I/O floor, shards fsynced", "seconds": durable, "vs_floor": durable / floor},
    ]
    params = {"ties": {"density": 0.3}, "dare_ties": {"drop": 0.9}, "dare_linear": {"drop": 0.9}}
    for method in args.methods:
        for dtype in args.dtypes:
            cfg = {
                "merge_method": method,
                "dialect": "mergekernels",
                "base_model": str(models[0]),
                "models": [{"model": str(m)} for m in models[1:]],
                "dtype": dtype,
                "out_dtype": "bfloat16",
                "options": {"shard_size": SHARD_BYTES},
            }
            if method in params:
                cfg["parameters"] = params[method]
            runs = [run_merge(root, f"{method}-{dtype}", cfg, args.device) for _ in range(args.repeats)]
            seconds, wall, report = min(runs, key=lambda r: r[0])
            moved = model_bytes * (len(models) + 1)
            rows.append(
                {
                    "method": f"{method} ({'fp32' if dtype == 'float32' else 'bf16'})",
                    "seconds": seconds,
                    "wall": wall,
                    "vs_floor": seconds / floor,
                    "gb_per_s": moved / seconds / 1e9,
                    "peak_rss_mb": max(r[2]["peak_rss_bytes"] for r in runs) / 1e6,
                    "start_rss_mb": report["start_rss_bytes"] / 1e6,
                    "phases": report["seconds"],
                }
            )
    print(
        "\n| method | seconds | × I/O floor | × fsynced floor | GB/s end to end | peak RSS (MB) "
        "| RSS before the merge (MB) | working set (MB) |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        if "gb_per_s" in r:
            working = r["peak_rss_mb"] - r["start_rss_mb"]
            extra = (
                f"{r['seconds'] / floor:.2f}× | {r['seconds'] / durable:.2f}× | {r['gb_per_s']:.2f} "
                f"| {r['peak_rss_mb']:.0f} | {r['start_rss_mb']:.0f} | {working:.0f}"
            )
        else:
            extra = f"{r['seconds'] / floor:.2f}× | {r['seconds'] / durable:.2f}× | — | — | — | —"
        print(f"| {r['method']} | {r['seconds']:.2f} | {extra} |")
    print(
        "\n(seconds: the merge inside its own `mergekernels merge` process, from the report; the process's"
        " wall time, with Python and torch start-up, is in --json; RSS before the merge: the interpreter,"
        " torch and mergekernels imported)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bound_bytes": bound}, indent=2))


def run_merge(root: Path, name: str, cfg: dict, device: str) -> tuple[float, float, dict]:
    """One ``mergekernels merge`` in a fresh process: (seconds inside the merge, wall seconds with
    start-up, the merge's report). Its output is deleted before and after, so only one is ever on
    disk."""
    cfg_path, out, report_file = root / f"{name}.json", root / f"out-{name}", root / f"{name}.report.json"
    cfg_path.write_text(json.dumps(cfg))
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "mergekernels", "merge", str(cfg_path), str(out)]
    command += ["--quiet", "--device", device, "--report", str(report_file)]
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - t0
    report = json.loads(report_file.read_text())
    shutil.rmtree(out)
    return report["seconds"]["total"], wall, report  # total: in the merge process, no start-up


if __name__ == "__main__":
    main()
