"""AWD (global) in Gram space against full-dimensional gradient descent, on a synthetic model.

Usage::

    python benchmarks/bench_awd.py [--params 1e9] [--experts 4] [--full-steps 2] [--steps 300]
                                   [--granularities global [per_tensor per_row]] [--no-scale-free]
                                   [--threads N] [--json FILE]
    python benchmarks/bench_awd.py --quick        # ~3M parameters, all granularities

The model is Llama-shaped (hidden 2048, MLP 5632, vocabulary 32000; ``--params`` sets the number of
layers; ``--quick``: hidden 256, MLP 704, vocabulary 1000, 2 layers), bf16, generated tensor by
tensor on the fly: base ~ N(0, 0.02), theta_t = base + c + eps_t with one shared c ~ N(0, 0.0015)
and eps_t ~ N(0, 0.001) (rounded to bf16), so the task vectors share a component (mean |cos| ~0.7)
for AWD to find. Memory: (K + 1) bf16 copies of the model, plus the full-dimensional path's float32
delta (4 bytes per parameter) and one merged model: about 16 GiB at 1e9 parameters and K = 4.

Timed, once each (``--repeats`` for more; the median is printed), in one process:

- one statistics pass: the Grams of the task vectors over the whole model (``tv_stats`` per
  tensor, summed) -- one read of the inputs;
- one task-arithmetic merge pass (``mk.merge(method="task_arithmetic")``) -- one read, one write;
- AWD global through ``mk.merge(method="awd")``: its statistics pass and solve (the
  ``prepare_stats`` hook), the Gram-space solve alone (300 steps on a 4 x 4 Gram), and end to end;
- full-dimensional plain GD, streamed over the tensors: ``--full-steps`` steps are measured and the
  time of 300 is extrapolated linearly (each step is the same work: one pass over the inputs that
  updates the float32 delta with the previous gradient and accumulates the Gram of the new u_i, the
  cheapest plain-GD schedule; float32 products summed over blocks of 65536 elements, then in
  float64). The full path's
  delta after those steps is compared with the Gram-space delta after as many steps.

``--scale-free`` (default on): the task vectors of a 1e9-parameter model have norms ~50, where the
spec's absolute step leaves delta where it is (see the spec's "Scale"); the scale-free step moves it,
so the comparison of the two paths means something. Timings do not depend on it.
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from bench_common import device_name, report  # noqa: E402

import mergekernels as mk  # noqa: E402
from mergekernels import _ops  # noqa: E402
from mergekernels.bench.checkpoints import layer_shapes  # noqa: E402
from mergekernels.methods.awd import awd_coefficients, prepare_stats  # noqa: E402

BASE_STD, SHARED_STD, OWN_STD = 0.02, 0.0015, 0.001
FULL = {"hidden": 2048, "inter": 5632, "vocab": 32000}
QUICK = {"hidden": 256, "inter": 704, "vocab": 1000, "layers": 2}


@dataclass
class Row:
    phase: str
    seconds: float
    passes: str
    note: str = ""


def model_shapes(params: float, quick: bool) -> dict[str, tuple[int, ...]]:
    if quick:
        return layer_shapes(**QUICK)
    h, m, v = FULL["hidden"], FULL["inter"], FULL["vocab"]
    per_layer = 4 * h * h + 3 * h * m + 2 * h
    layers = max(1, round((params - 2 * v * h - h) / per_layer))  # embeddings and lm_head
    return layer_shapes(h, m, v, layers)


def generate(shapes: dict, experts: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """bf16 state dicts, one tensor at a time (float32 temporaries of one tensor only)."""
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    fts: list[dict[str, torch.Tensor]] = [{} for _ in range(experts)]
    for name, shape in shapes.items():
        b = torch.randn(shape, generator=g).mul_(BASE_STD)
        shared = torch.randn(shape, generator=g).mul_(SHARED_STD).add_(b)
        base[name] = b.to(torch.bfloat16)
        del b
        for t in range(experts):
            fts[t][name] = torch.randn(shape, generator=g).mul_(OWN_STD).add_(shared).to(torch.bfloat16)
        del shared
    return base, fts


def timed(fn, repeats: int) -> tuple[float, object]:
    """(median seconds over `repeats` calls, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        out = None
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def stats_pass(base: dict, fts: list[dict]) -> torch.Tensor:
    gram = None
    for name in base:
        g = _ops.tv_stats(base[name], [sd[name] for sd in fts])[0]
        gram = g if gram is None else gram + g
    return gram.cpu()


GRAM_BLOCK = 1 << 16


def gram64(u: torch.Tensor) -> torch.Tensor:
    """u u^T [K, K] float64 for float32 u [K, n]: float32 products summed over blocks of GRAM_BLOCK
    elements, the block sums added in float64 (one float32 matmul over 6e7 elements is off by ~3%)."""
    k, n = u.shape
    full = n - n % GRAM_BLOCK
    blocks = u[:, :full].reshape(k, -1, GRAM_BLOCK).transpose(0, 1)  # [nb, K, B]
    out = (blocks @ blocks.mT).double().sum(0)
    tail = u[:, full:]
    return out + (tail @ tail.T).double()


class FullDescent:
    """Plain GD on the real delta (float32, one tensor per model tensor), streamed over the tensors.

    Step t uses the Gram of the u_i from the previous pass: the spec's gradient is sum_j h_j u_j with
    h from that Gram (and alpha delta / ||delta||), so one pass both applies step t and accumulates the
    Gram for step t + 1."""

    def __init__(self, base, fts, alpha, lr, scale_free, gram0):
        self.base, self.fts, self.alpha, self.lr = base, fts, alpha, lr
        self.delta = {n: torch.zeros(t.shape, dtype=torch.float32) for n, t in base.items()}
        self.k = len(fts)
        self.u_gram = gram0.clone()  # u = tau at delta = 0
        self.delta_sq = 0.0
        sq = torch.diagonal(gram0)
        self.tol = 1e-12 * float(sq.max())
        r2 = float(sq.mean())
        self.step = lr * r2 if scale_free else lr
        self.pen = (alpha / math.sqrt(r2) if r2 > 0 else 0.0) if scale_free else alpha

    def coefficients(self) -> tuple[torch.Tensor, float]:
        """(h [K], p): grad = sum_j h_j u_j + p delta, from the Gram of the u's."""
        m, k = self.u_gram, self.k
        a2 = torch.diagonal(m)
        live = a2 > self.tol
        inv_a = torch.where(live, a2.clamp_min(1e-300).rsqrt(), 0.0)
        c = m * inv_a[:, None] * inv_a[None, :] * ~torch.eye(k, dtype=torch.bool)
        s = c.sign()
        # grad_delta L_O = -sum_k dL_O/du_k, dL_O/du_k = (2/N) sum_j s_kj (u_j/(a_k a_j) - c_kj u_k/a_k^2)
        h = (-2.0 / (k * (k - 1))) * (inv_a * (s @ inv_a) - inv_a.square() * (s * c).sum(-1))
        p = self.pen / math.sqrt(self.delta_sq) if self.delta_sq > self.tol else 0.0
        return h.float(), p

    def step_once(self) -> None:
        h, p = self.coefficients()
        gram = torch.zeros(self.k, self.k, dtype=torch.float64)
        delta_sq = 0.0
        for name, b in self.base.items():
            b32 = b.float().reshape(-1)
            taus = torch.stack([sd[name].float().reshape(-1) - b32 for sd in self.fts])
            d = self.delta[name].view(-1)
            u = taus.sub_(d)
            grad = h @ u  # sum_j h_j u_j
            if p:
                grad.add_(d, alpha=p)
            d.sub_(grad, alpha=self.step)
            u.sub_(grad.mul_(-self.step))  # u = tau - new delta
            gram += gram64(u)
            delta_sq += float(d.double().square().sum())
        self.u_gram, self.delta_sq = gram, delta_sq


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=1e9, help="model size in parameters (default 1e9)")
    parser.add_argument("--experts", type=int, default=4, help="fine-tuned models K (default 4)")
    parser.add_argument("--quick", action="store_true", help="a ~3M-parameter model, every granularity")
    parser.add_argument("--steps", type=int, default=300, help="AWD steps (default 300)")
    parser.add_argument(
        "--full-steps", type=int, default=2, help="full-dimensional steps to time (default 2)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per phase (default 1; quick 3)")
    parser.add_argument(
        "--granularities",
        nargs="+",
        default=None,
        choices=["global", "per_tensor", "per_row"],
        help="AWD granularities to time end to end (default global; quick: all)",
    )
    parser.add_argument("--no-scale-free", dest="scale_free", action="store_false")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 1)
    grans = args.granularities or (["global", "per_tensor", "per_row"] if args.quick else ["global"])
    hp = {"alpha": 0.1, "lr": 0.01, "steps": args.steps, "scale_free": args.scale_free}

    shapes = model_shapes(args.params, args.quick)
    numel = sum(math.prod(s) for s in shapes.values())
    t0 = time.perf_counter()
    base, fts = generate(shapes, args.experts)
    gen_s = time.perf_counter() - t0
    print(
        f"model: {numel / 1e9:.3f}e9 parameters in {len(shapes)} tensors, {args.experts} experts, bf16 "
        f"({(args.experts + 1) * numel * 2 / 2**30:.1f} GiB); generated in {gen_s:.1f} s",
        flush=True,
    )

    rows: list[Row] = []
    s_stats, gram = timed(lambda: stats_pass(base, fts), repeats)
    rows.append(Row("statistics pass (Grams of tau, summed over tensors)", s_stats, "1 read"))

    def ta():
        return mk.merge(base, fts, method="task_arithmetic")

    s_ta, merged = timed(ta, repeats)
    del merged
    rows.append(Row("task-arithmetic merge (mk.merge)", s_ta, "1 read + 1 write"))

    names = list(base)
    s_prep, (shared_params, _, diag) = timed(
        lambda: prepare_stats(
            lambda n: (base[n], [sd[n] for sd in fts]), names, {"granularity": "global", **hp}
        ),
        repeats,
    )
    rows.append(Row("AWD global: statistics pass + solve (prepare_stats)", s_prep, "1 read"))
    s_solve, (w_gram, info) = timed(lambda: awd_coefficients(gram, **hp), max(repeats, 3))
    rows.append(
        Row(f"AWD global: Gram-space solve alone ({args.steps} steps, K={args.experts})", s_solve, "none")
    )
    awd_summary = info.summary()

    awd_rows = {}
    for gran in grans:
        diagnostics: dict = {}

        def run(gran=gran, diagnostics=diagnostics):
            return mk.merge(base, fts, method="awd", granularity=gran, diagnostics=diagnostics, **hp)

        s_awd, merged = timed(run, repeats)
        del merged
        d = diagnostics["awd"]
        awd_rows[gran] = d
        rows.append(
            Row(
                f"AWD {gran} + TA, end to end (mk.merge)",
                s_awd,
                "2 reads + 1 write",
                f"mean |cos| {d['mean_abs_cos_before']:.3f} -> {d['mean_abs_cos_after']:.3f}, "
                f"moved {d['moved']:.3f}, {d['problems']} problems",
            )
        )
    gc.collect()

    full = FullDescent(base, fts, hp["alpha"], hp["lr"], hp["scale_free"], gram)
    steps_timed = []
    for _ in range(args.full_steps):
        t0 = time.perf_counter()
        full.step_once()
        steps_timed.append(time.perf_counter() - t0)
    per_step = statistics.mean(steps_timed)
    # The Gram-space delta after as many steps, for the comparison.
    w_n, _ = awd_coefficients(gram, **{**hp, "steps": args.full_steps})
    diff_sq = ref_sq = 0.0
    wf = w_n.float()
    for name, b in base.items():
        b32 = b.float().reshape(-1)
        d_gram = sum(wf[t] * (sd[name].float().reshape(-1) - b32) for t, sd in enumerate(fts))
        diff_sq += float((full.delta[name].view(-1) - d_gram).double().square().sum())
        ref_sq += float(d_gram.double().square().sum())
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else 0.0
    rows.append(
        Row(
            "full-dimensional GD, one step (streamed)",
            per_step,
            "1 read + delta r/w",
            f"mean of {args.full_steps} measured; |delta_full - delta_gram| / |delta_gram| = {rel:.1e} "
            f"after {args.full_steps} steps",
        )
    )
    full_total = s_stats + args.steps * per_step  # the Gram of tau at delta = 0, then the steps
    rows.append(
        Row(
            f"full-dimensional GD, {args.steps} steps (extrapolated)",
            full_total,
            f"{args.steps + 1} reads",
            f"= 1 statistics pass + {args.steps} x the measured step",
        )
    )
    awd_total = next((r.seconds for r in rows if r.phase.startswith("AWD global + TA")), s_prep + s_ta)
    meta = {
        "params": numel,
        "tensors": len(shapes),
        "experts": args.experts,
        "dtype": "bf16",
        "steps": args.steps,
        "scale_free": args.scale_free,
        "threads": torch.get_num_threads(),
        "device": device_name("cpu"),
        "generate_s": gen_s,
        "awd_global": awd_summary,
        "awd": awd_rows,
        "full_over_awd": full_total / awd_total,
        "awd_over_stats_plus_ta": awd_total / (s_stats + s_ta),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    report(meta, rows, render, args.json)
    return rows


def render(meta: dict, rows: list[Row]) -> str:
    lines = [
        f"AWD on a synthetic bf16 model: {meta['params'] / 1e9:.3f}e9 parameters "
        f"({meta['tensors']} tensors), "
        f"K = {meta['experts']}, {meta['steps']} steps, scale_free={meta['scale_free']}, "
        f"{meta['threads']} threads, {meta['device']}",
        "",
        "| phase | seconds | passes over the inputs | note |",
        "|---|---:|---|---|",
    ]
    lines += [f"| {r.phase} | {r.seconds:.3f} | {r.passes} | {r.note} |" for r in rows]
    lines += [
        "",
        f"AWD global + TA end to end / (statistics pass + TA merge) = {meta['awd_over_stats_plus_ta']:.2f}; "
        f"full-dimensional GD / AWD global = {meta['full_over_awd']:.0f}x; "
        f"peak RSS {meta['peak_rss_gib']:.1f} GiB",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
