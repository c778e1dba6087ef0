"""ACE-Merging: mergekernels' batched implementation next to the authors' reference-style loop.

Usage::

    python benchmarks/bench_ace.py [--device cpu|cuda] [--preset gpt2|llama-7b-block] [--experts T]
                                   [--gate auto [on off]] [--repeats N] [--tf32] [--scale-down D]
                                   [--no-check] [--json FILE]

Presets (one model block's weight matrices, fp32, grouped by shape as the package batches them):

- ``gpt2`` (CPU target): 768x768, 3072x768, 768x3072, 7 experts;
- ``llama-7b-block`` (H100 target): 4 x 4096x4096, 2 x 11008x4096, 1 x 4096x11008, 4 experts.

``--scale-down D`` divides every dimension by D (quick runs). Inputs are fresh random fp32:
theta_0 ~ N(0, 0.02) and tau_t ~ N(0, 10**t / (m n)), so expert t's energy ||tau_t||_F^2 is about
10**t; the log energies are then about t * ln 10 and the gate statistic gamma = var(t) / mean(t)^2
is >= 1/3 > tau = 0.3 for every T >= 2: ``--gate auto`` fires naturally, ``on`` / ``off`` force it.

For every gate setting and shape group the script times (median over ``--repeats`` after one
warm-up; CUDA events on a GPU) ``ace_batched`` on the whole group (one call, L layers) and
:func:`references.ace_reference_style` on the same tensors, and prints: the speed-up, the FLOPs
the package does (:func:`ace_flops`, float32 and float64 separately) and its achieved FLOP rate,
and the max over layers of ||out - ref64||_F / ||ref64||_F for both implementations, ref64 being
tests/reference_ace.ace_reference (float64, on the benchmark's device; ``--no-check`` skips it,
e.g. for the llama preset on a slow CPU).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent / "tests"):  # bench_common/references, and tests/reference_ace
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from reference_ace import ace_reference  # noqa: E402
from references import ace_reference_style  # noqa: E402

from mergekernels.bench.cases import ACE_PARAMS, ace_flops  # noqa: E402
from mergekernels.bench.cases import PRESETS as BENCH_PRESETS  # noqa: E402
from mergekernels.bench.cases import make_ace_group as make_group  # noqa: E402
from mergekernels.bench.inputs import device_name  # noqa: E402
from mergekernels.bench.results import report  # noqa: E402
from mergekernels.bench.timing import synchronize, time_fn  # noqa: E402
from mergekernels.methods.ace import ace_batched  # noqa: E402

# The FLOP count (ace_flops), the inputs (make_group) and the timing are mergekernels.bench's, shared
# with `mergekernels bench`.
EPS, TAU, K_FRAC, SCALE = (ACE_PARAMS[k] for k in ("eps", "tau", "k_frac", "scale"))

# preset -> (default experts, [(layers L, m, n)]): the shape groups of one block.
PRESETS: dict[str, tuple[int, list[tuple[int, int, int]]]] = {
    name: (p.ace_experts, list(p.ace_groups)) for name, p in BENCH_PRESETS.items()
}

__all__ = ["EPS", "K_FRAC", "PRESETS", "SCALE", "TAU", "ace_flops", "make_group", "main"]


def relative_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """||out - ref64||_F / ||ref64||_F, in float64."""
    out64 = out.detach().to(device=ref64.device, dtype=torch.float64)
    return ((out64 - ref64).norm() / ref64.norm()).item()


@dataclass
class Row:
    """One configuration: a gate setting and a shape group (or the block's total)."""

    gate: str
    shape: str
    layers: int
    experts: int
    het_layers: int
    ours_s: float
    ref_s: float
    speedup: float
    gflop_fp32: float
    gflop_fp64: float
    gflops: float
    err_ours: float | None
    err_ref: float | None
    het_matches_ref64: bool | None
    gamma: float


def run_group(
    args: argparse.Namespace, gate: str, layers: int, m: int, n: int, experts: int, seed: int
) -> Row:
    device = torch.device(args.device)
    base, finetuned = make_group(layers, m, n, experts, device, seed)
    params = dict(eps=EPS, tau=TAU, k_frac=K_FRAC, scale=SCALE, gate=gate)
    layer_base = list(base.unbind(0))
    layer_experts = [list(ft.unbind(0)) for ft in finetuned]

    last: dict[str, object] = {}

    def ours() -> None:
        last["ours"] = ace_batched(base, finetuned, tf32=args.tf32, **params)

    def reference_style() -> None:
        last["ref"] = ace_reference_style(layer_base, layer_experts, **params)

    t_ours = time_fn(ours, repeats=args.repeats, warmup=1, device=device)
    t_ref = time_fn(reference_style, repeats=args.repeats, warmup=1, device=device)
    synchronize(device)
    merged, info = last["ours"]
    ref_out = last["ref"]
    het = [bool(h) for h in torch.as_tensor(info.het).reshape(-1).tolist()]
    gammas = torch.as_tensor(info.gamma).reshape(-1).tolist()

    fp32 = fp64 = 0.0
    for h in het:
        f32, f64 = ace_flops(m, n, experts, h)
        fp32, fp64 = fp32 + f32, fp64 + f64

    err_ours = err_ref = het_match = None
    if not args.no_check:
        err_ours = err_ref = 0.0
        het_match = True
        for layer in range(layers):
            ref64, ref_info = ace_reference(
                base[layer], [ft[layer] for ft in finetuned], device=device, **params
            )
            err_ours = max(err_ours, relative_error(merged[layer], ref64))
            err_ref = max(err_ref, relative_error(ref_out[layer], ref64))
            het_match = het_match and ref_info["het"] == het[layer]

    return Row(
        gate=gate,
        shape=f"{m}x{n}",
        layers=layers,
        experts=experts,
        het_layers=sum(het),
        ours_s=t_ours.median,
        ref_s=t_ref.median,
        speedup=t_ref.median / t_ours.median,
        gflop_fp32=fp32 / 1e9,
        gflop_fp64=fp64 / 1e9,
        gflops=(fp32 + fp64) / t_ours.median / 1e9,
        err_ours=err_ours,
        err_ref=err_ref,
        het_matches_ref64=het_match,
        gamma=max(gammas),
    )


def total_row(gate: str, rows: list[Row]) -> Row:
    """The whole block for one gate setting: times and FLOPs summed, errors maxed."""
    ours_s = sum(r.ours_s for r in rows)
    ref_s = sum(r.ref_s for r in rows)
    fp32 = sum(r.gflop_fp32 for r in rows)
    fp64 = sum(r.gflop_fp64 for r in rows)
    checked = all(r.err_ours is not None for r in rows)
    return Row(
        gate=gate,
        shape="block total",
        layers=sum(r.layers for r in rows),
        experts=rows[0].experts,
        het_layers=sum(r.het_layers for r in rows),
        ours_s=ours_s,
        ref_s=ref_s,
        speedup=ref_s / ours_s,
        gflop_fp32=fp32,
        gflop_fp64=fp64,
        gflops=(fp32 + fp64) / ours_s,
        err_ours=max(r.err_ours for r in rows) if checked else None,
        err_ref=max(r.err_ref for r in rows) if checked else None,
        het_matches_ref64=all(r.het_matches_ref64 for r in rows) if checked else None,
        gamma=max(r.gamma for r in rows),
    )


def run(args: argparse.Namespace) -> tuple[dict, list[Row]]:
    default_experts, groups = PRESETS[args.preset]
    experts = args.experts or default_experts
    d = args.scale_down
    groups = [(layers, max(1, m // d), max(1, n // d)) for layers, m, n in groups]
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(args.device),
        "device_type": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "scale_down": d,
        "groups": [f"{layers} x {m}x{n}" for layers, m, n in groups],
        "experts": experts,
        "repeats": args.repeats,
        "tf32": args.tf32,
        "params": dict(eps=EPS, tau=TAU, k_frac=K_FRAC, scale=SCALE),
    }
    rows: list[Row] = []
    for gate in args.gate:
        gate_rows = []
        for index, (layers, m, n) in enumerate(groups):
            row = run_group(args, gate, layers, m, n, experts, seed=args.seed + index)
            print(
                f"  gate={gate:<4} {layers} x {m}x{n}: ours {row.ours_s:.4f} s, reference-style "
                f"{row.ref_s:.4f} s ({row.speedup:.1f}x)",
                flush=True,
            )
            gate_rows.append(row)
        rows += gate_rows + [total_row(gate, gate_rows)]
    return meta, rows


def _err(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def render(meta: dict, rows: list[Row]) -> str:
    """The header line and a markdown table."""
    lines = [
        f"{meta['date']} | {meta['device']} | torch {meta['torch']} | threads {meta['threads']} | "
        f"ACE {meta['preset']}"
        + (f" / {meta['scale_down']}" if meta["scale_down"] > 1 else "")
        + f" | T={meta['experts']} fp32 | repeats {meta['repeats']}"
        + (" | TF32 on (ours)" if meta["tf32"] else ""),
        "",
        "| gate | L x shape | het | gamma | ours s | ref-style s | speed-up | GFLOP fp32 | GFLOP fp64 "
        "| GFLOP/s | err ours | err ref-style |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        het = f"{r.het_layers}/{r.layers}" + ("" if r.het_matches_ref64 in (None, True) else " (!= ref64)")
        lines.append(
            f"| {r.gate} | {r.layers} x {r.shape} | {het} | {r.gamma:.2f} | {r.ours_s:.4f} | {r.ref_s:.4f} "
            f"| {r.speedup:.1f}x | {r.gflop_fp32:.2f} | {r.gflop_fp64:.2f} | {r.gflops:.1f} "
            f"| {_err(r.err_ours)} | {_err(r.err_ref)} |"
        )
    lines += [
        "",
        "err: max over layers of ||out - ref64||_F / ||ref64||_F, ref64 = tests/reference_ace.py (float64). "
        "GFLOP/s: ours, fp32 + fp64 FLOPs (mergekernels.bench.ace_flops) over ours' median time.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None, help="default: per device")
    parser.add_argument("--experts", type=int, default=None, help="T (default: 7 for gpt2, 4 for llama)")
    parser.add_argument(
        "--gate", nargs="+", choices=("auto", "on", "off"), default=["auto"], help="one or more settings"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 3 CPU, 10 CUDA)")
    parser.add_argument("--tf32", action="store_true", help="let ours use TF32 for its fp32 products")
    parser.add_argument("--scale-down", type=int, default=1, help="divide every dimension by this")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the rows to FILE")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.preset is None:
        args.preset = "llama-7b-block" if args.device == "cuda" else "gpt2"
    if args.repeats is None:
        args.repeats = 10 if args.device == "cuda" else 3
    if args.repeats < 1 or args.scale_down < 1 or (args.experts is not None and args.experts < 1):
        parser.error("--repeats, --scale-down and --experts must be >= 1")

    meta, rows = run(args)
    report(meta, rows, render, args.json)


if __name__ == "__main__":
    main()
