"""End-to-end checkpoint merges against the I/O floor, on generated Llama-shaped checkpoints.

Usage::

    python benchmarks/bench_engine.py [--dir DIR] [--layers 8] [--hidden 1024] [--experts 3]
                                      [--methods task_arithmetic ties dare_ties] [--device cpu]

The script writes a base and ``--experts`` fine-tuned checkpoints (bf16, sharded safetensors with an
index, HF layout; about 340 MB per model at the defaults) once into ``--dir``, then, in one run:

- the I/O floor: reading every byte of every input tensor once (safetensors' file map, one
  reduction, no copy) and writing a model-sized output in shards (what any merge tool must do at
  least), timed the same way, once as is and once with each shard fsynced (what the engine must do
  before it names a shard finished);
- for each method, ``mergekernels merge`` in a fresh subprocess: wall time, the ratio to the floor,
  end-to-end GB/s, and the subprocess's peak RSS (with the bound the engine promises:
  (K + 2) x the largest tensor + 2 shard buffers + 300 MB).
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

__all__ = ["SHARD_BYTES", "io_floor", "layer_shapes", "main", "write_model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/mk-bench-engine")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties"])
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

    floor = io_floor(models, root / "floor-out")
    durable = io_floor(models, root / "floor-out", durable=True)
    rows = [
        {"method": "I/O floor", "seconds": floor},
        {"method": "I/O floor, shards fsynced", "seconds": durable, "vs_floor": durable / floor},
    ]
    params = {"ties": {"density": 0.2}, "dare_ties": {"drop": 0.9}, "dare_linear": {"drop": 0.9}}
    for method in args.methods:
        cfg = {
            "merge_method": method,
            "dialect": "mergekernels",
            "base_model": str(models[0]),
            "models": [{"model": str(m)} for m in models[1:]],
            "options": {"shard_size": SHARD_BYTES},
        }
        if method in params:
            cfg["parameters"] = params[method]
        cfg_path = root / f"{method}.json"
        cfg_path.write_text(json.dumps(cfg))
        out = root / f"out-{method}"
        report_file = root / f"{method}.report.json"
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mergekernels",
                "merge",
                str(cfg_path),
                str(out),
                "--overwrite",
                "--quiet",
                "--device",
                args.device,
                "--report",
                str(report_file),
            ],
            check=True,
        )
        wall = time.perf_counter() - t0
        report = json.loads(report_file.read_text())
        seconds = report["seconds"]["total"]  # in the merging process: no interpreter start-up
        moved = model_bytes * (len(models) + 1)
        rows.append(
            {
                "method": method,
                "seconds": seconds,
                "wall": wall,
                "vs_floor": seconds / floor,
                "gb_per_s": moved / seconds / 1e9,
                "peak_rss_mb": report["peak_rss_bytes"] / 1e6,
                "start_rss_mb": report["start_rss_bytes"] / 1e6,
            }
        )
        shutil.rmtree(out)
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


if __name__ == "__main__":
    main()
