"""model+lora: a PEFT adapter's update s * B @ A added as tensors are read (float64 references from
PEFT's documented rules; tests/test_mergekit_oracle.py compares with mergekit + PEFT)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekernels.engine import CheckpointError, merge_checkpoints
from mergekernels.engine.checkpoint import Checkpoint
from mergekernels.engine.lora import LoraCheckpoint


def _model(root: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {
        "model.embed_tokens.weight": torch.randn(13, 6, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 6, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(6, 9, generator=g).to(torch.bfloat16),
        "model.layers.0.attn.c_attn.weight": torch.randn(6, 18, generator=g).to(torch.bfloat16),  # Conv1D
        "lm_head.weight": torch.randn(13, 6, generator=g).to(torch.bfloat16),
    }
    root.mkdir()
    save_file(sd, str(root / "model.safetensors"))
    return sd


def _adapter(root: Path, tensors: dict, **config) -> None:
    root.mkdir()
    save_file(tensors, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config})
    )


def test_updates_match_the_rules_whole_and_in_row_chunks(tmp_path):
    sd = _model(tmp_path / "m")
    g = torch.Generator().manual_seed(1)
    p = "base_model.model."
    factors = {
        f"{p}model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 6, generator=g),
        f"{p}model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(6, 2, generator=g),
        f"{p}model.layers.0.mlp.down_proj.lora_A.weight": torch.randn(3, 9, generator=g),  # rank 3
        f"{p}model.layers.0.mlp.down_proj.lora_B.weight": torch.randn(6, 3, generator=g),
        f"{p}model.embed_tokens.lora_embedding_A": torch.randn(2, 13, generator=g),
        f"{p}model.embed_tokens.lora_embedding_B": torch.randn(6, 2, generator=g),
        f"{p}lm_head.weight": torch.zeros(13, 6),  # modules_to_save: saved whole, replaces the model's
    }
    _adapter(tmp_path / "lora", factors, use_rslora=True, alpha_pattern={"down_proj": 9.0})
    ckpt = LoraCheckpoint(Checkpoint(tmp_path / "m"), tmp_path / "lora")

    def expected(name: str, a: str, b: str, alpha: float, rank: int, transposed: bool) -> torch.Tensor:
        delta = factors[f"{p}{b}"].double() @ factors[f"{p}{a}"].double()
        delta = delta.T if transposed else delta
        return (sd[name].double() + alpha / math.sqrt(rank) * delta).to(torch.bfloat16)

    q = "model.layers.0.self_attn.q_proj"
    cases = {
        f"{q}.weight": expected(f"{q}.weight", f"{q}.lora_A.weight", f"{q}.lora_B.weight", 4, 2, False),
        "model.layers.0.mlp.down_proj.weight": expected(
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.down_proj.lora_A.weight",
            "model.layers.0.mlp.down_proj.lora_B.weight",
            9.0,
            3,
            False,
        ),
        "model.embed_tokens.weight": expected(
            "model.embed_tokens.weight",
            "model.embed_tokens.lora_embedding_A",
            "model.embed_tokens.lora_embedding_B",
            4,
            2,
            True,
        ),
    }
    for name, want in cases.items():
        got = ckpt.read(name)
        assert got.dtype == torch.bfloat16
        ulp = 2.0 ** (torch.floor(torch.log2(want.double().abs().clamp_min(1e-30))) - 7)
        assert ((got.double() - want.double()).abs() <= ulp).all(), name
        pieces = torch.cat(
            [ckpt.read(name, (r, min(r + 4, got.shape[0]))) for r in range(0, got.shape[0], 4)]
        )
        assert torch.equal(pieces, got), name  # row chunks: the same bytes
    assert torch.equal(ckpt.read("lm_head.weight"), torch.zeros(13, 6, dtype=torch.bfloat16))
    assert torch.equal(
        ckpt.read("model.layers.0.attn.c_attn.weight"), sd["model.layers.0.attn.c_attn.weight"]
    )


def test_fan_in_fan_out_transposes(tmp_path):
    sd = _model(tmp_path / "m")
    name = "model.layers.0.attn.c_attn"
    a, b = torch.randn(2, 6), torch.randn(18, 2)  # Conv1D weight [in 6, out 18]
    _adapter(tmp_path / "lora", {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b}, fan_in_fan_out=True)
    got = LoraCheckpoint(Checkpoint(tmp_path / "m"), tmp_path / "lora").read(f"{name}.weight")
    want = (sd[f"{name}.weight"].double() + 2.0 * (b.double() @ a.double()).T).to(torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "tensors, config, pattern",
    [
        ({"m.lora_A.weight": torch.zeros(2, 6)}, {}, "has only one of its two LoRA factors"),
        (
            {"x.lora_A.weight": torch.zeros(2, 6), "x.lora_B.weight": torch.zeros(6, 2)},
            {},
            "matches no tensor",
        ),
        (
            {"lm_head.lora_A.weight": torch.zeros(2, 7), "lm_head.lora_B.weight": torch.zeros(13, 2)},
            {},
            "shape",
        ),
        ({}, {"use_dora": True}, "DoRA"),
        (
            {"base_model.model.lm_head.weight": torch.zeros(12, 6)},
            {},
            r"has shape \[12, 6\], 'lm_head.weight'",
        ),
        ({}, {"peft_type": "IA3"}, "not a LoRA adapter"),
    ],
)
def test_bad_adapters_are_named(tmp_path, tensors, config, pattern):
    _model(tmp_path / "m")
    _adapter(tmp_path / "lora", tensors, **config)
    with pytest.raises(CheckpointError, match=pattern):
        LoraCheckpoint(Checkpoint(tmp_path / "m"), tmp_path / "lora")


def test_model_plus_lora_in_a_config(tmp_path):
    sd = _model(tmp_path / "base")
    name = "model.layers.0.self_attn.q_proj"
    a, b = torch.randn(2, 6), torch.randn(6, 2)
    _adapter(tmp_path / "lora", {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b})
    cfg = {"merge_method": "passthrough", "models": ["base+lora"]}
    (tmp_path / "merge.yml").write_text(json.dumps(cfg))
    merge_checkpoints(tmp_path / "merge.yml", tmp_path / "out", device="cpu", quiet=True)
    merged = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))
    want = (sd[f"{name}.weight"].float() + 2.0 * (b @ a)).to(torch.bfloat16)
    assert torch.equal(merged[f"{name}.weight"], want)
    assert torch.equal(merged["lm_head.weight"], sd["lm_head.weight"])
