"""The planner's overhead on a 2,000-tensor model: configuration to one task per output tensor.

Usage::

    python benchmarks/bench_planner.py [--layers 222] [--repeats 5] [--json FILE]

A Llama-shaped model of ``--layers`` layers (9 tensors per layer, plus embeddings, final norm and
lm_head: 2,001 tensors at the default 222 layers) is described by its tensor names, shapes and dtypes
only (the planner reads nothing else), for a base and three fine-tuned models. Timed, best of
``--repeats``: ``load_config`` and ``plan_config`` for

- ``models``: the models form with scalar parameters (one translation for every tensor);
- ``gradients``: per-layer gradients and filters on weight, density and lambda (a translation per
  distinct combination of values: about one per layer and filter);
- ``slices``: a layer-wise merge in four slices with per-source gradients.

and, for the scale of it, a merge's own work: the same model's headers read from disk
(``Checkpoint``, one safetensors file per 100 tensors of 1 element) and the engine's plan phase on it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergekernels.config import load_config
from mergekernels.engine.checkpoint import Checkpoint
from mergekernels.planner import plan_config

LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


class Meta:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16):
        self.shape, self.dtype = shape, dtype


def catalog(layers: int) -> dict[str, Meta]:
    h, i, v = 4096, 11008, 32000
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h)}
    shapes.update({"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)})
    out = {"model.embed_tokens.weight": Meta((v, h))}
    for layer in range(layers):
        for rest in LAYER_TENSORS:
            module = rest.split(".")[-2]
            out[f"model.layers.{layer}.{rest}"] = Meta(shapes.get(module, (h,)))
    out["model.norm.weight"] = Meta((h,))
    out["lm_head.weight"] = Meta((v, h))
    return out


def configs(layers: int) -> dict[str, dict]:
    models = ["/m/base", "/m/a", "/m/b", "/m/c"]
    gradient = {
        "weight": [
            {"filter": "self_attn", "value": [0.2, 0.8, 0.5]},
            {"filter": "mlp", "value": [1, 0]},
            {"value": 0.5},
        ]
    }
    quarter = layers // 4
    return {
        "models": {
            "merge_method": "ties",
            "base_model": models[0],
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.3}} for m in models[1:]],
        },
        "gradients": {
            "merge_method": "ties",
            "base_model": models[0],
            "models": [{"model": m, "parameters": {**gradient, "density": [0.2, 0.6]}} for m in models[1:]],
            "parameters": {"lambda": [1.0, 0.8, 1.2]},
        },
        "slices": {
            "merge_method": "task_arithmetic",
            "base_model": models[0],
            "slices": [
                {
                    "sources": [
                        {"model": m, "layer_range": [k * quarter, (k + 1) * quarter if k < 3 else layers]}
                        | ({"parameters": gradient} if m != models[0] else {})
                        for m in models
                    ]
                }
                for k in range(4)
            ],
        },
    }


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=222)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cat = catalog(args.layers)
    catalogs = {m: cat for m in ("/m/base", "/m/a", "/m/b", "/m/c")}
    results = {"tensors": len(cat)}
    for name, cfg in configs(args.layers).items():
        load_s = best(lambda cfg=cfg: load_config(cfg), args.repeats)
        plan_s = best(lambda cfg=cfg: plan_config(load_config(cfg), catalogs), args.repeats) - load_s
        config = load_config(cfg)
        plan = plan_config(config, catalogs)
        results[name] = {
            "load_config_ms": 1e3 * load_s,
            "plan_ms": 1e3 * plan_s,
            "tasks": len(plan.tasks),
            "translations": len([k for k in config._cache if k != "uniform"]),
            "us_per_tensor": 1e6 * plan_s / len(plan.tasks),
        }
    with tempfile.TemporaryDirectory() as tmp:
        names = list(cat)
        for who in ("base", "a", "b", "c"):
            (Path(tmp) / who).mkdir()
            index = {}
            for start in range(0, len(names), 100):
                file = f"model-{start // 100:05d}.safetensors"
                save_file(
                    {n: torch.zeros(1) for n in names[start : start + 100]}, str(Path(tmp) / who / file)
                )
                index.update(dict.fromkeys(names[start : start + 100], file))
            (Path(tmp) / who / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
        headers_s = best(lambda: [Checkpoint(Path(tmp) / w) for w in ("base", "a", "b", "c")], args.repeats)
        results["headers_ms"] = 1e3 * headers_s
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
