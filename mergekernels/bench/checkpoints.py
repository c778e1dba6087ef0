"""Generated Llama-shaped checkpoints (sharded safetensors, HF layout) and the I/O floor of a merge."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_SHARD_BYTES = 200 * 1024**2


@dataclass(frozen=True)
class ModelSize:
    """A Llama-shaped model: ``layers`` blocks of hidden x hidden attention and hidden x inter MLP
    matrices, embeddings and LM head of vocab x hidden, norms."""

    layers: int
    hidden: int
    inter: int
    vocab: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return layer_shapes(self.hidden, self.inter, self.vocab, self.layers)

    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())


def layer_shapes(hidden: int, inter: int, vocab: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_model(
    directory: Path,
    shapes: dict,
    seed: int,
    base: Path | None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """One model, sharded; the base ~ N(0, 0.02), experts are the base plus N(0, 0.002) (the base is
    read back shard by shard)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    weight_map, shard, size, files = {}, {}, 0, []

    def flush():
        nonlocal shard, size
        if shard:
            name = f"part-{len(files):03d}.safetensors"
            save_file(shard, str(directory / name))
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    handles = {}
    if base is not None:
        index = json.loads((Path(base) / "model.safetensors.index.json").read_text())["weight_map"]
    for name, shape in shapes.items():
        if base is None:
            t = torch.randn(shape, generator=g) * 0.02
        else:
            f = index[name]
            if f not in handles:
                handles[f] = safe_open(str(Path(base) / f), framework="pt")
            t = handles[f].get_tensor(name).float() + torch.randn(shape, generator=g) * 0.002
        shard[name] = t.to(dtype)
        size += shard[name].numel() * shard[name].element_size()
        if size >= shard_bytes:
            flush()
    flush()
    handles.clear()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(llama_config(shapes)))


def llama_config(shapes: dict) -> dict:
    """A LlamaForCausalLM ``config.json`` for shapes from :func:`layer_shapes` (mergekit reads the
    architecture and layer count from it)."""
    vocab, hidden = shapes["model.embed_tokens.weight"]
    layers = sum(1 for n in shapes if n.endswith(".mlp.gate_proj.weight"))
    inter = shapes["model.layers.0.mlp.gate_proj.weight"][0] if layers else 0
    heads = max(1, hidden // 128)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def cached_models(root: Path, size: ModelSize, experts: int) -> list[Path]:
    """[base, expert0, ...] under ``root/<size tag>``, written once (bf16, 200 MB shards) and reused."""
    tag = f"l{size.layers}-h{size.hidden}-i{size.inter}-v{size.vocab}-k{experts}"
    models = [Path(root) / tag / "base"] + [Path(root) / tag / f"expert{i}" for i in range(experts)]
    if not (models[-1] / "model.safetensors.index.json").exists():
        shutil.rmtree(Path(root) / tag, ignore_errors=True)
        print(f"writing {len(models)} checkpoints to {Path(root) / tag} ...", flush=True)
        write_models(Path(root) / tag, size, experts, dtype=torch.bfloat16, shard_bytes=DEFAULT_SHARD_BYTES)
    return models


def write_models(
    root: Path, size: ModelSize, experts: int, *, dtype: torch.dtype, shard_bytes: int, seed: int = 0
) -> list[Path]:
    """A base and `experts` fine-tuned models under root: [base, expert0, ...]."""
    root = Path(root)
    shapes = size.shapes()
    models = [root / "base"] + [root / f"expert{i}" for i in range(experts)]
    write_model(models[0], shapes, seed, None, dtype=dtype, shard_bytes=shard_bytes)
    for i, m in enumerate(models[1:]):
        write_model(m, shapes, seed + i + 1, models[0], dtype=dtype, shard_bytes=shard_bytes)
    return models


def io_floor(
    models: list[Path], out: Path, shard_bytes: int = DEFAULT_SHARD_BYTES, *, durable: bool = False
) -> float:
    """Seconds to read every tensor of every input (one at a time, as a streaming merge holds them)
    and write a model-sized output in shards: the least any merge tool does. Each byte is read once,
    with no copy (one reduction over the file map; a clone would add a copy and fresh pages, ~5x the
    read time with a hot page cache), and the output is written from those maps. ``durable=True`` also
    fsyncs each shard, as the engine must before it names a shard finished (a tool that does not
    fsync leaves the disk writes to the kernel after it exits)."""
    from safetensors import safe_open

    out = Path(out)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    shard, size, n = {}, 0, 0
    for i, m in enumerate(models):
        index = json.loads((Path(m) / "model.safetensors.index.json").read_text())["weight_map"]
        for f in sorted(set(index.values())):
            with safe_open(str(Path(m) / f), framework="pt") as h:
                for k in h.keys():
                    t = h.get_tensor(k)  # a view of the file map: nothing is read yet
                    if t.numel():
                        t.reshape(-1).view(torch.uint8).max()  # read every byte once
                    if i == 0:  # the output is one model's worth of tensors
                        shard[k] = t
                        size += t.numel() * t.element_size()
                        if size >= shard_bytes:
                            _save(shard, out / f"floor-{n}.safetensors", durable)
                            shard, size, n = {}, 0, n + 1
    if shard:
        _save(shard, out / f"floor-{n}.safetensors", durable)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out)
    return elapsed


def _save(tensors: dict, path: Path, durable: bool) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    if durable:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
