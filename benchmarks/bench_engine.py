"""End-to-end checkpoint merges against the I/O floor, on generated Llama-shaped checkpoints.

Usage::

    python benchmarks/bench_engine.py [--dir DIR] [--layers 8] [--hidden 1024] [--experts 3]
                                      [--methods task_arithmetic ties dare_ties] [--device cpu]

The script writes a base and ``--experts`` fine-tuned checkpoints (bf16, sharded safetensors with an
index, HF layout; about 340 MB per model at the defaults) once into ``--dir``, then, in one run:

- the I/O floor: reading every input tensor with safetensors and writing a model-sized output in
  shards (what any merge tool must do at least), timed the same way;
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
from safetensors import safe_open
from safetensors.torch import save_file

SHARD_BYTES = 200 * 1024**2


def layer_shapes(hidden: int, inter: int, vocab: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_model(directory: Path, shapes: dict, seed: int, base: Path | None) -> None:
    """One model, sharded; experts are the base plus a small random delta (read back shard by shard)."""
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    weight_map, shard, size, files = {}, {}, 0, []

    def flush():
        nonlocal shard, size
        if shard:
            name = f"part-{len(files):03d}.safetensors"
            save_file(shard, str(directory / name))
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    handles = {}
    if base is not None:
        index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    for name, shape in shapes.items():
        if base is None:
            t = torch.randn(shape, generator=g) * 0.02
        else:
            f = index[name]
            if f not in handles:
                handles[f] = safe_open(str(base / f), framework="pt")
            t = handles[f].get_tensor(name).float() + torch.randn(shape, generator=g) * 0.002
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": shape[0]}))


def io_floor(models: list[Path], out: Path) -> float:
    """Read every tensor of every input (one at a time, as a streaming merge holds them) and write a
    model-sized output in shards: the least any merge tool does."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    shard, size, n = {}, 0, 0
    for i, m in enumerate(models):
        index = json.loads((m / "model.safetensors.index.json").read_text())["weight_map"]
        for f in sorted(set(index.values())):
            with safe_open(str(m / f), framework="pt") as h:
                for k in h.keys():
                    t = h.get_tensor(k).clone()  # get_tensor alone maps the file without reading it
                    if i == 0:  # the output is one model's worth of tensors
                        shard[k] = t
                        size += t.numel() * t.element_size()
                        if size >= SHARD_BYTES:
                            save_file(shard, str(out / f"floor-{n}.safetensors"))
                            shard, size, n = {}, 0, n + 1
    if shard:
        save_file(shard, str(out / f"floor-{n}.safetensors"))
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out)
    return elapsed


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

    root = Path(args.dir)
    shapes = layer_shapes(args.hidden, args.inter, args.vocab, args.layers)
    tag = f"l{args.layers}-h{args.hidden}-i{args.inter}-v{args.vocab}-k{args.experts}"
    models = [root / tag / "base"] + [root / tag / f"expert{i}" for i in range(args.experts)]
    if not (models[-1] / "model.safetensors.index.json").exists():
        shutil.rmtree(root / tag, ignore_errors=True)
        print(f"writing {len(models)} checkpoints to {root / tag} ...", flush=True)
        write_model(models[0], shapes, 0, None)
        for i, m in enumerate(models[1:]):
            write_model(m, shapes, i + 1, models[0])
    model_bytes = sum(2 * torch.Size(s).numel() for s in shapes.values())
    largest = max(2 * torch.Size(s).numel() for s in shapes.values())
    bound = (args.experts + 2) * largest + 2 * SHARD_BYTES + 300 * 1024**2
    print(
        f"{len(shapes)} tensors, {model_bytes / 1e6:.0f} MB per model, "
        f"largest tensor {largest / 1e6:.0f} MB; "
        f"RSS bound (K+2) x largest + 2 shards + 300 MB = {bound / 1e6:.0f} MB"
    )

    floor = io_floor(models, root / "floor-out")
    rows = [{"method": "I/O floor", "seconds": floor}]
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
            }
        )
        shutil.rmtree(out)
    print("\n| method | seconds | × I/O floor | GB/s end to end | peak RSS (MB) |\n|---|---:|---:|---:|---:|")
    for r in rows:
        extra = (
            f"{r['vs_floor']:.2f}× | {r['gb_per_s']:.2f} | {r['peak_rss_mb']:.0f}"
            if "vs_floor" in r
            else "1.00× | — | —"
        )
        print(f"| {r['method']} | {r['seconds']:.2f} | {extra} |")
    print(
        "\n(seconds: the merge inside its own `mergekernels merge` process, from the report; the process's"
        " wall time, with Python and torch start-up, is in --json)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bound_bytes": bound}, indent=2))


if __name__ == "__main__":
    main()
