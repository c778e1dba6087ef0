"""mergekit itself as the oracle: run a merge config through mergekit and through ``mergekernels merge``
and compare the two outputs tensor by tensor.

mergekit (LGPL) is never imported here: it runs as a separate program from its own cached virtual
environment with a CPU torch (``make mergekit-venv``; ``requirements/mergekit.txt``), at
``<cache>/mergekit-venv-<python tag>-<first 12 hex of sha256(requirements/mergekit.txt)>`` where
<cache> is the Makefile's CACHE_DIR: ``$CACHE_DIR``, else ``$XDG_CACHE_HOME/mergekernels``, else
``~/.cache/mergekernels``. ``MK_ORACLE_PYTHON`` names another interpreter that has mergekit.

The checkpoints are tiny Llama / Mistral / Qwen2 models written here with torch + safetensors (no
tokenizer files: mergekit only logs that it has none to copy). Configs name models by absolute path:
mergekit resolves a relative path against its working directory, ``mergekernels merge`` against the
YAML file's directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements" / "mergekit.txt"
TIMEOUT_S = 300

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Explicit mantissa bits: one ulp of x is 2**(floor(log2 |x|) - bits) (subnormals: the spacing at tiny).
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


# --- the oracle's environment -----------------------------------------------------------------------


def cache_dir() -> Path:
    """The Makefile's CACHE_DIR: ``$CACHE_DIR`` (make takes it from the environment), else
    ``$XDG_CACHE_HOME/mergekernels``, else ``~/.cache/mergekernels``."""
    if os.environ.get("CACHE_DIR"):
        return Path(os.environ["CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "mergekernels"


def oracle_venv() -> Path:
    """Where ``make mergekit-venv`` builds mergekit's virtual environment for this Python."""
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    return cache_dir() / f"mergekit-venv-{tag}-{digest}"


def oracle_python() -> Path | None:
    """The python of the mergekit environment: ``$MK_ORACLE_PYTHON`` if set (it must exist), else
    the cached environment's, if it was built to the end (its ``.complete`` marker); else None."""
    override = os.environ.get("MK_ORACLE_PYTHON")
    if override:
        return Path(override) if Path(override).exists() else None
    venv = oracle_venv()
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file() and python.exists():
        return python
    return None


def skip_reason() -> str:
    if os.environ.get("MK_ORACLE_PYTHON"):
        return f"MK_ORACLE_PYTHON={os.environ['MK_ORACLE_PYTHON']} does not exist"
    return (
        "mergekit oracle environment not built: run `make mergekit-venv` (creates "
        f"{oracle_venv()} from requirements/mergekit.txt, ~1 minute, CPU torch) or set "
        "MK_ORACLE_PYTHON to a python that has mergekit"
    )


def sdist_path() -> Path | None:
    """mergekit's source distribution, downloaded by ``make mergekit-venv`` beside the environment."""
    python = oracle_python()
    if python is None:
        return None
    found = sorted((python.parent.parent / "sdist").glob("mergekit-*.tar.gz"))
    return found[-1] if found else None


# --- tiny checkpoints -------------------------------------------------------------------------------


def tensor_shapes(
    arch: str,
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    heads: int,
    kv_heads: int,
    tie_embeddings: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of ``arch`` (HF's names), in the order mergekit's architecture lists them."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must be a multiple of heads, heads a multiple of kv_heads")
    head_dim = hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (q, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv, hidden)
        if arch == "qwen2":  # Qwen2 has q/k/v biases (no o_proj bias)
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
    shapes["model.norm.weight"] = (hidden,)
    if not tie_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def model_config(
    arch: str,
    *,
    layers: int,
    dtype: torch.dtype,
    hidden: int,
    intermediate: int,
    vocab: int,
    heads: int,
    kv_heads: int,
    tie_embeddings: bool = False,
) -> dict:
    """A ``config.json`` that transformers' AutoConfig and mergekit accept for ``arch``."""
    cfg = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": tie_embeddings,
        "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype],
    }
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch == "mistral":
        cfg["sliding_window"] = None
    elif arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    return cfg


