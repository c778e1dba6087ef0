"""WUDI: the loss the exact closed form reaches next to the paper's iterative reference (Adam, lr 1e-5,
300 steps from sum_t tau_t), and the time each takes, on fresh random task vectors.

Usage: python benchmarks/wudi_loss.py [--device cpu|cuda] [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import torch

from mergekernels.methods.wudi import wudi_batched

# (layers, rows, cols, experts): wide, tall and square layers.
CASES = [(2, 256, 512, 3), (2, 512, 256, 4), (1, 768, 768, 7)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    print("| L x m x n | T | closed-form loss | time | Adam loss | time |\n|---|---:|---:|---:|---:|---:|")
    for layers, m, n, experts in CASES:
        base = torch.randn(layers, m, n, generator=g)
        fts = [base + 0.01 * (1 + t) * torch.randn(layers, m, n, generator=g) for t in range(experts)]
        base, fts = base.to(args.device), [x.to(args.device) for x in fts]
        row = []
        for solver in ("closed_form", "adam"):
            t0 = time.perf_counter()
            _, loss = wudi_batched(base, fts, solver=solver, steps=args.steps, return_loss=True)
            if base.is_cuda:
                torch.cuda.synchronize()
            row.append(f"{loss.max().item():.4g} | {time.perf_counter() - t0:.3f} s")
        print(f"| {layers} x {m} x {n} | {experts} | {row[0]} | {row[1]} |")


if __name__ == "__main__":
    main()
