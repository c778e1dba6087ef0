"""``mergekernels demo``: the main job on an embedded default, plus a synthetic kernel workout.

``run()`` (the default) builds and caches the digits testbed (:mod:`mergekernels.testbed`: a small
MLP pre-trained on scikit-learn's digits and six experts fine-tuned on transformed digits), writes
nothing but HF-style checkpoints, merges them with every method through the checkpoint engine
(:func:`mergekernels.merge_checkpoints`, the code path of ``mergekernels merge``), picks each
method's coefficient on the validation split and prints normalised accuracy on test and merge time.

``run_synthetic()`` (``mergekernels demo --synthetic``) merges a synthetic bf16 model with every
method in memory and reports throughput.

The synthetic model is a stack of transformer-shaped layers. Each "fine-tuned" model adds to the
base a task vector made of a component shared by all tasks, a task-specific low-rank part and
sparse outliers, so methods that trim, drop or elect signs have something to do. The demo prints
the task-vector statistics of the checkpoint set (one fused pass), then for every method the
merge time, the bytes moved per second and the fraction of the merged task vector left non-zero.
"""

from __future__ import annotations

import time

import torch

from . import _ops
from .merge import merge
from .methods import METHODS
from .stats import task_vector_stats

# (name suffix, shape) of one layer: attention and MLP projections of a small transformer.
LAYER_SHAPES = [
    ("attn.q", (512, 512)),
    ("attn.k", (512, 512)),
    ("attn.v", (512, 512)),
    ("attn.o", (512, 512)),
    ("mlp.up", (1408, 512)),
    ("mlp.gate", (1408, 512)),
    ("mlp.down", (512, 1408)),
    ("norm", (512,)),
]

DEMO_PARAMS = {
    "task_arithmetic": {"scale": 0.5},
    "linear": {},
    "ties": {"density": 0.2, "scale": 1.0},
    "dare": {"drop": 0.9, "scale": 0.5},
    "dare_linear": {"drop": 0.9, "scale": 0.5},
    "dare_ties": {"drop": 0.9},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01, "scale": 0.5},
    "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.15},
    "della_linear": {"density": 0.5, "epsilon": 0.15, "scale": 0.5},
    "ace": {},
    "tsv_m": {},
    "iso_c": {},
    "iso_cts": {},
    "wudi": {},
}
# Methods the synthetic model cannot exercise, and why.
DEMO_SKIP = {
    "regmean": "needs input Grams from calibration data",
    "apl": "needs importance scores from calibration data",
}


