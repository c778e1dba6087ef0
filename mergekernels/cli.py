"""Command line: ``mergekernels <command>``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    demo.run(num_experts=args.experts, layers=args.layers, device=args.device, repeats=args.repeats)
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _ops

    print(f"mergekernels {__version__}, torch {torch.__version__}")
    print(f"CUDA kernels built: {_ops.has_cuda_kernels()}; CUDA device visible: {torch.cuda.is_available()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mergekernels", description="Fast model merging kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="merge a synthetic model with every method and print a report")
    p.add_argument("--experts", type=int, default=4, help="number of fine-tuned models (default 4)")
    p.add_argument(
        "--layers", type=int, default=4, help="transformer layers in the synthetic model (default 4)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median reported)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("info", help="print the build and device configuration")
    p.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