def write_model(
    directory: str | Path,
    arch: str = "llama",
    *,
    layers: int = 6,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hidden: int = 32,
    intermediate: int = 88,
    vocab: int = 97,
    heads: int = 4,
    kv_heads: int = 2,
    tie_embeddings: bool = False,
    perturb_from: Mapping[str, torch.Tensor] | None = None,
    scale: float = 0.01,
    shards: int = 3,
) -> dict[str, torch.Tensor]:
    """Write a tiny HF checkpoint of ``arch`` into ``directory`` (created): ``config.json`` and
    ``shards`` safetensors files with ``model.safetensors.index.json``; return its tensors.

    Values are deterministic in ``seed``: a base model has N(0, 0.02) matrices and norm weights
    1 + N(0, 0.02); a fine-tuned model is ``perturb_from`` (the base's tensors) + ``scale`` * N(0, 1),
    computed in float32 and rounded once to ``dtype``."""
    directory = Path(directory)
    if "@" in str(directory) or "+" in str(directory):  # mergekit's revision / LoRA separators
        raise ValueError(f"mergekit cannot read a model path with '@' or '+': {directory}")
    dims = dict(hidden=hidden, intermediate=intermediate, vocab=vocab, heads=heads, kv_heads=kv_heads)
    shapes = tensor_shapes(arch, layers=layers, tie_embeddings=tie_embeddings, **dims)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if perturb_from is not None:
            if name not in perturb_from or tuple(perturb_from[name].shape) != shape:
                raise ValueError(f"perturb_from has no tensor {name} of shape {shape}")
            value = perturb_from[name].float() + scale * noise
        elif name.endswith("norm.weight"):
            value = 1.0 + 0.02 * noise
        else:
            value = 0.02 * noise
        tensors[name] = value.to(dtype).contiguous()

    directory.mkdir(parents=True, exist_ok=False)
    names = list(tensors)
    shards = max(1, min(shards, len(names)))
    per = math.ceil(len(names) / shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = model_config(arch, layers=layers, dtype=dtype, tie_embeddings=tie_embeddings, **dims)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return tensors


def write_lora(
    directory: str | Path,
    model: Mapping[str, torch.Tensor],
    *,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    rslora: bool = False,
    alpha_pattern: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Write a PEFT LoRA adapter for ``model`` (its tensors) into ``directory``: ``adapter_config.json``
    and ``adapter_model.safetensors`` with A [r, in] ~ N(0, 0.1) and B [out, r] ~ N(0, 0.1) for every
    2-D weight whose module name ends in one of ``targets``; return the adapter's tensors."""
    directory = Path(directory)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, weight in model.items():
        module = name.removesuffix(".weight")
        if weight.dim() == 2 and module.rsplit(".", 1)[-1] in targets:
            out_features, in_features = weight.shape
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = 0.1 * torch.randn(rank, in_features, generator=g)
            tensors[f"{key}.lora_B.weight"] = 0.1 * torch.randn(out_features, rank, generator=g)
    directory.mkdir(parents=True, exist_ok=False)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": rslora,
        "alpha_pattern": dict(alpha_pattern or {}),
        "rank_pattern": {},
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tensors


# --- running both tools ----------------------------------------------------------------------------


def write_config(config: Mapping | str | Path, path: str | Path) -> Path:
    """The config as a YAML file at ``path``: a mapping is dumped, a string is YAML text, a Path an
    existing file (copied)."""
    path = Path(path)
    if isinstance(config, Path):
        text = config.read_text()
    elif isinstance(config, str):
        text = config
    else:
        text = yaml.safe_dump(dict(config), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _config_file(config: Mapping | str | Path, out_dir: Path) -> Path:
    if isinstance(config, Path):
        return config
    return write_config(config, out_dir.parent / f"{out_dir.name}.yml")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# mergekit-yaml's flags for every run: CPU (mergekit's default; explicit), the seed of the random
# methods, no progress bars, no tokenizer (the tiny models have none: mergekit would only log that), no
# README.md / mergekit_config.yml, no lazy unpickler (safetensors inputs anyway), and --clone-tensors:
# a layer used twice by a passthrough stack is saved twice instead of failing safetensors' check for
# shared storage. Add --allow-crimes (mixing architectures) through extra_args.
MERGEKIT_FLAGS = (
    "--no-cuda",
    "--random-seed",
    "0",
    "--quiet",
    "--no-copy-tokenizer",
    "--no-write-model-card",
    "--no-lazy-unpickle",
    "--clone-tensors",
)


# Runs several mergekit-yaml invocations in one interpreter (importing mergekit takes ~6 s of the ~7 s
# a tiny merge takes): argv[1] is a JSON list of argument lists, argv[2] receives, for each, null or
# the traceback of its failure. Each run goes through mergekit-yaml's own click command.
_BATCH_DRIVER = """
import json, sys, traceback
import torch
# mergekit's magnitude sparsification sorts with torch.argsort / torch.sort, unstable among equal
# values; made stable, it keeps the ties a defined rule keeps (ours: lowest index first in its order)
_argsort, _sort = torch.argsort, torch.sort
torch.argsort = lambda *a, **k: _argsort(*a, **{**k, "stable": True})
torch.sort = lambda *a, **k: _sort(*a, **{**k, "stable": True})
from mergekit.scripts.run_yaml import main
results = []
for args in json.load(open(sys.argv[1])):
    try:
        main.main(args=args, prog_name="mergekit-yaml", standalone_mode=False)
        results.append(None)
    except SystemExit as exc:
        results.append(None if exc.code in (None, 0) else f"exit {exc.code}")
    except BaseException:
        results.append(traceback.format_exc())
json.dump(results, open(sys.argv[2], "w"))
"""


def _mergekit_env() -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    env.pop("PYTHONPATH", None)  # nothing of the project's environment leaks into mergekit's
    return env


def _python_or_fail() -> Path:
    python = oracle_python()
    if python is None:
        raise AssertionError(skip_reason())
    return python


def run_mergekit(
    config: Mapping | str | Path,
    out_dir: str | Path,
    *,
    extra_args: Iterable[str] = (),
    timeout: float = TIMEOUT_S,
) -> Path:
    """Run ``mergekit-yaml`` (0.1.5: ``python -m mergekit.scripts.run_yaml``) of the oracle environment
    on the config (a mapping or YAML text is written beside ``out_dir`` as ``<out_dir>.yml``; a Path
    is used as is) with :data:`MERGEKIT_FLAGS`, on the CPU, offline; return ``out_dir``. Raise
    AssertionError with the tail of mergekit's output if it fails."""
    python = _python_or_fail()
    out_dir = Path(out_dir)
    cfg = _config_file(config, out_dir)
    cmd = [str(python), "-m", "mergekit.scripts.run_yaml", str(cfg), str(out_dir), *MERGEKIT_FLAGS]
    cmd += list(extra_args)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=_mergekit_env(), cwd=str(out_dir.parent)
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"mergekit timed out after {timeout:.0f}s on {cfg}") from exc
    if proc.returncode != 0:
        raise AssertionError(
            f"mergekit failed (exit {proc.returncode}) on {cfg}:\n{_tail(proc.stderr + proc.stdout)}"
        )
    if not any(out_dir.glob("*.safetensors")):
        raise AssertionError(f"mergekit wrote no safetensors into {out_dir}:\n{_tail(proc.stderr)}")
    return out_dir


def run_mergekit_many(
    jobs: Iterable[tuple[Mapping | str | Path, str | Path]],
    *,
    extra_args: Iterable[str] = (),
    timeout: float = TIMEOUT_S,
) -> list[str | None]:
    """:func:`run_mergekit` on each (config, out_dir) of ``jobs``, all in one mergekit process (one
    import of mergekit instead of one per merge); return, per job, None if it succeeded, else the
    reason it failed (mergekit's traceback). Raise AssertionError only if the process itself fails."""
    python = _python_or_fail()
    jobs = [(cfg, Path(out)) for cfg, out in jobs]
    if not jobs:
        return []
    argv = []
    for cfg, out in jobs:
        out.parent.mkdir(parents=True, exist_ok=True)
        lora_cache = ["--lora-merge-cache", str(out.parent / "lora-cache")]
        argv.append([str(_config_file(cfg, out)), str(out), *MERGEKIT_FLAGS, *lora_cache, *extra_args])
    with tempfile.TemporaryDirectory(prefix="mergekit-jobs-") as work:
        todo, done = Path(work) / "jobs.json", Path(work) / "results.json"
        todo.write_text(json.dumps(argv))
        cmd = [str(python), "-c", _BATCH_DRIVER, str(todo), str(done)]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=_mergekit_env(), cwd=work
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"mergekit timed out after {timeout:.0f}s on {len(jobs)} merges") from exc
        if proc.returncode != 0 or not done.exists():
            raise AssertionError(
                f"mergekit failed (exit {proc.returncode}):\n{_tail(proc.stderr + proc.stdout)}"
            )
        results = json.loads(done.read_text())
    for i, (_, out) in enumerate(jobs):
        if results[i] is None and not any(out.glob("*.safetensors")):
            results[i] = f"mergekit wrote no safetensors into {out}"
    return results


def run_ours(config: Mapping | str | Path, out_dir: str | Path, *, check: bool = True) -> int:
    """``mergekernels merge CONFIG OUT_DIR --quiet --device cpu``, in this process (the same YAML file
    handling as :func:`run_mergekit`); return the exit code. With ``check`` a non-zero exit raises
    AssertionError carrying the command's error message."""
    from mergekernels.cli import main

    out_dir = Path(out_dir)
    cfg = _config_file(config, out_dir)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["merge", str(cfg), str(out_dir), "--quiet", "--device", "cpu"])
    if check and code != 0:
        raise AssertionError(f"mergekernels merge exited {code} on {cfg}:\n{_tail(err.getvalue())}")
    return code


