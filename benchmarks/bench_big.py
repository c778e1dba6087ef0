"""A 7B-shaped merge on this machine: wall time, peak RSS and the ratio to the I/O floor, with a cold
and a warm page cache.

Usage::

    python benchmarks/bench_big.py [--dir DIR] [--layers 16] [--experts 2]
                                   [--methods task_arithmetic ties] [--caches cold warm]
                                   [--shard-size 1GB] [--json FILE]

The inputs are Llama-7B-shaped bf16 checkpoints truncated to ``--layers`` blocks (hidden 4096,
intermediate 11008, vocabulary 32000: about 7 GB each at 16 layers): a base and ``--experts``
fine-tuned models, sharded like a hub checkpoint (2 GB safetensors shards and an index), written
once under ``--dir`` and reused. Not part of CI: it needs about (experts + 2) x 7 GB of disk, which
is checked before anything is written, and one merge output at a time (each run's output is
deleted before the next starts).

For each cache state: the inputs read once in order with plain 64 MB reads (no output: the disk's
share alone), the I/O floor (every input byte read once from the file map, a model-sized output
written in shards and fsynced, one step after the other: what any merge must do, see
:func:`mergekernels.bench.checkpoints.io_floor`; a merge that overlaps its reads, compute and writes
can beat it on a cold cache) and each method's ``mergekernels merge`` in a fresh process under the
same state:

- ``cold``: after a ``sync``, the inputs' pages are dropped from the page cache with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed; the same effect as dropping the caches
  for these files), so every byte comes from the disk;
- ``warm``: every input file is read once first. At the defaults the inputs (21 GB) and the output
  (7 GB) do not all fit in the page cache of a 24 GB machine, so a warm run still reads part of its
  inputs from the disk: what stays cached is what the kernel kept, the same for the floor and the
  merge.

Peak RSS is the merge process's VmHWM (file pages mapped by the reader count in it); the engine's
bound is (K + 2) x the largest tensor + 2 output shards + the interpreter and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import run_merge  # noqa: E402
from bench_mergekit import warm_page_cache  # noqa: E402

from mergekernels.bench.checkpoints import ModelSize, io_floor, write_models  # noqa: E402
from mergekernels.config import parse_size  # noqa: E402

INPUT_SHARD_BYTES = 2 * 1024**3  # hub checkpoints of this size use 2-5 GB shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/mk-bench-big")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=["task_arithmetic", "ties"])
    parser.add_argument("--caches", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    parser.add_argument("--shard-size", default="1GB", help="output shard size (two are held in memory)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    size = ModelSize(args.layers, args.hidden, args.inter, args.vocab)
    model_bytes = 2 * size.numel()
    root = Path(args.dir)
    models = cached_big_models(root, size, args.experts, model_bytes)
    out = root / "out"
    shard_bytes = parse_size(args.shard_size, "--shard-size")
    inputs = input_files(models)
    print(
        f"{len(models)} models of {model_bytes / 1e9:.2f} GB ({len(inputs)} input shards); output shards "
        f"of {shard_bytes / 1e9:.2f} GB",
        flush=True,
    )

    rows = []
    for cache in args.caches:
        prepare_cache(cache, models)
        read = read_inputs(models)
        rows.append({"cache": cache, "method": "inputs read in order (os.read, no output)", "seconds": read})
        prepare_cache(cache, models)
        floor = io_floor(models, out, shard_bytes, durable=True)
        rows.append({"cache": cache, "method": "I/O floor (fsynced)", "seconds": floor})
        print(f"{cache}: inputs read {read:.2f} s, I/O floor {floor:.2f} s", flush=True)
        for method in args.methods:
            prepare_cache(cache, models)
            seconds, wall, report = merge(root, models, method, shard_bytes)
            rows.append(
                {
                    "cache": cache,
                    "method": method,
                    "seconds": seconds,
                    "wall": wall,
                    "vs_floor": seconds / floor,
                    "peak_rss_mb": report["peak_rss_bytes"] / 1e6,
                    "gb_per_s": (report["bytes_read"] + report["bytes_written"]) / seconds / 1e9,
                    "phases": report["seconds"],
                }
            )
            print(f"{cache}: {method} {seconds:.2f} s ({seconds / floor:.2f}x the floor)", flush=True)

    print("\n| cache | method | seconds | × I/O floor | GB/s end to end | peak RSS (MB) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "vs_floor" in r:
            print(
                f"| {r['cache']} | {r['method']} | {r['seconds']:.2f} | {r['vs_floor']:.2f}× "
                f"| {r['gb_per_s']:.2f} | {r['peak_rss_mb']:.0f} |"
            )
        else:
            floor = next(x["seconds"] for x in rows if x["cache"] == r["cache"] and "floor" in x["method"])
            print(
                f"| {r['cache']} | {r['method']} | {r['seconds']:.2f} | {r['seconds'] / floor:.2f}× | — | — |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"model_bytes": model_bytes, "rows": rows}, indent=2))


def cached_big_models(root: Path, size: ModelSize, experts: int, model_bytes: int) -> list[Path]:
    """[base, expert0, ...] under ``root/<size tag>``, written once; refuses to start when the disk
    cannot hold them and one output."""
    tag = f"l{size.layers}-h{size.hidden}-i{size.inter}-v{size.vocab}-k{experts}"
    models = [root / tag / "base"] + [root / tag / f"expert{i}" for i in range(experts)]
    if (models[-1] / "model.safetensors.index.json").exists():
        return models
    shutil.rmtree(root / tag, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    need = (experts + 2) * model_bytes + 1024**3
    free = shutil.disk_usage(root).free
    if free < need:
        sys.exit(
            f"bench_big: {root} has {free / 1e9:.1f} GB free; "
            f"the inputs and one output need {need / 1e9:.1f} GB"
        )
    print(f"writing {experts + 1} checkpoints of {model_bytes / 1e9:.1f} GB to {root / tag} ...", flush=True)
    t0 = time.perf_counter()
    write_models(root / tag, size, experts, dtype=torch.bfloat16, shard_bytes=INPUT_SHARD_BYTES)
    print(f"written in {time.perf_counter() - t0:.0f} s", flush=True)
    return models


def read_inputs(models: list[Path]) -> float:
    """Seconds to read the models' files one after another in 64 MB reads: the disk's share of any
    merge."""
    t0 = time.perf_counter()
    warm_page_cache(models)
    return time.perf_counter() - t0


def prepare_cache(cache: str, models: list[Path]) -> None:
    """``cold``: the models' file pages dropped from the page cache; ``warm``: every file read once."""
    os.sync()
    if cache == "warm":
        warm_page_cache(models)
        return
    for f in input_files(models):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def input_files(models: list[Path]) -> list[Path]:
    return [f for m in models for f in sorted(m.glob("*.safetensors"))]


def merge(root: Path, models: list[Path], method: str, shard_bytes: int):
    """A merge of the models by ``method`` (TIES at density 0.3) in a fresh process, as
    :func:`bench_engine.run_merge` times it."""
    cfg = {
        "merge_method": method,
        "dialect": "mergekernels",
        "base_model": str(models[0]),
        "models": [{"model": str(m)} for m in models[1:]],
        "options": {"shard_size": shard_bytes},
    }
    if method == "ties":
        cfg["parameters"] = {"density": 0.3}
    return run_merge(root, method, cfg, "cpu")


if __name__ == "__main__":
    main()
