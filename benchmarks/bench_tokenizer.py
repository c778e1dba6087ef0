"""Tokenizer merges against mergekit: the same YAML (``tokenizer_source: union`` and a ``tokenizer``
block), equal outputs, time and peak memory; and what the row gather costs us.

Usage::

    python benchmarks/bench_tokenizer.py --mergekit-python /path/to/venv/bin/python [--ours-python PY]
        [--dir DIR] [--layers 8] [--hidden 1024] [--inter 2816] [--vocab 32000] [--experts 2]
        [--added 64] [--repeats 2] [--json FILE]

The models are bench_mergekit.py's Llama-shaped bf16 checkpoints with a BPE tokenizer of ``--vocab``
tokens; each fine-tuned model adds ``--added`` special tokens (two shared by all, the rest its own)
and as many rows to its embedding and LM head, so the models disagree on what their new ids mean.
Written once under ``--dir`` and reused. Each case runs both tools one after the other, each after a
read of every input (warm page cache) and a ``sync``, ``--repeats`` times; the fastest run counts.
``ours, no tokenizer`` merges the same models without a tokenizer setting (their common rows, no
gather, no tokenizer built): the difference is what the tokenizer merge costs us.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mergekit as bm  # noqa: E402

from mergekernels.bench.checkpoints import ModelSize, cached_models  # noqa: E402

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def write_tokenizer(directory: Path, count: int, added: list[str]) -> None:
    """A BPE tokenizer of ``count`` tokens (letters, then made-up words) plus ``added`` specials."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    while len(vocab) < count:
        vocab[f"w{len(vocab)}"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if added:
        tok.add_special_tokens({"additional_special_tokens": added})
    tok.save_pretrained(str(directory))


def tokenizer_models(root: Path, size: ModelSize, experts: int, added: int) -> list[Path]:
    """[base, expert0, ...] with tokenizers, the experts' vocabulary tensors grown by ``added`` rows."""
    plain = cached_models(root, size, experts)
    out = root / f"tok-l{size.layers}-h{size.hidden}-i{size.inter}-v{size.vocab}-k{experts}-a{added}"
    models = [out / p.name for p in plain]
    if (models[-1] / "tokenizer.json").exists():
        return models
    shutil.rmtree(out, ignore_errors=True)
    print(f"writing tokenizer models to {out} ...", flush=True)
    g = torch.Generator().manual_seed(1)
    for i, (src, dst) in enumerate(zip(plain, models, strict=True)):
        dst.mkdir(parents=True)
        extra = [] if i == 0 else ["<|im_start|>", "<|im_end|>"] + [f"<e{i}_{j}>" for j in range(added - 2)]
        for f in sorted(src.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 - not a dict
            for name in VOCAB_TENSORS:
                if name in tensors and extra:
                    fresh = (torch.randn((len(extra), size.hidden), generator=g) * 0.02).to(
                        tensors[name].dtype
                    )
                    tensors[name] = torch.cat([tensors[name], fresh])
            save_file(tensors, str(dst / f.name))
        shutil.copy(src / "model.safetensors.index.json", dst)
        config = json.loads((src / "config.json").read_text())
        config["vocab_size"] = size.vocab + len(extra)
        (dst / "config.json").write_text(json.dumps(config))
        write_tokenizer(dst, size.vocab, extra)
    return models


def configs(models: list[Path]) -> dict[str, dict]:
    base = {
        "merge_method": "task_arithmetic",
        "base_model": str(models[0]),
        "models": [
            {"model": str(m), "parameters": {"weight": 0.5 + 0.25 * i}} for i, m in enumerate(models[1:])
        ],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    forced = {"<|im_start|>": {"source": str(models[1]), "force": True}}
    return {
        "union": {**base, "tokenizer_source": "union"},
        "block": {**base, "tokenizer": {"source": "union", "pad_to_multiple_of": 64, "tokens": forced}},
        "none": base,  # ours only: the common rows, no tokenizer
    }


def compare(ours: Path, theirs: Path) -> float:
    """The largest |ours - theirs| over every tensor, vocabulary rows matched by token."""
    from transformers import AutoTokenizer

    a, b = bm.load_dir(ours), bm.load_dir(theirs)
    if set(a) != set(b):
        raise SystemExit(f"outputs differ in tensor names: {sorted(set(a) ^ set(b))[:5]}")
    va = AutoTokenizer.from_pretrained(str(ours)).get_vocab()
    vb = AutoTokenizer.from_pretrained(str(theirs)).get_vocab()
    if set(va) != set(vb):
        raise SystemExit(f"vocabularies differ: {sorted(set(va) ^ set(vb))[:5]}")
    worst = 0.0
    for name, y in b.items():
        x = a[name]
        if name in VOCAB_TENSORS:
            order = sorted(vb, key=vb.get)
            x = torch.cat([x[torch.tensor([va[t] for t in order])], x[len(order) :]])
        worst = max(worst, float((x.float() - y.float()).abs().max()))
    return worst


def run_mergekit(python: str, cfg: Path, out: Path) -> tuple[float, int]:
    """bench_mergekit's run, with the tokenizer built (mergekit builds it for a tokenizer setting)."""
    peak_file = out.with_suffix(".peak")
    cmd = [python, "-c", bm._MERGEKIT_SHIM, str(peak_file), str(cfg), str(out), "--quiet"]
    cmd += ["--out-shard-size", str(100 * 1024**2), "--no-write-model-card"]
    t0 = bm.time.perf_counter()
    bm.subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return bm.time.perf_counter() - t0, int(peak_file.read_text().split()[1]) * 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-python", required=True)
    parser.add_argument("--ours-python", default=sys.executable)
    parser.add_argument("--dir", default="/tmp/mk-bench-mergekit")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--added", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    size = ModelSize(args.layers, args.hidden, args.inter, args.vocab)
    models = tokenizer_models(Path(args.dir), size, args.experts, args.added)
    model_mb = size.numel() * 2 / 1e6
    print(
        f"{len(models)} models of {model_mb:.0f} MB (bf16), vocabulary {args.vocab} + {args.added} per expert"
    )
    rows = []
    work = Path(args.dir) / "runs-tokenizer"
    results = {}
    for name, cfg_data in configs(models).items():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        cfg = work / "config.yml"
        cfg.write_text(yaml.safe_dump(cfg_data, sort_keys=False))
        runs_mk, runs_us = [], []
        for _ in range(args.repeats):
            for out in (work / "mergekit", work / "ours"):
                shutil.rmtree(out, ignore_errors=True)
            if name != "none":
                bm.warm_page_cache(models)
                runs_mk.append(run_mergekit(args.mergekit_python, cfg, work / "mergekit"))
                bm.timed_sync()
            bm.warm_page_cache(models)
            runs_us.append(bm.run_ours(cfg, work / "ours", 200 * 1024**2, args.ours_python))
            os.sync()
        t_us, rss_us = min(runs_us)
        row = {"case": name, "ours_s": t_us, "ours_rss_mb": rss_us / 1e6}
        if runs_mk:
            t_mk, rss_mk = min(runs_mk)
            row.update(mergekit_s=t_mk, mergekit_rss_mb=rss_mk / 1e6, speedup=t_mk / t_us)
            row["max_abs_diff"] = compare(work / "ours", work / "mergekit")
        results[name] = row
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(
        "\n| case | mergekit (s) | mergekernels (s) | speed-up | mergekit peak RSS (MB) | ours (MB) "
        "| max abs diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "mergekit_s" in r:
            print(
                f"| {r['case']} | {r['mergekit_s']:.2f} | {r['ours_s']:.2f} | {r['speedup']:.2f}× "
                f"| {r['mergekit_rss_mb']:.0f} | {r['ours_rss_mb']:.0f} | {r['max_abs_diff']:.3g} |"
            )
        else:
            print(f"| {r['case']} (ours only) | — | {r['ours_s']:.2f} | — | — | {r['ours_rss_mb']:.0f} | — |")
    overhead = results["union"]["ours_s"] - results["none"]["ours_s"]
    print(f"\nthe union merge costs us {overhead:+.2f} s over the same merge without a tokenizer setting")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_mb": model_mb, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