def synthetic_models(
    num_experts: int = 4, layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    experts: list[dict[str, torch.Tensor]] = [{} for _ in range(num_experts)]
    for layer in range(layers):
        for suffix, shape in LAYER_SHAPES:
            name = f"model.layers.{layer}.{suffix}.weight"
            b = torch.randn(shape, generator=g) * 0.02
            shared = torch.randn(shape, generator=g) * 1e-3
            base[name] = b.to(dtype)
            for e in range(num_experts):
                if len(shape) == 2:
                    rank = 8
                    u = torch.randn(shape[0], rank, generator=g)
                    v = torch.randn(rank, shape[1], generator=g)
                    specific = (u @ v) * (2e-3 / rank**0.5)
                else:
                    specific = torch.randn(shape, generator=g) * 2e-3
                outliers = (torch.rand(shape, generator=g) < 0.001) * torch.randn(shape, generator=g) * 0.05
                experts[e][name] = (b + shared + specific + outliers).to(dtype)
    return base, experts


def run_synthetic(
    num_experts: int = 4, layers: int = 4, device: str | None = None, repeats: int = 3
) -> list[dict]:
    """Merge the synthetic model with every registered method; returns one row per method."""
    device = device or ("cuda" if torch.cuda.is_available() and _ops.has_cuda_kernels() else "cpu")
    base, experts = synthetic_models(num_experts, layers)
    base = {k: v.to(device) for k, v in base.items()}
    experts = [{k: v.to(device) for k, v in sd.items()} for sd in experts]
    params = sum(v.numel() for v in base.values())
    nbytes = sum(v.numel() * v.element_size() for v in base.values())
    print(
        f"mergekernels demo: {num_experts} fine-tuned models of {params / 1e6:.1f} M parameters (bf16) "
        f"on {device}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CUDA kernels built: {_ops.has_cuda_kernels()}"
    )

    stats = None
    for name in base:
        s = task_vector_stats(base[name], [sd[name] for sd in experts])
        stats = s if stats is None else stats + s
    cos = stats.cosine
    off = cos[~torch.eye(num_experts, dtype=torch.bool)]
    norms = ", ".join(f"{n:.3f}" for n in stats.norms.tolist())
    print(
        f"task vectors: norms {norms}; mean |cos| {off.abs().mean().item():.3f}; "
        f"non-zero signs agree on {100 * stats.sign_agreement:.1f}% of entries\n"
    )

    rows = []
    header = f"{'method':<18}{'time (ms)':>11}{'GB/s':>9}{'delta kept':>12}"
    print(header)
    print("-" * len(header))
    for method in METHODS:
        if method in DEMO_SKIP:
            continue
        kwargs = DEMO_PARAMS.get(method, {})
        merged = merge(base, experts, method=method, **kwargs)  # warm-up
        times = []
        # Matrix methods are compute-bound and slow on a CPU: one timed run is enough.
        for _ in range(1 if METHODS[method].kind == "matrix" else repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            merged = merge(base, experts, method=method, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        best = sorted(times)[len(times) // 2]
        kept = sum(int((merged[n] != base[n]).sum()) for n in base) / params
        moved = nbytes * (num_experts + 2)
        rows.append({"method": method, "seconds": best, "gb_per_s": moved / best / 1e9, "kept": kept})
        print(f"{method:<18}{best * 1e3:>11.1f}{moved / best / 1e9:>9.2f}{100 * kept:>11.1f}%")
    print(
        "\nGB/s counts one read of the base and every fine-tuned model and one write of the result "
        "(methods with a threshold pass read the inputs more than once)."
    )
    for method, why in DEMO_SKIP.items():
        print(f"not run: {method} ({why})")
    return rows


# ---------------------------------------------------------------------------------------------
# The testbeds (digits, text) through the checkpoint engine.
# method -> (parameters, name of the coefficient picked on validation or None, its grid); the grid
# None is the testbed's ``scale_grid`` (0.1 to 1.5 for the digits; 0.3 to 3 for the text testbed)
TESTBED_METHODS: dict[str, tuple[dict, str | None, tuple]] = {
    "linear": ({}, None, ()),
    "task_arithmetic": ({}, "scale", None),
    "ties": ({"density": 0.2, "merge": "mean"}, "scale", None),
    "dare_linear": ({"drop": 0.5}, "scale", None),
    "dare_ties": ({"drop": 0.5}, "scale", None),
    "breadcrumbs": ({"density": 0.9, "gamma": 0.01}, "scale", None),
    "della": ({"density": 0.5, "epsilon": 0.15}, "scale", None),
    "ace": ({}, "scale", None),
    "tsv_m": ({}, "alpha", None),
    "iso_c": ({}, "alpha", None),
    "iso_cts": ({}, "alpha", None),
    "wudi": ({}, "scale", None),
    "regmean": ({"reduction": 0.95}, None, ()),
    "apl": ({"drop": 0.5}, "scale", None),
    "dare_linear (p 0.7)": ({"drop": 0.7}, "scale", None),
    "apl (p 0.7)": ({"drop": 0.7}, "scale", None),
    "dare_linear (p 0.9)": ({"drop": 0.9}, "scale", None),
    "apl (p 0.9)": ({"drop": 0.9}, "scale", None),
    "awd (global)": ({"granularity": "global", "scale_free": True}, "scale", None),
    "awd (per_tensor)": ({"granularity": "per_tensor", "scale_free": True}, "scale", None),
    "awd (per_row)": ({"granularity": "per_row", "scale_free": True}, "scale", None),
}
# Methods that need the testbed's calibration data: a file the merge config names.
_DATA_FILES = {"regmean": "grams", "apl": "scores"}


def _data_file(testbed, method: str, workdir) -> str | None:
    """RegMean's input Grams and APL's importance scores, from the testbed's training split."""
    if method == "regmean":
        path = f"{workdir}/grams.pt"
        torch.save(testbed.grams(), path)
        return path
    if method == "apl":
        from .methods import apl

        path = f"{workdir}/apl-scores.safetensors"
        calibration = {task: testbed.calibration(task) for task in testbed.tasks}
        model = testbed.model(testbed.base_state_dict())
        apl.importance(model, testbed.loss_fn, calibration, testbed.expert_state_dicts()).save(path)
        return path
    return None


def _engine_merge(testbed, label: str, params: dict, workdir, data_file=None):
    """Merge the testbed's checkpoints with the engine; returns (state dict, merge seconds, report).
    ``label`` is a method name, optionally followed by a variant in parentheses."""
    from pathlib import Path

    from safetensors.torch import load_file

    from .engine import merge_checkpoints

    method = label.split(" ")[0]
    params = dict(params)
    if data_file is not None:
        params[_DATA_FILES[method]] = str(data_file)
    config = {
        "merge_method": method,
        "dialect": "mergekernels",
        "base_model": str(testbed.base_dir),
        "models": [{"model": str(testbed.expert_dirs[t])} for t in testbed.tasks],
        "parameters": params,
    }
    if testbed.merge_exclude:
        config["exclude"] = list(testbed.merge_exclude)
    out = Path(workdir) / "merged"
    report = merge_checkpoints(config, out, device="cpu", quiet=True, overwrite=True)
    merged = {}
    for f in sorted(out.glob("model-*.safetensors")):
        merged.update(load_file(str(f)))
    return merged, report.seconds["total"], report


def _note(diagnostics: dict) -> str:
    """AWD's mean |cos| of the task vectors before and after disentangling, from the report."""
    awd = diagnostics.get("awd")
    if not awd or "mean_abs_cos_before" not in awd:
        return ""
    return f"mean |cos| {awd['mean_abs_cos_before']:.3f} -> {awd['mean_abs_cos_after']:.3f}"


def load_testbed(text: bool = False, testbed_dir: str | None = None, text_data: str | None = None):
    """The digits testbed (default) or the text testbed (``text``; ``text_data``: the Debian packages
    already unpacked, instead of downloading them), built first if not cached."""
    if text:
        from .text_testbed import build_testbed as build_text

        return build_text(testbed_dir, data_dir=text_data)
    from .testbed import build_testbed

    return build_testbed(testbed_dir)


def run(
    methods: list[str] | None = None,
    testbed_dir: str | None = None,
    text: bool = False,
    text_data: str | None = None,
) -> list[dict]:
    """Build (or load) the digits testbed, or with ``text`` the text testbed
    (:mod:`mergekernels.text_testbed`), and merge it with every method through the engine."""
    import tempfile

    t0 = time.perf_counter()
    tb = load_testbed(text, testbed_dir, text_data)
    how = "built" if tb.built else "loaded from cache"
    print(
        f"mergekernels demo: {tb.describe()} {how} in "
        f"{time.perf_counter() - t0:.1f} s at {tb.directory}\n"
        "normalised accuracy = merged model's accuracy / the task's own expert's, averaged over tasks; "
        "each method's coefficient is picked on validation and scored on test\n"
    )
    base = tb.base_state_dict()
    header = f"{'method':<20}{'picked':<12}{'val':>7}{'test':>7}{'merge (ms)':>12}"
    print(header)
    print("-" * len(header))
    rows = [_row("zero-shot (base)", "", tb, base, None, {})]
    with tempfile.TemporaryDirectory(prefix="mk-demo-") as work:
        data_files: dict[str, str | None] = {}
        for method in methods or list(TESTBED_METHODS):
            if method not in TESTBED_METHODS:
                raise ValueError(f"demo: unknown method {method!r}; valid: {', '.join(TESTBED_METHODS)}")
            params, knob, grid = TESTBED_METHODS[method]
            if knob is not None and grid is None:
                grid = tb.scale_grid
            name = method.split(" ")[0]
            if name not in data_files:
                data_files[name] = _data_file(tb, name, work)
            value, val = None, None
            if knob is not None:
                value, val = _pick_coefficient(tb, base, method, params, knob, grid, work, data_files[name])
            call = dict(params) if knob is None else {**params, knob: value}
            merged, seconds, report = _engine_merge(tb, method, call, work, data_files[name])
            picked = f"{knob} {value}" if knob else ""
            rows.append(_row(method, picked, tb, merged, seconds, report.diagnostics, val))
    print(
        "\nmerge (ms): one end-to-end mergekernels merge (read, merge, write shards) of the "
        f"{len(tb.tasks) + 1} checkpoints."
    )
    for line in claims(rows):
        print(line)
    return rows


def _pick_coefficient(
    tb, base: dict, method: str, params: dict, knob: str, grid, work, data_file
) -> tuple[float, float]:
    """The grid value of ``knob`` with the best validation score, and that score.

    Every demo method's coefficient scales the merged task vector at the end (theta_0 + c * tau_merged;
    tests/test_demo.py checks it for each), so the engine merges once at c = 1 and the grid's models are
    theta_0 + c * (merged - theta_0), formed in memory: the same models up to float32 rounding, at
    one merge per method instead of one per grid value. The reported model is merged again by the
    engine at the picked value."""
    ones, _, _ = _engine_merge(tb, method, {**params, knob: 1.0}, work, data_file)
    best = None
    for value in grid:
        candidate = {
            k: (base[k] + value * (v - base[k])) if v.is_floating_point() else v for k, v in ones.items()
        }
        val = tb.normalised_accuracy(candidate, "val")
        if best is None or val > best[1]:
            best = (value, val)
    return best


def _row(method: str, picked: str, tb, merged, seconds, diagnostics, val=None) -> dict:
    """Score one merged model on test (and on validation unless given) and print its line."""
    row = {
        "method": method,
        "picked": picked,
        "val": tb.normalised_accuracy(merged, "val") if val is None else val,
        "test": tb.normalised_accuracy(merged, "test"),
        "seconds": seconds,
        "note": _note(diagnostics),
    }
    ms = f"{1e3 * seconds:.0f}" if seconds is not None else "-"
    print(f"{method:<20}{picked:<12}{row['val']:>7.3f}{row['test']:>7.3f}{ms:>12}  {row['note']}", flush=True)
    return row


# Methods that use no data beyond the checkpoints (ACE's claim is against these).
DATA_FREE = (
    *("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "della"),
    *("tsv_m", "iso_c", "iso_cts", "wudi", "awd"),
)


def claims(rows: list[dict]) -> list[str]:
    """The papers' claims the testbed checks, each as measured on test: APL >= DARE at the same drop
    rate, ACE >= every other data-free method, AWD per_row >= task arithmetic."""
    test = {r["method"]: r["test"] for r in rows}
    lines = ["\nclaims, on test (as measured; nothing is tuned until they hold):"]

    def verdict(ok: bool) -> str:
        return "holds" if ok else "DOES NOT HOLD"

    for label, value in test.items():
        if label.startswith("apl"):
            variant = label[len("apl") :]
            dare = test.get("dare_linear" + variant)
            if dare is not None:
                which = variant or " (p 0.5)"
                lines.append(f"  APL >= DARE{which}: {value:.3f} vs {dare:.3f}: {verdict(value >= dare)}")
    if "ace" in test:
        others = {m: v for m, v in test.items() if m.split(" ")[0] in DATA_FREE}
        if others:
            best = max(others, key=others.get)
            lines.append(
                f"  ACE >= every other data-free method: {test['ace']:.3f} vs the best other, {best} "
                f"{others[best]:.3f}: {verdict(test['ace'] >= others[best])}"
            )
    if "awd (per_row)" in test and "task_arithmetic" in test:
        a, b = test["awd (per_row)"], test["task_arithmetic"]
        lines.append(f"  AWD per_row >= task arithmetic: {a:.3f} vs {b:.3f}: {verdict(a >= b)}")
    return lines if len(lines) > 1 else []
