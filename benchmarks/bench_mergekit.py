"""mergekernels against mergekit on the same mergekit YAML: equal outputs, time and peak memory.

Usage::

    python benchmarks/bench_mergekit.py --mergekit-python /path/to/venv/bin/python [--ours-python PY]
        [--dir DIR] [--layers 8] [--hidden 1024] [--inter 2816] [--vocab 32000] [--experts 3]
        [--methods linear task_arithmetic ties] [--json FILE]

mergekit is installed from PyPI in a separate environment (it pins its own torch and transformers;
mergekernels never imports it): ``python -m venv mk-venv && mk-venv/bin/pip install mergekit``.

The script writes a Llama-shaped base and ``--experts`` fine-tuned checkpoints (bf16, sharded, with
a LlamaForCausalLM ``config.json``, so mergekit recognises the architecture), then for each
method writes one mergekit YAML and runs, one after the other, ``mergekit-yaml`` and
``mergekernels merge`` on it, each in a fresh process on the CPU, after a read of every input file
(so both find the inputs in the page cache) and a ``sync`` (so neither pays for the other's
writeback), ``--repeats`` times alternating. Reported per method:
the fastest wall time of each tool's process (interpreter start-up included for both), the ratio,
each process's peak RSS (VmHWM, read at exit) and the largest difference between the two outputs,
tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from mergekernels.bench.checkpoints import ModelSize, cached_models

REPO = Path(__file__).resolve().parent.parent

# Parameters of each method, in mergekit's vocabulary (weights differ per model so that weighting
# and normalisation are exercised).
METHOD_PARAMS = {
    "linear": {"model": lambda i: {"weight": 1.0 + 0.5 * i}, "global": {"normalize": True}},
    "task_arithmetic": {"model": lambda i: {"weight": 0.5 + 0.25 * i}, "global": {}},
    "ties": {"model": lambda i: {"weight": 1.0, "density": 0.2 + 0.1 * i}, "global": {"normalize": True}},
    # random masks: ours come from our Philox stream, mergekit's from torch.bernoulli (the same
    # distribution, other entries), so its "diff" columns measure the masks, not an error
    "dare_ties": {"model": lambda i: {"weight": 1.0, "density": 0.3 + 0.1 * i}, "global": {}},
    # the other mergekit methods; "count": how many fine-tuned models they take (None: all)
    "slerp": {"model": lambda i: {}, "global": {"t": [0.2, 0.8]}, "count": 1},
    "nuslerp": {"model": lambda i: {"weight": 1.0 + i}, "global": {}, "count": 2},
    "multislerp": {"model": lambda i: {"weight": 1.0 + 0.5 * i}, "global": {}},
    "karcher": {"model": lambda i: {}, "global": {}},
    "model_stock": {"model": lambda i: {}, "global": {}},
    "nearswap": {"model": lambda i: {}, "global": {"t": 0.001}, "count": 1},
    "sce": {"model": lambda i: {}, "global": {"select_topk": 0.5}},
    "arcee_fusion": {"model": lambda i: {}, "global": {}, "count": 1},
    "ram": {"model": lambda i: {}, "global": {"epsilon": 0.001}},
    "ramplus_tl": {"model": lambda i: {}, "global": {"epsilon": 0.001}},
    "passthrough": {"model": lambda i: {}, "global": {}, "count": 0},
}

# Runs mergekit-yaml in this process and records VmHWM when the interpreter exits.
_MERGEKIT_SHIM = """
import atexit, sys
PEAK_FILE = sys.argv[1]
def _peak():
    with open(PEAK_FILE, "w") as f:
        f.write(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")))
atexit.register(_peak)
sys.argv = ["mergekit-yaml"] + sys.argv[2:]
from mergekit.scripts.run_yaml import main
main()
"""


def write_yaml(path: Path, method: str, models: list[Path], dtype: str) -> None:
    """mergekit's ``linear`` averages the listed models and takes no base (it would need a weight);
    passthrough copies the base (a model of its own: no base_model)."""
    spec = METHOD_PARAMS[method]
    count = spec.get("count")
    listed = models if method == "linear" else models[1:] if count is None else models[1 : 1 + count]
    cfg = {"merge_method": method}
    if method not in ("linear", "passthrough"):
        cfg["base_model"] = str(models[0])
    if method == "passthrough":
        listed = models[:1]
    cfg["models"] = [{"model": str(m), "parameters": spec["model"](i)} for i, m in enumerate(listed)]
    cfg["models"] = [m if m["parameters"] else {"model": m["model"]} for m in cfg["models"]]
    cfg["dtype"] = dtype
    cfg["out_dtype"] = "bfloat16"
    if spec["global"]:
        cfg["parameters"] = spec["global"]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not dicts
                out[k] = h.get_tensor(k)
    return out


def compare(ours: Path, theirs: Path) -> tuple[float, float, float]:
    """(max |ours - theirs| over all tensors, the same relative to max |theirs|, the fraction of
    elements that differ by more than one bf16 rounding of the larger of the two)."""
    a, b = load_dir(ours), load_dir(theirs)
    missing = set(b) ^ set(a)
    if missing:
        raise SystemExit(f"outputs differ in tensor names: {sorted(missing)[:5]}")
    worst, rel, off, total = 0.0, 0.0, 0, 0
    for k in b:
        if a[k].shape != b[k].shape:
            raise SystemExit(f"{k}: shape {list(a[k].shape)} vs mergekit's {list(b[k].shape)}")
        x, y = a[k].float(), b[k].float()
        diff = (x - y).abs()
        worst = max(worst, float(diff.max()))
        rel = max(rel, float(diff.max()) / max(float(y.abs().max()), 1e-30))
        off += int((diff > torch.maximum(x.abs(), y.abs()) * 2.0**-8).sum())
        total += diff.numel()
    return worst, rel, off / max(total, 1)


def off_outside_threshold_ties(ours: Path, theirs: Path, cfg: Path) -> int:
    """TIES: how many differing elements are NOT at a position where some model's |tau| equals its
    trim threshold. mergekit keeps exactly k entries by argsort order (arbitrary among equal values),
    mergekernels keeps every entry equal to the threshold; bf16 task vectors have many equal values."""
    config = yaml.safe_load(cfg.read_text())
    paths = [config["base_model"]] + [m["model"] for m in config["models"]]
    densities = [m["parameters"]["density"] for m in config["models"]]
    a, b = load_dir(ours), load_dir(theirs)
    sds = [load_dir(Path(p)) for p in paths]
    unexplained = 0
    for k in b:
        differ = (a[k].float() - b[k].float()).abs() > torch.maximum(
            a[k].float().abs(), b[k].float().abs()
        ) * 2.0**-8
        at_threshold = torch.zeros_like(differ)
        base = sds[0][k].float()
        for sd, density in zip(sds[1:], densities, strict=True):
            tau = (sd[k].float() - base).abs()
            kth = max(1, int(density * tau.numel()))
            threshold = tau.reshape(-1).kthvalue(tau.numel() - kth + 1).values
            at_threshold |= tau == threshold
        unexplained += int((differ & ~at_threshold).sum())
    return unexplained


def timed_sync() -> float:
    """Seconds to write back what the last run left dirty in the page cache. mergekit does not fsync
    its output, so its writes finish after it exits; ours fsyncs every shard before it names it
    finished. Syncing between runs (untimed) keeps one tool from paying for the other's writeback."""
    t0 = time.perf_counter()
    os.sync()
    return time.perf_counter() - t0


def warm_page_cache(models: list[Path]) -> None:
    """Read every input file once, so that neither tool pays for the disk (the one run first would)."""
    buffer = bytearray(64 << 20)
    for model in models:
        for f in sorted(Path(model).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass


def run_mergekit(python: str, cfg: Path, out: Path, shard_params: int) -> tuple[float, int]:
    peak_file = out.with_suffix(".peak")
    cmd = [python, "-c", _MERGEKIT_SHIM, str(peak_file), str(cfg), str(out), "--quiet"]
    cmd += ["--out-shard-size", str(shard_params), "--no-copy-tokenizer", "--no-write-model-card"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    return wall, int(peak_file.read_text().split()[1]) * 1024


def torch_version(python: str) -> str:
    probe = [python, "-c", "import torch; print(torch.__version__)"]
    return subprocess.run(probe, check=True, capture_output=True, text=True, cwd="/").stdout.strip()


def run_ours(cfg: Path, out: Path, shard_bytes: int, python: str = sys.executable) -> tuple[float, int]:
    """One ``mergekernels merge`` process; run outside the repository, so that ``python`` imports its
    own installed mergekernels (``--ours-python``) rather than the checkout's."""
    report = out.with_suffix(".json")
    cmd = [python, "-m", "mergekernels", "merge", str(cfg), str(out), "--quiet", "--device", "cpu"]
    cmd += ["--shard-size", str(shard_bytes), "--report", str(report)]
    env = dict(os.environ)
    if python == sys.executable:  # this checkout's mergekernels, wherever the process runs
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    else:  # that environment's own mergekernels, not a checkout on this one's path
        env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=out.parent, env=env)
    wall = time.perf_counter() - t0
    return wall, json.loads(report.read_text())["peak_rss_bytes"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-python", required=True, help="python of the venv holding mergekit")
    parser.add_argument(
        "--ours-python",
        default=sys.executable,
        help="python that runs mergekernels (default: this one, with this checkout); e.g. a venv with "
        "the CPU build of torch and mergekernels installed, like mergekit's",
    )
    parser.add_argument("--dir", default="/tmp/mk-bench-mergekit")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHOD_PARAMS), choices=list(METHOD_PARAMS))
    parser.add_argument(
        "--dtype", default="bfloat16", help="the YAML's dtype: what both tools compute in (default bfloat16)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tool (the fastest counts)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    size = ModelSize(args.layers, args.hidden, args.inter, args.vocab)
    root = Path(args.dir)
    models = cached_models(root, size, args.experts)
    shapes = size.shapes()
    params = sum(torch.Size(s).numel() for s in shapes.values())
    model_mb = params * 2 / 1e6
    print(f"{len(models)} models of {params / 1e6:.0f} M parameters ({model_mb:.0f} MB bf16 each)")
    for tool, python in (("mergekit", args.mergekit_python), ("mergekernels", args.ours_python)):
        print(f"{tool}: {python}, torch {torch_version(python)}")
    print()

    rows = []
    for method in args.methods:
        work = root / "runs" / method
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        cfg = work / "config.yml"
        write_yaml(cfg, method, models, args.dtype)
        shard_bytes = 200 * 1024**2
        # Alternate the tools, each after a warm-up read of the inputs; keep each one's fastest run.
        runs_mk, runs_us = [], []
        for _ in range(args.repeats):
            for out in (work / "mergekit", work / "ours"):
                shutil.rmtree(out, ignore_errors=True)
            warm_page_cache(models)
            wall, rss = run_mergekit(args.mergekit_python, cfg, work / "mergekit", shard_bytes // 2)
            runs_mk.append((wall, rss, timed_sync()))
            warm_page_cache(models)
            runs_us.append(run_ours(cfg, work / "ours", shard_bytes, args.ours_python))
            os.sync()  # ours fsyncs its shards itself; nothing should be left
        (t_mk, rss_mk, flush_mk), (t_us, rss_us) = min(runs_mk), min(runs_us)
        worst, rel, off = compare(work / "ours", work / "mergekit")
        unexplained = (
            off_outside_threshold_ties(work / "ours", work / "mergekit", cfg) if method == "ties" else None
        )
        rows.append(
            {
                "method": method,
                "mergekit_s": t_mk,
                "mergekit_writeback_s": flush_mk,
                "ours_s": t_us,
                "speedup": t_mk / t_us,
                "mergekit_rss_mb": rss_mk / 1e6,
                "ours_rss_mb": rss_us / 1e6,
                "max_abs_diff": worst,
                "max_rel_diff": rel,
                "fraction_off_by_more_than_bf16_ulp": off,
                "off_elements_not_at_a_threshold_tie": unexplained,
            }
        )
        print(
            f"{method}: mergekit {t_mk:.2f} s (+ {flush_mk:.2f} s writeback after exit), ours {t_us:.2f} s "
            f"({t_mk / t_us:.2f}x); peak RSS "
            f"{rss_mk / 1e6:.0f} / {rss_us / 1e6:.0f} MB; max |diff| {worst:.3g} ({rel:.3g} of max); "
            f"{100 * off:.4f}% of elements differ by more than a bf16 rounding"
            + (
                f", {unexplained} of them not at a tie with the trim threshold"
                if unexplained is not None
                else ""
            ),
            flush=True,
        )
        shutil.rmtree(work)
    print(
        "\n| method | mergekit (s) | its writeback after exit (s) | mergekernels (s) | speed-up "
        "| mergekit peak RSS (MB) | mergekernels peak RSS (MB) | max abs diff "
        "| elements off by > 1 bf16 ulp |"
        "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['method']} | {r['mergekit_s']:.2f} | {r['mergekit_writeback_s']:.2f} | {r['ours_s']:.2f} "
            f"| {r['speedup']:.2f}× "
            f"| {r['mergekit_rss_mb']:.0f} | {r['ours_rss_mb']:.0f} | {r['max_abs_diff']:.3g} "
            f"| {100 * r['fraction_off_by_more_than_bf16_ulp']:.4f}% |"
        )
    print("\n(wall time of each tool's own process, interpreter and torch start-up included for both)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_mb": model_mb, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