# --- comparing outputs -----------------------------------------------------------------------------


def load_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file of ``directory``; a name twice is an error."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        for name, tensor in load_file(str(f)).items():
            assert name not in out, f"{name} is stored twice in {directory}"
            out[name] = tensor
    assert out, f"no safetensors in {directory}"
    return out


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |x| (float64 in, float64 out)."""
    bits = MANTISSA_BITS[dtype]
    tiny = torch.finfo(dtype).tiny
    exponent = torch.floor(torch.log2(x.abs().clamp_min(tiny)))
    return torch.exp2(exponent - bits)


def compare_tensors(
    name: str, ours: torch.Tensor, theirs: torch.Tensor, *, rtol: float = 1e-6, atol: float = 1e-6
) -> str | None:
    """None if equal within tolerance, else a one-line description. float32: |a-b| <= rtol*max(|a|,|b|)
    + atol*max|b|; bf16/fp16: |a-b| <= 1 ulp of max(|a|,|b|); anything else: exactly equal."""
    if ours.shape != theirs.shape:
        return f"{name}: shape {tuple(ours.shape)} (ours) != {tuple(theirs.shape)} (mergekit)"
    if ours.dtype != theirs.dtype:
        return f"{name}: dtype {ours.dtype} (ours) != {theirs.dtype} (mergekit)"
    a, b = ours.double(), theirs.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        same = torch.equal(a.nan_to_num(0.0, 1.0, -1.0), b.nan_to_num(0.0, 1.0, -1.0))
        return None if same else f"{name}: non-finite values differ"
    diff = (a - b).abs()
    bigger = torch.maximum(a.abs(), b.abs())
    if ours.dtype == torch.float32:
        tol = rtol * bigger + atol * max(float(b.abs().max()), 1e-30)
        what = f"rtol {rtol:g}, atol {atol:g} x max|mergekit| = {atol * float(b.abs().max()):.3g}"
    elif ours.dtype in (torch.bfloat16, torch.float16):
        tol = ulp(bigger, ours.dtype)
        what = f"1 ulp of {ours.dtype}"
    else:
        tol = torch.zeros_like(diff)
        what = "exact"
    bad = diff > tol
    if not bad.any():
        return None
    i = int((diff - tol).argmax())
    return (
        f"{name}: {int(bad.sum())} of {bad.numel()} values differ beyond {what}; largest difference "
        f"{float(diff.max()):.3g} (at flat index {i}: ours {float(a.flatten()[i]):.9g}, mergekit "
        f"{float(b.flatten()[i]):.9g}); max|mergekit| {float(b.abs().max()):.3g}"
    )


def assert_same_model(
    ours_dir: str | Path,
    theirs_dir: str | Path,
    *,
    out_dtype: torch.dtype | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
    """The two output directories hold the same tensors: same names, shapes and dtypes (``out_dtype``
    if given), values within float32 rounding (float32 outputs) or 1 ulp (bf16 / fp16 outputs); and
    their ``config.json`` give the same ``num_hidden_layers``. The message names every tensor that
    differs and the largest difference of each."""
    ours, theirs = load_dir(ours_dir), load_dir(theirs_dir)
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    assert not missing and not extra, (
        f"tensor names differ: missing from ours {missing[:8]}{'...' if len(missing) > 8 else ''}, "
        f"only in ours {extra[:8]}{'...' if len(extra) > 8 else ''}"
    )
    problems = []
    for name in sorted(theirs):
        if out_dtype is not None and theirs[name].dtype != out_dtype:
            problems.append(f"{name}: mergekit wrote {theirs[name].dtype}, expected {out_dtype}")
        msg = compare_tensors(name, ours[name], theirs[name], rtol=rtol, atol=atol)
        if msg:
            problems.append(msg)
    assert not problems, f"{len(problems)} of {len(theirs)} tensors differ:\n" + "\n".join(problems[:20])
    layers = [
        json.loads((Path(d) / "config.json").read_text()).get("num_hidden_layers")
        for d in (ours_dir, theirs_dir)
    ]
    assert layers[0] == layers[1], f"config.json num_hidden_layers: ours {layers[0]}, mergekit {layers[1]}"


# --- mergekit's own example configs -------------------------------------------------------------------

# The methods whose examples both tools run exactly (the random ones and trimming ties are left out).
# Methods whose examples are compared: every deterministic mergekit method (DARE and DELLA draw
# their masks from another generator); ties / breadcrumbs trim exactly as mergekit with its sort made
# stable (the batch driver does that).
EXAMPLE_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "passthrough",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "nearswap",
    "sce",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
)


class UnsupportedExample(Exception):
    """An example config the comparison leaves out; the message says why."""


def example_configs() -> tuple[dict[str, str], str]:
    """mergekit's example configs (file name -> YAML text) and where they were found, or ({}, why
    not). Read from ``$MK_ORACLE_EXAMPLES`` (a directory, e.g. a mergekit checkout's ``examples/``),
    else from the ``examples/`` folder of the sdist that ``make mergekit-venv`` keeps beside the
    environment. Nothing is copied into this repository (mergekit is LGPL)."""
    override = os.environ.get("MK_ORACLE_EXAMPLES")
    if override:
        files = sorted(p for p in Path(override).glob("*") if p.suffix in (".yml", ".yaml"))
        if not files:
            return {}, f"MK_ORACLE_EXAMPLES={override} holds no *.yml / *.yaml"
        return {p.name: p.read_text() for p in files}, override
    sdist = sdist_path()
    if sdist is None:
        return {}, "mergekit's sdist was not downloaded (make mergekit-venv keeps it in <venv>/sdist)"
    import tarfile

    found = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if (
                member.isfile()
                and len(parts) == 3
                and parts[1] == "examples"
                and member.name.endswith((".yml", ".yaml"))
            ):
                found[parts[2]] = tar.extractfile(member).read().decode()
    if not found:
        return {}, (
            f"{sdist.name} has no examples/ folder (mergekit's PyPI sdist and wheel leave it out; it is "
            "only in the GitHub repository): set MK_ORACLE_EXAMPLES to a checkout's examples/ to run these"
        )
    return found, str(sdist)


def _values(setting) -> list:
    """Every scalar a parameter setting can take (gradients, filtered lists, nested)."""
    if isinstance(setting, dict):
        return _values(setting.get("value"))
    if isinstance(setting, list):
        return [v for s in setting for v in _values(s)]
    return [setting]


def adapt_example(text: str, paths: Mapping[str, str], layers: int) -> dict:
    """An example config rewritten to run on the tiny models: ``paths`` maps "base", "a", "b", "c" to
    four models of one architecture with ``layers`` layers. Raise UnsupportedExample for configs left
    out: several YAML documents (mergekit-multi), no merge_method or one outside EXAMPLE_METHODS,
    ``modules``, tokenizer settings or a chat template, LoRA references, more than four distinct
    models.

    Rewrites: each distinct model reference becomes one tiny model, base_model -> "base", the others
    in order of first appearance -> the next of base, a, b, c; when a layer_range ends beyond
    ``layers``, every range is scaled by f = layers / (largest end): a slice keeps
    n = max(1, round(f * its length)) layers, each source starts at min(floor(f * start), layers - n);
    ``out_path`` (mergekit-multi's) is dropped; a 16-bit ``dtype`` becomes ``out_dtype`` with
    ``dtype: float32`` (mergekit rounds intermediate values to it, we do not). Everything else
    (parameters) is kept."""
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise UnsupportedExample("not a single merge config (several YAML documents: mergekit-multi)")
    cfg = dict(docs[0])
    method = cfg.get("merge_method")
    if method not in EXAMPLE_METHODS:
        raise UnsupportedExample(f"merge_method {method!r} is not one of {', '.join(EXAMPLE_METHODS)}")
    for key in ("modules", "tokenizer", "tokenizer_source", "chat_template"):
        if cfg.get(key) is not None:
            raise UnsupportedExample(f"uses {key}")
    cfg.pop("out_path", None)
    if cfg.get("dtype") in ("float16", "bfloat16", "fp16", "bf16", "half"):
        # mergekit rounds task vectors and sums to a 16-bit dtype where we compute in float32 (a
        # documented difference): both compute in float32 and write the example's 16-bit dtype
        cfg["out_dtype"] = cfg.get("out_dtype") or cfg["dtype"]
        cfg["dtype"] = "float32"

    mapping: dict[str, str] = {}
    names = iter(["base", "a", "b", "c"])

    def ref(model) -> str:
        if not isinstance(model, str):
            raise UnsupportedExample(f"model reference {model!r} is not a plain string")
        if "+" in model:
            raise UnsupportedExample(f"LoRA reference {model}")
        if model not in mapping:
            try:
                mapping[model] = paths[next(names)]
            except StopIteration:
                raise UnsupportedExample("more than four distinct models") from None
        return mapping[model]

    if cfg.get("base_model") is not None:
        cfg["base_model"] = ref(cfg["base_model"])
    entries = []  # every (model entry) with parameters, for the density check
    if cfg.get("models"):
        models = []
        for entry in cfg["models"]:
            entry = {"model": entry} if isinstance(entry, str) else dict(entry)
            entry["model"] = ref(entry["model"])
            models.append(entry)
            entries.append(entry)
        cfg["models"] = models
    if cfg.get("slices"):
        ends = [src["layer_range"][1] for sl in cfg["slices"] for src in sl["sources"]]
        f = min(1.0, layers / max(ends))
        slices = []
        for sl in cfg["slices"]:
            sl = dict(sl)
            n = None
            sources = []
            for src in sl["sources"]:
                src = dict(src)
                src["model"] = ref(src["model"])
                lo, hi = src["layer_range"]
                if f < 1:
                    n = n or max(1, round(f * (hi - lo)))
                    start = min(math.floor(f * lo), layers - n)
                    src["layer_range"] = [start, start + n]
                sources.append(src)
                entries.append(src)
            sl["sources"] = sources
            entries.append(sl)
            slices.append(sl)
        cfg["slices"] = slices
    return cfg
