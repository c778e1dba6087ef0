"""The planner and mergekit's parameter language: gradients, filters, precedence, slices.

References are written from mergekit's documented rules (see mergekernels/parameters.py and
mergekernels/planner.py); tests/test_mergekit_oracle.py checks the same features against mergekit
itself when its environment is available.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergekernels as mk
from mergekernels.config import load_config
from mergekernels.engine import CheckpointError, merge_checkpoints
from mergekernels.parameters import UNSET, Filtered, Gradient, evaluate
from mergekernels.planner import PlanError, plan_config, position, split_layer

LAYERS = 5


def test_gradients_interpolate_piecewise_linearly():
    g = Gradient((0.0, 1.0, 0.5))
    assert g.at(0.0) == 0.0 and g.at(1.0) == 0.5
    assert g.at(0.25) == pytest.approx(0.5) and g.at(0.5) == 1.0 and g.at(0.75) == pytest.approx(0.75)
    assert Gradient((2.0,)).at(0.7) == 2.0
    assert Gradient(()).at(0.3) is UNSET
    # values that are not numbers are picked, not interpolated
    assert [Gradient((True, False)).at(t) for t in (0, 0.5, 0.99, 1)] == [True, True, True, False]


def test_filters_first_match_wins_and_fall_through():
    f = Filtered((("self_attn", Gradient((0.0, 1.0))), ("mlp", 0.2), (None, 0.5)))
    assert evaluate(f, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate(f, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.2
    assert evaluate(f, "model.norm.weight", 0.5) == 0.5
    assert evaluate(Filtered((("mlp", 1.0),)), "lm_head.weight", 0.0) is UNSET
    assert evaluate(Filtered((("*", 3.0),)), "anything", 0.0) == 3.0


def test_layer_names_and_positions():
    assert split_layer("model.layers.12.mlp.up_proj.weight") == ("model.layers.", 12, "mlp.up_proj.weight")
    assert split_layer("transformer.h.0.attn.c_attn.bias") == ("transformer.h.", 0, "attn.c_attn.bias")
    assert split_layer("blocks.3.norm.weight") == ("blocks.", 3, "norm.weight")
    assert split_layer("model.embed_tokens.weight") is None and split_layer("lm_head.weight") is None
    assert [position(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert position(0, 1) == 1.0  # a one-layer slice takes the last anchor, as mergekit


def _model(seed: int, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(11, 6, generator=g)}
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(6, 6, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(7, 6, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(6, generator=g)
    sd["model.norm.weight"] = torch.randn(6, generator=g)
    sd["lm_head.weight"] = torch.randn(11, 6, generator=g)
    return sd


@pytest.fixture
def models(tmp_path):
    sds = {}
    for i, name in enumerate(("base", "a", "b")):
        sds[name] = _model(i)
        (tmp_path / name).mkdir()
        save_file(sds[name], str(tmp_path / name / "model.safetensors"))
        config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": LAYERS, "hidden_size": 6}
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    return tmp_path, sds


def _merge(tmp_path: Path, cfg: dict) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    merge_checkpoints(cfg, out, device="cpu", quiet=True, overwrite=True)
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(str(f)))
    return merged


def _ta(base, fts, weights, scale=1.0):
    """task arithmetic in float64: base + scale * sum_t w_t (ft_t - base)"""
    out = base.double() + scale * sum(
        w * (x.double() - base.double()) for w, x in zip(weights, fts, strict=True)
    )
    return out.to(base.dtype)


def test_gradient_and_filters_per_tensor_through_the_engine(models):
    root, sds = models
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [
            {"model": str(root / "a"), "parameters": {"weight": [0.0, 1.0]}},
            {
                "model": str(root / "b"),
                "parameters": {"weight": [{"filter": "self_attn", "value": [1.0, 0.0, 0.5]}, {"value": 0.3}]},
            },
        ],
        "parameters": {"lambda": [{"filter": "mlp", "value": 2.0}, {"value": [1.0, 0.5]}]},
    }
    merged = _merge(root, cfg)
    for name, tensor in sds["base"].items():
        parts = split_layer(name)
        t = 0.0 if parts is None else position(parts[1], LAYERS)
        w_a = t
        w_b = (1 - 2 * t if t <= 0.5 else (t - 0.5)) if "self_attn" in name else 0.3
        lam = 2.0 if "mlp" in name else 1.0 - 0.5 * t
        expected = _ta(tensor, [sds["a"][name], sds["b"][name]], [w_a, w_b], lam)
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6, msg=name)


def test_precedence_source_over_slice_over_global(models):
    root, sds = models
    base, a, b = (str(root / n) for n in ("base", "a", "b"))
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, LAYERS]},
                    {"model": a, "layer_range": [0, LAYERS], "parameters": {"weight": 0.7}},
                    {"model": b, "layer_range": [0, LAYERS]},
                ],
                "parameters": {"weight": [{"filter": "mlp", "value": 0.2}]},  # no fallback: global below
            }
        ],
        "parameters": {"weight": 0.4},
    }
    merged = _merge(root, cfg)
    for name, tensor in sds["base"].items():
        w_b = 0.2 if "mlp" in name else 0.4
        expected = _ta(tensor, [sds["a"][name], sds["b"][name]], [0.7, w_b])
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6, msg=name)


def test_frankenmerge_stacks_layers_and_rewrites_the_layer_count(models):
    root, sds = models
    base, a, b = (str(root / n) for n in ("base", "a", "b"))
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": base, "layer_range": [0, 3]}]},
            {"sources": [{"model": a, "layer_range": [1, 5], "parameters": {"scale": [1.0, 0.5]}}]},
            {"sources": [{"model": b, "layer_range": [4, 5]}]},
        ],
        "dtype": "float32",
    }
    merged = _merge(root, cfg)
    config = json.loads((root / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 + 4 + 1
    expected = {"model.embed_tokens.weight": sds["base"]["model.embed_tokens.weight"]}
    out_layer = 0
    for who, (start, stop) in (("base", (0, 3)), ("a", (1, 5)), ("b", (4, 5))):
        for i in range(start, stop):
            t = position(i - start, stop - start)
            for rest in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
                x = sds[who][f"model.layers.{i}.{rest}"]
                scale = 1.0 - 0.5 * t if who == "a" else None
                expected[f"model.layers.{out_layer}.{rest}"] = x if scale is None else x * scale
            out_layer += 1
    # the final norm and lm_head come from the last slice's source, the embeddings from the first's
    expected["model.norm.weight"] = sds["b"]["model.norm.weight"]
    expected["lm_head.weight"] = sds["b"]["lm_head.weight"]
    assert list(merged) and set(merged) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=0, msg=name)


def test_layer_wise_slices_merge_remapped_layers(models):
    root, sds = models
    base, a = str(root / "base"), str(root / "a")
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [2, 4]},
                    {"model": a, "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}},
                ]
            },
            {
                "sources": [
                    {"model": base, "layer_range": [4, 5]},
                    {"model": a, "layer_range": [4, 5], "parameters": {"weight": [0.0, 1.0]}},
                ]
            },
        ],
    }
    merged = _merge(root, cfg)
    assert json.loads((root / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    pairs = [(0, 2, 0, 0.0), (1, 3, 1, 1.0), (2, 4, 4, 1.0)]  # out layer, base layer, a's layer, weight
    for out, lb, la, w in pairs:
        for rest in ("self_attn.q_proj.weight", "mlp.up_proj.weight"):
            b = sds["base"][f"model.layers.{lb}.{rest}"]
            x = sds["a"][f"model.layers.{la}.{rest}"]
            expected = _ta(b, [x], [w])
            torch.testing.assert_close(merged[f"model.layers.{out}.{rest}"], expected, rtol=1e-6, atol=1e-6)
    emb = "model.embed_tokens.weight"  # outside the layers: t = 0, the first anchor (weight 0)
    torch.testing.assert_close(merged[emb], sds["base"][emb])


def test_plan_errors_name_the_slice_and_the_model(models):
    root, sds = models
    base, a = str(root / "base"), str(root / "a")
    catalogs = {p: load_file(str(Path(p) / "model.safetensors")) for p in (base, a)}

    def plan(slices, **extra):
        return plan_config(
            load_config({"merge_method": "task_arithmetic", "base_model": base, "slices": slices, **extra}),
            catalogs,
        )

    too_far = [{"sources": [{"model": base, "layer_range": [0, 6]}, {"model": a, "layer_range": [0, 6]}]}]
    with pytest.raises(PlanError, match=r"slices\[0\]: .*asks for layers \[0, 6\] but .*base has 5 layer"):
        plan(too_far)
    catalogs[base] = {**catalogs[base], "vision.blocks.0.w": torch.zeros(2)}
    with pytest.raises(
        PlanError, match="one stack of layers.*found stacks: 'model.layers.', 'vision.blocks.'"
    ):
        plan([{"sources": [{"model": base, "layer_range": [0, 2]}]}])
    # the engine reports it as a checkpoint error naming the same
    (root / "base" / "model.safetensors").unlink()
    save_file(catalogs[base], str(root / "base" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="found stacks"):
        merge_checkpoints(
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": base, "layer_range": [0, 1]}]}],
            },
            root / "o",
            quiet=True,
        )


def test_mk_merge_and_the_engine_share_the_planner(models):
    root, sds = models
    cfg = {
        "merge_method": "ties",
        "dialect": "mergekernels",
        "base_model": str(root / "base"),
        "models": [str(root / "a"), str(root / "b")],
        "parameters": {"density": 0.4},
        "exclude": ["lm_head.*"],
    }
    merged = _merge(root, cfg)
    expected = mk.merge(sds["base"], [sds["a"], sds["b"]], method="ties", density=0.4, exclude=["lm_head.*"])
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0, msg=name)


def test_modules_by_tensor_name_prefix(models):
    root, sds = models
    base, a, b = (str(root / n) for n in ("base", "a", "b"))
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "modules": {
            "model.layers": {
                "models": [{"model": a, "parameters": {"weight": [0.0, 1.0]}}],
                "parameters": {"lambda": 0.5},
            },
            "": {"models": [{"model": b}]},  # every other tensor
        },
        "parameters": {"weight": 0.25, "lambda": 2.0},
    }
    merged = _merge(root, cfg)
    for name, tensor in sds["base"].items():
        parts = split_layer(name)
        if parts is not None:  # module parameters over global ones; t within the module's stack
            expected = _ta(tensor, [sds["a"][name]], [position(parts[1], LAYERS)], 0.5)
        else:
            expected = _ta(tensor, [sds["b"][name]], [0.25], 2.0)
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6, msg=name)
    cfg["modules"] = {"text_decoder": cfg["modules"]["model.layers"]}
    with pytest.raises(
        CheckpointError, match="modules.text_decoder: no tensor .* starts with 'text_decoder'"
    ):
        _merge(root, cfg)
    cfg["modules"] = {"model.layers": {"models": [a]}}
    with pytest.raises(
        CheckpointError, match=r"3 tensor\(s\) of .* belong to no module, e.g. 'lm_head.weight'"
    ):
        _merge(root, cfg)


def test_input_embeddings_by_name():
    from mergekernels.planner import _EMBEDDING

    for name in (
        "model.embed_tokens.weight",
        "gpt_neox.embed_in.weight",
        "transformer.wte.weight",
        "wpe.weight",
    ):
        assert _EMBEDDING.search(name), name
    for name in ("embed_out.weight", "lm_head.weight", "model.norm.weight", "transformer.ln_f.bias"):
        assert not _EMBEDDING.search(name), name


def test_one_module_with_gradients_varies_per_layer(models):
    root, sds = models
    base, a = str(root / "base"), str(root / "a")
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "modules": {"": {"models": [a], "parameters": {"weight": [0.0, 1.0], "lambda": 0.5}}},
    }
    merged = _merge(root, cfg)
    for name, tensor in sds["base"].items():
        parts = split_layer(name)
        w = 0.0 if parts is None else position(parts[1], LAYERS)
        torch.testing.assert_close(
            merged[name], _ta(tensor, [sds["a"][name]], [w], 0.5), rtol=1e-6, atol=1e-6
        )


def test_per_model_values_match_input_names_shared_ones_the_output_name(models):
    """mergekit: per-model parameters are looked up at every level with the INPUT tensor's name,
    shared ones with the OUTPUT tensor's name."""
    root, sds = models
    base, a = str(root / "base"), str(root / "a")
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "slices": [
            {
                "sources": [{"model": base, "layer_range": [2, 4]}, {"model": a, "layer_range": [2, 4]}],
                "parameters": {"weight": [{"filter": "layers.3.", "value": 0.3}]},  # input names
            }
        ],
        "parameters": {"weight": 1.0, "lambda": [{"filter": "layers.0.", "value": 0.5}, {"value": 2.0}]},
    }
    merged = _merge(root, cfg)
    for out, source_layer, weight, lam in ((0, 2, 1.0, 0.5), (1, 3, 0.3, 2.0)):
        rest = "mlp.up_proj.weight"
        b = sds["base"][f"model.layers.{source_layer}.{rest}"]
        x = sds["a"][f"model.layers.{source_layer}.{rest}"]
        torch.testing.assert_close(
            merged[f"model.layers.{out}.{rest}"], _ta(b, [x], [weight], lam), rtol=1e-6, atol=1e-6
        )


def test_linear_slices_without_a_base_use_each_slices_models(models):
    root, sds = models
    base, a, b = (str(root / n) for n in ("base", "a", "b"))
    cfg = {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]},
            {"sources": [{"model": base, "layer_range": [2, 5]}, {"model": b, "layer_range": [2, 5]}]},
        ],
        "parameters": {"weight": 1.0},
    }
    merged = _merge(root, cfg)
    name = "model.layers.3.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], (sds["base"][name] + sds["b"][name]) / 2, rtol=1e-6, atol=1e-6)
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], (sds["a"][name] + sds["b"][name]) / 2, rtol=1e-6, atol=1e-6)
