"""One checkpoint merge on the GPU, compared byte for byte with the same merge on the CPU.

Usage::

    python benchmarks/device_merge_check.py [--dir DIR] [--layers 4] [--hidden 512] [--experts 3]
                                            [--methods ties dare_ties] [--json FILE]

Writes a Llama-shaped base and ``--experts`` fine-tuned checkpoints (bf16, sharded safetensors, HF
layout), runs ``mergekernels merge --device cuda`` and ``--device cpu`` on the same configuration for
each method, and compares every output file by SHA-256. The masks and thresholds are the same bits on
both devices by design, so any difference is a bug. Exits non-zero on a difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mergekernels.bench.checkpoints import ModelSize, write_models

PARAMS = {
    "task_arithmetic": {"weight": 0.5},
    "ties": {"density": 0.3, "weight": 1.0},
    "dare_ties": {"density": 0.4, "weight": 1.0},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05, "weight": 1.0},
    "della": {"density": 0.5, "epsilon": 0.1, "weight": 1.0},
}


def digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()
    }


def merge(config: Path, out: Path, device: str) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "mergekernels", "merge", str(config), str(out), "--device", device]
    subprocess.run(cmd + ["--quiet", "--overwrite"], check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="device_merge_models", help="where the checkpoints and outputs go")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["ties", "dare_ties"], choices=sorted(PARAMS))
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument(
        "--devices", nargs=2, default=["cuda", "cpu"], metavar=("A", "B"), help="the two devices compared"
    )
    args = ap.parse_args()

    root = Path(args.dir)
    size = ModelSize(layers=args.layers, hidden=args.hidden, inter=args.hidden * 11 // 4, vocab=4099)
    models = [root / "base"] + [root / f"expert{i}" for i in range(args.experts)]
    if not (models[-1] / "model.safetensors.index.json").exists():
        write_models(root, size, args.experts, dtype=torch.bfloat16, shard_bytes=32 * 1024**2)
    results, ok = [], True
    for method in args.methods:
        config = root / f"{method}.json"
        config.write_text(
            json.dumps(
                {
                    "merge_method": method,
                    "base_model": str(models[0]),
                    "models": [{"model": str(m)} for m in models[1:]],
                    "parameters": PARAMS[method],
                    "options": {"shard_size": 16 * 1024**2},
                }
            )
        )
        # One output name under a folder per device: the model card names the output directory.
        outs = [root / f"{i}-{device}" / f"out-{method}" for i, device in enumerate(args.devices)]
        seconds = [merge(config, out, device) for out, device in zip(outs, args.devices, strict=True)]
        a, b = digests(outs[0]), digests(outs[1])
        differ = sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))
        ok &= not differ
        times = dict(zip(args.devices, seconds, strict=True))
        results.append({"method": method, "files": len(b), "differ": differ, "seconds": times})
        verdict = "identical" if not differ else f"DIFFER: {', '.join(differ)}"
        timing = ", ".join(f"{d} {s:.1f} s" for d, s in zip(args.devices, seconds, strict=True))
        print(f"{method:16s} {len(b)} files {verdict}  ({timing})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
