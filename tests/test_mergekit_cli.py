"""mergekit's command line and model references: hub ids from a local hub cache (offline),
mergekit-yaml's flags, the model card, leniency and --strict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergekernels import hub
from mergekernels.cli import main, parse_mergekit_size
from mergekernels.engine import merge_checkpoints

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"model.layers.{i}.mlp.weight": torch.randn(8, 6, generator=g) for i in range(3)}
    sd["model.embed_tokens.weight"] = torch.randn(10, 6, generator=g)
    return sd


def _write(directory: Path, sd: dict, architecture: str = "LlamaForCausalLM") -> None:
    directory.mkdir(parents=True)
    save_file(sd, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(
        json.dumps({"architectures": [architecture], "num_hidden_layers": 3})
    )
    (directory / "tokenizer_config.json").write_text("{}")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache laid out as huggingface_hub writes it, with the hub unreachable (offline)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    sds = {}
    for i, repo in enumerate(("org/base", "org/math", "org/code")):
        sds[repo] = _model(i)
        folder = cache / f"models--{repo.replace('/', '--')}"
        _write(folder / "snapshots" / COMMIT, sds[repo])
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(COMMIT)
    (cache / "models--org--code" / "refs" / "v1").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache, sds


def test_hub_ids_resolve_offline_from_the_cache(hub_cache, tmp_path):
    cache, sds = hub_cache
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "org/base",
        "models": [{"model": "org/math", "parameters": {"weight": 0.5}}, {"model": "org/code@v1"}],
    }
    merge_checkpoints(cfg, tmp_path / "out", device="cpu", quiet=True, hub_cache=cache)
    merged = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))
    for name, b in sds["org/base"].items():
        expected = b + 0.5 * (sds["org/math"][name] - b) + (sds["org/code"][name] - b)
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model:\n- org/base\n- org/math\n- org/code@v1" in card
    assert "task_arithmetic" in card and "(https://huggingface.co/org/math)" in card
    assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) == cfg
    assert (tmp_path / "out" / "mergekit_config.yml").exists()


def test_an_unknown_hub_id_is_named(hub_cache, tmp_path):
    cache, _ = hub_cache
    with pytest.raises(
        hub.ModelNotFound, match=r"model 'org/nothing': no such local directory .*, and not in the hub cache"
    ):
        hub.resolve("org/nothing", cache_dir=cache)
    with pytest.raises(hub.ModelNotFound, match="org/base@v9"):
        hub.resolve("org/base@v9", cache_dir=cache)
    assert hub.resolve("org/base@main", cache_dir=cache).name == COMMIT
    assert not hub.is_hub_id("./org/base") and not hub.is_hub_id("a/b/c") and hub.is_hub_id("a-b/c.d@x")


def test_mergekit_sizes():
    assert parse_mergekit_size("5B") == 5 * 10**9 and parse_mergekit_size("500M") == 5 * 10**8
    assert parse_mergekit_size("1000") == 1000 and parse_mergekit_size("2k") == 2000
    assert parse_mergekit_size("4GiB") == 4 * 2**30
    with pytest.raises(ValueError, match="--out-shard-size"):
        parse_mergekit_size("lots")


@pytest.fixture
def local(tmp_path):
    sds = {}
    for i, name in enumerate(("base", "a", "b")):
        sds[name] = _model(i)
        _write(tmp_path / name, sds[name])
    cfg = {
        "merge_method": "dare_linear",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}, "b"],
        "name": "my-merge",  # mergekit ignores it
    }
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg))
    return tmp_path, sds


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in directory.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def test_mergekit_yaml_flags(local, capsys):
    root, sds = local
    args = ["merge", str(root / "merge.yml"), str(root / "out"), "--device", "cpu", "--quiet"]
    code = main(
        [
            *args,
            "--out-shard-size",
            "400",
            "--no-copy-tokenizer",
            "--random-seed",
            "7",
            "--lazy-unpickle",
            "--low-cpu-memory",
            "--no-write-model-card",
            "-j",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "note: --lazy-unpickle changes nothing here" in err and "note: --low-cpu-memory" in err
    assert "warning: " in err and "top-level key 'name'" in err  # ignored once, with a warning
    files = {p.name for p in (root / "out").iterdir()}
    assert len([f for f in files if f.endswith(".safetensors")]) >= 3  # 400-byte shards
    assert "tokenizer_config.json" not in files and "README.md" not in files and "config.json" in files
    seven = _tensors(root / "out")
    assert main([*args, "--random-seed", "8", "--overwrite"]) == 0
    eight = _tensors(root / "out")
    assert any(not torch.equal(seven[n], eight[n]) for n in seven)  # the seed reaches the masks
    assert main([*args, "--random-seed", "7", "--overwrite"]) == 0
    assert all(torch.equal(seven[n], t) for n, t in _tensors(root / "out").items())
    capsys.readouterr()
    assert main([*args, "--strict", "--overwrite"]) == 2
    assert "unknown top-level key 'name'" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--no-safe-serialization"]) == 2


def test_mixing_architectures_needs_allow_crimes(local, capsys):
    root, sds = local
    shutil.rmtree(root / "b")
    _write(root / "b", sds["b"], architecture="MistralForCausalLM")
    args = ["merge", str(root / "merge.yml"), str(root / "out"), "--device", "cpu", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "different architectures" in err and "MistralForCausalLM" in err and "--allow-crimes" in err
    assert main([*args, "--allow-crimes"]) == 0


def test_multi_document_configs_run_in_order(local, capsys):
    root, sds = local
    docs = [
        {
            "name": "both",
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [
                {"model": "a", "parameters": {"weight": 0.5}},
                {"model": "b", "parameters": {"weight": 0.5}},
            ],
        },
        {
            "merge_method": "linear",
            "models": [
                {"model": "both", "parameters": {"weight": 1.0}},
                {"model": "a", "parameters": {"weight": 3.0}},
            ],
        },
    ]
    (root / "multi.yml").write_text(yaml.safe_dump_all(docs))
    args = ["merge", str(root / "multi.yml"), str(root / "out"), "--device", "cpu", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    both = _tensors(root / "out" / "both")
    final = _tensors(root / "out")
    for name, b in sds["base"].items():
        expected_both = b + 0.5 * (sds["a"][name] - b) + 0.5 * (sds["b"][name] - b)
        torch.testing.assert_close(both[name], expected_both, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(final[name], (both[name] + 3 * sds["a"][name]) / 4, rtol=1e-6, atol=1e-6)
    assert not (root / "out.parts").exists()
    assert main([*args, "--overwrite"]) == 0  # again, from scratch
    assert torch.equal(
        _tensors(root / "out" / "both")["model.embed_tokens.weight"], both["model.embed_tokens.weight"]
    )
    for bad, pattern in (
        ([docs[1], docs[0]], "document 1 has no name; only the last document"),
        ([docs[0], docs[0], docs[1]], "the name 'both' is used twice"),
        ([docs[0], "text"], "document 2 must be a mapping"),
    ):
        (root / "bad.yml").write_text(yaml.safe_dump_all(bad))
        assert main(["merge", str(root / "bad.yml"), str(root / "o2"), "--quiet"]) == 2
        assert pattern in capsys.readouterr().err


def test_multi_document_redo_modules_and_relative_output(local, capsys, monkeypatch):
    root, sds = local
    first = {
        "name": "step",
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 0.5}}],
    }
    second = {
        "name": "again",
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "modules": {"": {"models": [{"model": "step", "parameters": {"weight": 1.0}}]}},  # a module's model
    }
    final = {"merge_method": "passthrough", "models": ["nowhere"]}  # fails: no such model
    (root / "configs").mkdir()
    config = root / "configs" / "multi.yml"
    config.write_text(yaml.safe_dump_all([first, second, final]))
    for doc in (first, second):  # paths relative to the configuration's directory
        doc["base_model"] = "../base"
    first["models"][0]["model"] = "../a"
    config.write_text(yaml.safe_dump_all([first, second, final]))
    monkeypatch.chdir(root)
    args = ["merge", str(config), "runs/out", "--device", "cpu", "--quiet"]  # OUT_DIR relative to cwd
    assert main(args) == 2 and "nowhere" in capsys.readouterr().err
    assert (root / "runs" / "out.parts" / "again").is_dir()  # the intermediates were kept
    # fix the final document and change the first: both intermediates are redone
    first["models"][0]["parameters"]["weight"] = 1.0
    final["models"] = ["again"]
    config.write_text(yaml.safe_dump_all([first, second, final]))
    assert main(args) == 0, capsys.readouterr().err
    out = _tensors(root / "runs" / "out")
    for name in sds["base"]:
        torch.testing.assert_close(out[name], sds["a"][name], rtol=1e-6, atol=1e-6)  # base + 1.0 (a - base)
    assert sorted(p.name for p in (root / "runs" / "out").iterdir() if p.is_dir()) == ["again", "step"]


def test_cuda_flags_and_local_paths_in_the_card(local, capsys):
    root, sds = local
    (root / "models").mkdir()
    shutil.move(str(root / "base"), str(root / "models" / "base"))
    cfg = {"merge_method": "task_arithmetic", "base_model": "models/base", "models": ["a"]}
    (root / "m.yml").write_text(yaml.safe_dump(cfg))
    args = ["merge", str(root / "m.yml"), str(root / "out"), "--quiet"]
    assert main([*args, "--device", "cpu", "--cuda"]) == 2
    assert "give --device or --cuda / --no-cuda, not both" in capsys.readouterr().err
    assert main([*args, "--no-cuda"]) == 0  # mergekit's --no-cuda: the CPU
    card = (root / "out" / "README.md").read_text()
    front_matter = card.split("---")[1]
    assert "base_model" not in front_matter and "- `models/base`" in card  # a local path, not a hub id
