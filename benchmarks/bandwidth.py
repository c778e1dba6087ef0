"""Achieved memory bandwidth of every mergekernels op and method next to plain-torch references.

Usage::

    python benchmarks/bandwidth.py [--device cpu|cuda] [--k 8] [--shape 2048x4096] [--dtype bf16]
                                   [--repeats N] [--skip-slow] [--ops OP ...] [--json FILE]

The memory-bound cases of ``mergekernels bench`` (the same code: :func:`mergekernels.bench.run`),
without ACE and the streaming merge: the copy bandwidth first, then each op, method and reference on
the same rotating inputs; a markdown table with the median time and spread, the minimum bytes the
algorithm must move (:func:`mergekernels.bench.bytes_moved`), achieved GB/s, its fraction of the
copy bandwidth, our speed-up over the matching torch reference ("no clear difference" within the
spread of the repeats) and how closely our result agrees with it.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mergekernels import bench

BANDWIDTH_OPS = [op for op in bench.available_ops() if op not in ("ace", "stream")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--k", type=int, default=None, help="fine-tuned tensors (default 8 or MK_BENCH_K)")
    parser.add_argument(
        "--shape", default=None, help="tensor shape, e.g. 2048x4096 (default per device, or MK_BENCH_SHAPE)"
    )
    parser.add_argument("--dtype", choices=tuple(bench.DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per op (slow references: <= 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-slow", action="store_true", help="skip the argsort TIES reference")
    parser.add_argument("--ops", nargs="+", default=BANDWIDTH_OPS, help=f"default: {' '.join(BANDWIDTH_OPS)}")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results to FILE")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")

    default_k, default_shape = bench.bench_size(args.device)
    try:
        results = bench.run(
            device=args.device,
            dtype=args.dtype,
            experts=args.k if args.k is not None else default_k,
            size=args.shape if args.shape else default_shape,
            ops=args.ops,
            repeats=args.repeats,
            seed=args.seed,
            slow_references=not args.skip_slow,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ValueError as exc:
        parser.error(str(exc))
    print()
    print(results.table())
    if args.json:
        results.write_json(args.json)


if __name__ == "__main__":
    main()
