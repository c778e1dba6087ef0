"""Fuzzing ``mergekernels merge``: each example corrupts one input of a small valid merge (the YAML
config, a shard index, a safetensors file, ``config.json``, a LoRA adapter config, tokenizer files)
and runs the command in-process. It must end in a complete output (exit 0) or in exit 2 with a
``mergekernels merge: error:`` naming the file (and the key or tensor), never in a traceback, a hang
or a published OUT_DIR. Deterministic by default (derandomized, no example database);
``MERGEKERNELS_FUZZ_EXAMPLES=N`` runs N random examples per format instead. Inputs that once failed
are kept as explicit regression cases."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergekernels.cli import main

from . import mergekit_oracle as oracle
from .vocab_models import write_tokenizer

EXAMPLES_ENV = os.environ.get("MERGEKERNELS_FUZZ_EXAMPLES")
TIME_LIMIT_S = 30  # per example: a merge here takes ~0.1 s


def fuzz_settings(examples: int):
    """Bounded, deterministic runs in CI; N random examples with MERGEKERNELS_FUZZ_EXAMPLES=N."""
    return settings(
        max_examples=int(EXAMPLES_ENV) if EXAMPLES_ENV else examples,
        derandomize=not EXAMPLES_ENV,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- the valid inputs ---------------------------------------------------------------------------

DIMS = dict(layers=2, hidden=8, intermediate=12, heads=2, kv_heads=1, dtype=torch.bfloat16)
LORA_MODULE = "model.layers.0.self_attn.q_proj"
# ties over three models (one with a LoRA adapter), a tokenizer union: every file below is read
TIES = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [
        {"model": "base"},
        {"model": "e1+lora", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "e2", "parameters": {"weight": 0.4, "density": 0.7}},
    ],
    "parameters": {"normalize": True},
    "dtype": "float32",
    "tokenizer_source": "union",
    "chat_template": "chatml",
}
# slices that change the layer count (config.json is rewritten)
SLICES = {
    "merge_method": "passthrough",
    "slices": [
        {"sources": [{"model": "base", "layer_range": [0, 2]}]},
        {"sources": [{"model": "e1", "layer_range": [1, 2]}]},
    ],
    "dtype": "bfloat16",
}
# mergekit-multi: a named intermediate merge, then one that uses it
MULTI = [
    {
        "name": "mid",
        "merge_method": "linear",
        "models": [
            {"model": "base", "parameters": {"weight": 0.5}},
            {"model": "e1", "parameters": {"weight": 0.5}},
        ],
    },
    {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "mid", "parameters": {"weight": 0.5}}],
    },
]
# the output's tokenizer one model's (e2's), and the base's with a chat template (no tokenizer merge)
SOURCE = {"merge_method": "task_arithmetic", "base_model": "base", "models": ["e2"], "tokenizer_source": "e2"}
TEMPLATE = {
    "merge_method": "task_arithmetic",
    "base_model": "base",
    "models": ["e1"],
    "chat_template": "chatml",
}
CONFIGS = {
    "ties.yml": TIES,
    "slices.yml": SLICES,
    "multi.yml": MULTI,
    "source.yml": SOURCE,
    "template.yml": TEMPLATE,
}


def _yaml(name: str, doc) -> bytes:
    if name == "multi.yml" and isinstance(doc, list):
        return yaml.safe_dump_all(doc, sort_keys=False, allow_unicode=True).encode()
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()


class World:
    """The valid inputs: their directory and every file's bytes (to restore after each example)."""

    def __init__(self, root: Path, originals: dict[Path, bytes]):
        self.root, self.originals = root, originals

    def __repr__(self) -> str:  # failing examples print it
        return f"World({str(self.root)!r})"


def _build(root: Path) -> World:
    base = oracle.write_model(root / "base", vocab=35, seed=0, shards=2, **DIMS)
    write_tokenizer(root / "base")
    oracle.write_model(root / "e1", vocab=35, seed=1, shards=1, perturb_from=base, **DIMS)
    (root / "e1" / "model.safetensors.index.json").unlink()  # e1: one model.safetensors
    (root / "e1" / "model-00001-of-00001.safetensors").rename(root / "e1" / "model.safetensors")
    write_tokenizer(root / "e1")
    oracle.write_model(root / "e2", vocab=36, seed=2, shards=2, **DIMS)
    write_tokenizer(root / "e2", added=["<im>"])
    (root / "lora").mkdir()
    g = torch.Generator().manual_seed(3)
    prefix = f"base_model.model.{LORA_MODULE}"
    factors = {f"{prefix}.lora_A.weight": torch.randn(2, 8, generator=g)}
    factors[f"{prefix}.lora_B.weight"] = torch.randn(8, 2, generator=g)
    save_file(factors, str(root / "lora" / "adapter_model.safetensors"))
    adapter = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    adapter.update(
        use_rslora=False, fan_in_fan_out=False, alpha_pattern={"k_proj": 4}
    )  # not a LoRA module here
    (root / "lora" / "adapter_config.json").write_text(json.dumps(adapter))
    for name, cfg in CONFIGS.items():
        (root / name).write_bytes(_yaml(name, cfg))
    originals = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    return World(root, originals)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:  # hub ids a corruption makes up are never fetched
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        mp.setenv("HF_HUB_OFFLINE", "1")
        w = _build(tmp_path_factory.mktemp("fuzz"))
        for name in CONFIGS:  # the inputs are valid
            assert _run(w, {}, name)[0] == 0
        yield w


# --- running one corrupted merge ----------------------------------------------------------------


class Hang(BaseException):  # not an Exception: no `except Exception` in the package may hide it
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    def expire(signum, frame):
        raise Hang(f"the merge ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _run(world: World, edits: dict[Path, bytes], config: str) -> tuple[int, str, Path]:
    """The merge of ``config`` with the files in ``edits`` replaced (restored afterwards); any
    exception escaping main (a traceback for a user) fails the test."""
    out = world.root / "out"
    for leftover in (out, out.with_name("out.partial"), out.with_name("out.parts")):
        shutil.rmtree(leftover, ignore_errors=True)
    stderr = io.StringIO()
    try:
        for path, data in edits.items():
            path.write_bytes(data)
        argv = ["merge", str(world.root / config), str(out), "--device", "cpu", "--quiet"]
        argv += ["--transformers-cache", str(world.root / "hub")]
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            with _time_limit(TIME_LIMIT_S):
                code = main(argv)
    finally:
        for path in edits:
            path.write_bytes(world.originals[path])
    return code, stderr.getvalue(), out


def _check(code: int, err: str, out: Path, names: tuple[str, ...], keys: tuple[str, ...] = ()) -> None:
    """A complete output, or exit 2, no OUT_DIR and an error naming one of ``names`` (the file) and,
    when given, one of ``keys`` (the key or tensor that was corrupted)."""
    if code == 0:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert all((out / f).is_file() for f in set(index["weight_map"].values()))
        assert (out / "merge_config.yml").is_file() and not out.with_name("out.partial").exists()
        return
    assert code == 2, err
    assert not out.exists(), f"a failed merge published {out}"
    marker = "mergekernels merge: error: "
    assert marker in err, err
    message = err[err.index(marker) :]
    assert any(n in message for n in names), f"the error names none of {names}: {message}"
    if keys:
        assert any(k in message or repr(k) in message for k in keys), (
            f"the error names none of {keys}: {message}"
        )


def _lacks(path: Path) -> str:
    """The start of the planner's error for a tensor a model lacks (a corruption renamed it), which
    names the model as the configuration does: e1 is e1+lora there (and the adapter, lora, too)."""
    model = path.parent
    reference = f"{model}+{model.parent / 'lora'}" if model.name == "e1" else str(model)
    return f"{reference}: lacks"


def _run_and_check(world, path: Path, data: bytes, config: str, keys=(), names=()) -> None:
    code, err, out = _run(world, {path: data}, config)
    _check(code, err, out, names or (str(path),), keys)


# --- generic corruptions ------------------------------------------------------------------------

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64]),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(["", "../x", "/nonexistent", "NaN", "1e999", "model.safetensors", "a" * 300]),
    st.lists(st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=4)), max_size=3),
    st.dictionaries(
        st.text(max_size=4), st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=4)), max_size=2
    ),
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@st.composite
def tree_mutations(draw, doc, domain=None, paths=None):
    """(mutated copy, path, deleted): the node at one path (which may be a key not yet there) replaced
    by junk or a near-valid value ``domain(path)`` gives, deleted, or given an extra entry."""
    path = draw(st.sampled_from(paths if paths is not None else list(_paths(doc))))
    action = draw(st.sampled_from(["replace", "replace", "delete", "extra"]))
    doc = parent = copy.deepcopy(doc)
    for p in path[:-1]:
        parent = parent[p]
    node = doc if not path else (parent.get(path[-1]) if isinstance(parent, dict) else parent[path[-1]])
    if action == "extra" and isinstance(node, (dict, list)):
        key = draw(st.one_of(st.sampled_from(list(KNOWN_KEYS)), st.text(max_size=6)))
        parent, path = node, (*path, key if isinstance(node, dict) else len(node))
        if isinstance(node, list):
            node.append(None)
    near = domain(path) if domain is not None else None
    value = draw(st.one_of(near, JUNK) if near is not None else JUNK)
    if not path:
        return (None if action == "delete" else value), path, action == "delete"
    if action == "delete":
        if isinstance(parent, list) or path[-1] in parent:
            del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc, path, action == "delete"


@st.composite
def byte_mutations(draw, data: bytes, start: int = 0, stop: int | None = None) -> bytes:
    """Bytes truncated, flipped, inserted or deleted (in data[start:stop] where it applies)."""
    stop = len(data) if stop is None else stop
    kind = draw(st.sampled_from(["truncate", "flip", "flip", "insert", "delete", "garbage"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "garbage":
        return draw(st.binary(max_size=64))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(start, max(start, min(stop, len(out)) - 1)))
        if kind == "flip":
            out[i : i + 1] = draw(st.binary(min_size=1, max_size=1))
        elif kind == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            del out[i : i + draw(st.integers(1, 4))]
    return bytes(out)


def _json(value) -> bytes:
    return json.dumps(value).encode()


def _keys_of(path) -> tuple[str, ...]:
    return tuple(p for p in path if isinstance(p, str))


def _values(*values) -> st.SearchStrategy:
    return st.sampled_from(values)


NUMBERS = st.one_of(_values(0, 1, -1, 0.5, 1e-9, 2, 100, 1e308, "0.5", True), st.floats())
MODELS = _values(
    *"base e1 e2 e1+lora lora missing e1+missing org/name org/name@main base/config.json".split(),
    *["base/model-00001-of-00002.safetensors", "", ".", "..", "~", "/", "+"],
)
TOKEN_SOURCES = st.one_of(
    MODELS,
    st.fixed_dictionaries({"kind": _values("zero", "model_token", "junk", 1)}),
    st.fixed_dictionaries(
        {"kind": st.just("model_token"), "model": MODELS, "token": _values("a", "<im>", "zz", 3)}
    ),
    st.fixed_dictionaries(
        {"kind": st.just("model_token"), "model": MODELS, "token_id": _values(0, 34, 35, 36, -1, 10**9, "1")}
    ),
)
YAML_NEAR = {
    "merge_method": _values(
        *"ties linear task_arithmetic dare_ties slerp passthrough model_stock della".split(),
        *"breadcrumbs nuslerp karcher sce nope".split(),
    ),
    "base_model": MODELS,
    "model": MODELS,
    "dialect": _values("mergekit", "mergekernels", "other"),
    "dtype": _values("float16", "bfloat16", "float32", "float64", "int8", "fp8", "bf16", "half"),
    "out_dtype": _values("float16", "bfloat16", "float32", "int8"),
    "layer_range": st.one_of(st.lists(st.integers(-3, 5), max_size=3), st.tuples(NUMBERS, NUMBERS)),
    "tokenizer_source": st.one_of(MODELS, _values("base", "union")),
    "tokenizer": st.fixed_dictionaries(
        {"source": st.one_of(MODELS, _values("base", "union"))},
        optional={
            "tokens": st.dictionaries(
                _values("<im>", "<x>", "a", ""),
                st.fixed_dictionaries(
                    {"source": TOKEN_SOURCES}, optional={"force": st.one_of(st.booleans(), JUNK)}
                ),
            ),
            "pad_to_multiple_of": st.integers(-2, 70),
        },
    ),
    "chat_template": _values("auto", "chatml", "llama3", "{{ bos_token", "{% for %}", "{{ x }}", "none"),
    "options": st.dictionaries(
        _values("seed", "shard_size", "memory_cap", "threshold_scope", "allow_missing", "allow_nonfinite"),
        st.one_of(JUNK, _values("1KB", "5GB", "global", "base", 1)),
    ),
    "exclude": st.lists(st.one_of(st.text(max_size=4), _values("*", "model.*", "[")), max_size=2),
    "parameters": st.dictionaries(
        _values(*"weight density epsilon lambda t normalize int8_mask rescale select_topk gamma".split()),
        NUMBERS,
        max_size=3,
    ),
    "slices": st.lists(
        st.fixed_dictionaries(
            {
                "sources": st.lists(
                    st.fixed_dictionaries(
                        {"model": MODELS}, optional={"layer_range": st.lists(st.integers(-1, 3), max_size=3)}
                    ),
                    max_size=2,
                )
            }
        ),
        max_size=2,
    ),
    "modules": st.dictionaries(st.text(max_size=4), JUNK, max_size=1),
}
for _name in "weight density epsilon lambda t normalize int8_mask gamma select_topk".split():
    YAML_NEAR[_name] = NUMBERS
KNOWN_KEYS = (
    *YAML_NEAR,
    *"name sources weight_map metadata total_size architectures num_hidden_layers vocab_size".split(),
    *"text_config lora_alpha r alpha_pattern use_rslora fan_in_fan_out use_dora peft_type".split(),
    *"target_modules modules_to_save dtype shape data_offsets __metadata__".split(),
)


def _near(table: dict):
    def domain(path):
        last = next((p for p in reversed(path) if isinstance(p, str)), None)
        return table.get(last)

    return domain


@st.composite
def yaml_corruptions(draw):
    name = draw(st.sampled_from(sorted(CONFIGS)))
    if draw(st.integers(0, 3)) == 0:
        return name, draw(byte_mutations(_yaml(name, CONFIGS[name])))
    doc = CONFIGS[name]
    for _ in range(draw(st.integers(1, 2))):
        doc, _path, _ = draw(tree_mutations(doc, _near(YAML_NEAR)))
    return name, _yaml(name, doc)


@fuzz_settings(200)
@given(case=yaml_corruptions())
def test_fuzz_yaml_config(world, case):
    name, data = case
    # an error may name the config file, or the model (a path in this directory, an absolute path, a
    # hub id) it asks for
    names = (str(world.root), *_references(data, world.root))
    _run_and_check(world, world.root / name, data, name, names=names)


def _references(data: bytes, root: Path) -> list[str]:
    """The strings of a YAML document as an error names a model: an absolute path, or quoted."""
    try:
        docs = list(yaml.safe_load_all(data))
    except (yaml.YAMLError, UnicodeDecodeError):
        return []
    found, stack = [], docs
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            stack += node
        elif isinstance(node, str) and node:
            path = os.path.expanduser(node.partition("+")[0])
            found += [os.path.normpath(os.path.join(str(root), path)) if path else "", repr(node)]
    return [f for f in found if f.startswith(("/", "'"))]


# --- the shard index ------------------------------------------------------------------------------

INDEXES = ("base/model.safetensors.index.json", "e2/model.safetensors.index.json")


def _index_near(world: World):
    entries = _values(
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model-00003-of-00002.safetensors",
        "../e1/model.safetensors",
        "./model-00001-of-00002.safetensors",
        str(world.root / "e1" / "model.safetensors"),
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
        ".",
        "",
        "sub/x.safetensors",
        "/etc/passwd",
    )
    weight_maps = st.one_of(
        st.lists(st.text(max_size=4), max_size=2), st.text(max_size=8), st.none(), st.integers(), st.just({})
    )

    def domain(path):
        if path[:1] == ("weight_map",):
            return weight_maps if len(path) == 1 else entries
        return None

    return domain


@st.composite
def index_corruptions(draw, world):
    relative = draw(st.sampled_from(INDEXES))
    original = world.originals[world.root / relative]
    if draw(st.integers(0, 4)) == 0:
        return relative, draw(byte_mutations(original)), ()
    doc, path, deleted = draw(tree_mutations(json.loads(original), _index_near(world)))
    # a deleted entry can drop a whole shard: its tensors are then missing from the model
    return relative, _json(doc), () if deleted else _keys_of(path)


@fuzz_settings(150)
@given(data=st.data())
def test_fuzz_shard_index(world, data):
    relative, corrupted, keys = data.draw(index_corruptions(world))
    path = world.root / relative
    _run_and_check(world, path, corrupted, "ties.yml", keys, names=(str(path), _lacks(path)))


# --- safetensors files --------------------------------------------------------------------------

SAFETENSORS = (
    "base/model-00001-of-00002.safetensors",
    "base/model-00002-of-00002.safetensors",
    "e1/model.safetensors",
    "e2/model-00002-of-00002.safetensors",
    "lora/adapter_model.safetensors",
)
DTYPES = (
    *"F16 BF16 F32 F64 I8 U8 I16 U16 I32 U32 I64 U64 BOOL F8_E4M3 F8_E5M2 C64 F4 E8M0 bf16".split(),
    "",
)
HEADER_NEAR = {
    "dtype": _values(*DTYPES),
    "shape": st.one_of(
        st.lists(st.integers(-2, 40), max_size=3),
        st.lists(st.integers(-(2**64), 2**64), max_size=3),
        _values([], [0], [8, 0], [2**31, 2**31], [2**63, 2], [8.0, 8], ["8"]),
    ),
    "data_offsets": st.one_of(
        st.lists(st.integers(-1, 4000), min_size=0, max_size=3),
        st.tuples(st.integers(0, 2**64), st.integers(0, 2**64)),
    ),
    "__metadata__": st.one_of(
        st.dictionaries(st.text(max_size=4), JUNK, max_size=2), _values({"format": "np"})
    ),
}


def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_safetensors(header, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as writers do
    return len(text).to_bytes(8, "little") + text + body


@st.composite
def safetensors_corruptions(draw, world):
    relative = draw(st.sampled_from(SAFETENSORS))
    data = world.originals[world.root / relative]
    header, body = _split_safetensors(data)
    end = 8 + len(data) - len(body)
    kind = draw(st.sampled_from(["header", "header", "header", "length", "bytes", "header bytes", "data"]))
    if kind == "header":
        doc, path, deleted = draw(tree_mutations(header, _near(HEADER_NEAR)))
        # a deleted entry cannot be named: the error names the gap it leaves, or the missing tensor
        return relative, _join_safetensors(doc, body), () if deleted else _keys_of(path)[:1]
    if kind == "length":
        n = end - 8
        length = draw(
            st.one_of(
                _values(0, 1, 2, 7, n - 1, n + 1, len(data) - 8, len(data) - 7, len(data)),
                _values(2**31, 2**63 - 1, 2**64 - 1),
                st.integers(0, 2**64 - 1),
            )
        )
        return relative, length.to_bytes(8, "little") + data[8:], ()
    if kind == "header bytes":  # the JSON text itself damaged
        return relative, draw(byte_mutations(data, 8, end)), ()
    if kind == "data":  # a shorter or longer body (NaN / Inf from flipped bytes: see the reader's check)
        cut = draw(st.integers(end, len(data) + 8))
        return relative, data[:cut] + b"\0" * max(cut - len(data), 0), ()
    return relative, draw(byte_mutations(data)), ()


@fuzz_settings(250)
@given(data=st.data())
def test_fuzz_safetensors(world, data):
    relative, corrupted, keys = data.draw(safetensors_corruptions(world))
    path = world.root / relative
    _run_and_check(world, path, corrupted, "ties.yml", keys, names=(str(path), _lacks(path)))


# --- config.json --------------------------------------------------------------------------------

MODEL_CONFIGS = ("base/config.json", "e1/config.json", "e2/config.json")
CONFIG_NEAR = {
    "architectures": st.one_of(
        _values(
            ["LlamaForCausalLM"],
            ["MistralForCausalLM"],
            ["LlamaForCausalLM", "X"],
            [],
            [[]],
            [{}],
            [1],
            "LlamaForCausalLM",
            None,
        ),
        st.lists(st.text(max_size=6), max_size=2),
    ),
    "num_hidden_layers": _values(0, 1, 2, 3, -1, 10**6, 2.0, "2", True, None),
    "vocab_size": _values(0, 1, 34, 35, 36, 37, 64, -1, 10**12, 35.0, "35", True, None),
    "text_config": st.one_of(_values({"vocab_size": 36}, {"vocab_size": -1}, [], "x"), JUNK),
}


@st.composite
def config_json_corruptions(draw, world):
    relative = draw(st.sampled_from(MODEL_CONFIGS))
    merge = draw(st.sampled_from(sorted(CONFIGS)))
    original = world.originals[world.root / relative]
    if draw(st.integers(0, 3)) == 0:
        return relative, merge, draw(byte_mutations(original)), ()
    doc = json.loads(original)
    keys = [(k,) for k in CONFIG_NEAR] + [()]
    doc, path, _ = draw(tree_mutations(doc, _near(CONFIG_NEAR), paths=keys + list(_paths(doc))[:8]))
    # transformers checks the other fields (loading the tokenizer), in its own words
    return relative, merge, _json(doc), _keys_of(path) if path[:1] == ("architectures",) else ()


@fuzz_settings(120)
@given(data=st.data())
def test_fuzz_config_json(world, data):
    relative, merge, corrupted, keys = data.draw(config_json_corruptions(world))
    path = world.root / relative
    _run_and_check(world, path, corrupted, merge, keys)


# --- LoRA adapter config ------------------------------------------------------------------------

ADAPTER_NEAR = {
    "lora_alpha": st.one_of(NUMBERS, _values(0, -4, 1e38, 1e300, float("inf"), float("nan"))),
    "r": st.one_of(NUMBERS, _values(0, -2, 3)),
    "alpha_pattern": st.one_of(
        _values(
            {"q_proj": "x"},
            {"(": 1},
            {"(?i)q_proj": 2},
            {"q_proj": None},
            {"q_proj": 1e300},
            {"[": 2},
            {".*": 0},
            [],
        ),
        st.dictionaries(st.text(max_size=4), NUMBERS, max_size=2),
    ),
    "target_modules": st.one_of(_values("all-linear", ["k_proj"], [], None, 3), JUNK),
    "use_rslora": st.one_of(st.booleans(), JUNK),
    "fan_in_fan_out": st.one_of(st.booleans(), JUNK),
    "use_dora": st.one_of(st.booleans(), JUNK),
    "peft_type": _values("LORA", "IA3", "lora", None, 1),
    "modules_to_save": _values(["lm_head"], "lm_head", None),
}


@st.composite
def adapter_corruptions(draw, world):
    original = world.originals[world.root / "lora" / "adapter_config.json"]
    if draw(st.integers(0, 4)) == 0:
        return draw(byte_mutations(original)), ()
    doc = json.loads(original)
    paths = [(k,) for k in ADAPTER_NEAR] + list(_paths(doc))
    doc, path, _ = draw(tree_mutations(doc, _near(ADAPTER_NEAR), paths=paths))
    return _json(doc), _keys_of(path)


@fuzz_settings(120)
@given(data=st.data())
def test_fuzz_lora_adapter_config(world, data):
    corrupted, keys = data.draw(adapter_corruptions(world))
    _run_and_check(world, world.root / "lora" / "adapter_config.json", corrupted, "ties.yml", keys)


# --- tokenizer files ----------------------------------------------------------------------------

TOKENIZER_FILES = tuple(
    f"{model}/{name}"
    for model in ("base", "e1", "e2")
    for name in ("tokenizer.json", "tokenizer_config.json")
)


def _tokenizer_near(path):
    if path[:2] == ("model", "vocab") and len(path) == 3:
        return st.integers(-1, 40) | _values(2**32, 10**6)
    if path and path[-1] == "id":
        return st.integers(-1, 40) | _values(2**32, 10**6)
    return {
        "type": _values("BPE", "WordPiece", "Unigram", "WordLevel", "X"),
        "content": _values("<s>", "a", "", "<im>"),
    }.get(path[-1] if path else None)


@st.composite
def tokenizer_corruptions(draw, world):
    relative = draw(st.sampled_from(TOKENIZER_FILES))
    merge = draw(st.sampled_from(["ties.yml", "ties.yml", "source.yml", "template.yml"]))
    original = world.originals[world.root / relative]
    if draw(st.integers(0, 3)) == 0:
        return relative, merge, draw(byte_mutations(original))
    doc, _path, _ = draw(tree_mutations(json.loads(original), _tokenizer_near))
    return relative, merge, _json(doc)


@fuzz_settings(100)
@given(data=st.data())
def test_fuzz_tokenizer_files(world, data):
    relative, merge, corrupted = data.draw(tokenizer_corruptions(world))
    path = world.root / relative
    # transformers reads a model's tokenizer files together: the error may name its directory
    _run_and_check(world, path, corrupted, merge, names=(str(path), str(path.parent)))


# --- inputs that once failed --------------------------------------------------------------------


def _edit(edit):
    """A corruption of a JSON file: ``edit(doc)`` changes the parsed document (or returns another)."""

    def apply(data: bytes) -> bytes:
        doc = json.loads(data)
        result = edit(doc)
        return _json(doc if result is None else result)

    return apply


def _edit_header(edit):
    """A corruption of a safetensors header: ``edit(header)`` changes it, the data stays."""

    def apply(data: bytes) -> bytes:
        header, body = _split_safetensors(data)
        edit(header)
        return _join_safetensors(header, body)

    return apply


def _set(*path_and_value):
    *path, value = path_and_value

    def edit(doc):
        for p in path[:-1]:
            doc = doc[p]
        doc[path[-1]] = value

    return _edit(edit)


class Either(str):
    """The error a corruption may end in, when a valid merge is the other possible outcome."""


BASE_INDEX = "base/model.safetensors.index.json"
LAYER0 = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"

REGRESSIONS = [
    # (file, config, corruption, what the error must say)
    # YAML: UnicodeDecodeError, a ValueError naming no file
    ("ties.yml", "ties.yml", lambda d: b"\x80" + d[1:], r"ties.yml: not UTF-8 text"),
    # YAML: a model path too long for the file system: OSError traceback from Path.exists
    (
        "ties.yml",
        "ties.yml",
        lambda d: d.replace(b"model: e2", b"model: " + b"a" * 300),
        r"File name too long",
    ),
    # index: weight_map a list / string / null / number: AttributeError: ... has no attribute 'values'
    (BASE_INDEX, "ties.yml", _set("weight_map", ["a"]), r"weight_map must map tensor names to file names"),
    (BASE_INDEX, "ties.yml", _set("weight_map", "model.safetensors"), r"weight_map must map tensor names"),
    (BASE_INDEX, "ties.yml", _set("weight_map", None), r"weight_map must map tensor names"),
    (BASE_INDEX, "ties.yml", _set("weight_map", 3), r"weight_map must map tensor names"),
    (BASE_INDEX, "ties.yml", _edit(lambda d: []), r"weight_map must map tensor names"),
    # index: an entry null / a number: TypeError: expected str, bytes or os.PathLike object, not NoneType
    (
        BASE_INDEX,
        "ties.yml",
        _set("weight_map", LAYER0, None),
        rf"weight_map\['{LAYER0}'\] must be a file name",
    ),
    (BASE_INDEX, "ties.yml", _set("weight_map", LAYER0, 7), rf"weight_map\['{LAYER0}'\] must be a file name"),
    # index: an entry a list: TypeError: unhashable type: 'list'
    (BASE_INDEX, "ties.yml", _set("weight_map", LAYER0, ["x"]), r"must be a file name, got \['x'\]"),
    # index: an entry too long a name: OSError: [Errno 36] File name too long
    (
        BASE_INDEX,
        "ties.yml",
        _set("weight_map", LAYER0, "a" * 300 + ".safetensors"),
        r"names an unusable file",
    ),
    # index: not UTF-8: UnicodeDecodeError naming no file
    (BASE_INDEX, "ties.yml", lambda d: b"\xff" + d, r"index.json: not a valid index"),
    # index: an entry naming tokenizer.json: loaded with torch.load as a pickle without --allow-pickle
    (BASE_INDEX, "ties.yml", _set("weight_map", LAYER0, "tokenizer.json"), r"not a \.safetensors file"),
    # index: a tensor listed in a shard that lacks it: merged silently, the index ignored
    (
        BASE_INDEX,
        "ties.yml",
        _set("weight_map", LAYER0, "model-00002-of-00002.safetensors"),
        rf"lists tensor '{LAYER0}' in 'model-00002-of-00002.safetensors', but it is in model-00001",
    ),
    # a renamed safetensors entry: the index lists a tensor its shard lacks: "e2: lacks tensor ...", no file
    (
        "e2/model-00002-of-00002.safetensors",
        "ties.yml",
        _edit_header(lambda h: h.update({"model.norm.weightX": h.pop("model.norm.weight")})),
        r"e2/model-00002-of-00002.safetensors: has no tensor 'model.norm.weight', which .*index.json lists",
    ),
    # safetensors: a bad entry: "invalid JSON in header ... at line 1 column 1054", no tensor named
    (
        "base/model-00002-of-00002.safetensors",
        "ties.yml",
        _edit_header(lambda h: h["lm_head.weight"].update(shape=[-1, 8])),
        r"tensor 'lm_head.weight': shape must be a list of non-negative integers",
    ),
    (
        "base/model-00001-of-00002.safetensors",
        "ties.yml",
        _edit_header(lambda h: h[UP].update(dtype="XX")),
        rf"tensor '{UP}': unknown dtype 'XX'",
    ),
    (
        "base/model-00001-of-00002.safetensors",
        "ties.yml",
        _edit_header(lambda h: h[UP].update(data_offsets=h[UP]["data_offsets"][::-1])),
        rf"tensor '{UP}': data_offsets",
    ),
    (
        "base/model-00001-of-00002.safetensors",
        "ties.yml",
        _edit_header(lambda h: h[UP].update(shape=[12, 9])),
        rf"tensor '{UP}': shape \[12, 9\] of BF16 needs 216 bytes",
    ),
    (
        "lora/adapter_model.safetensors",
        "ties.yml",
        lambda d: (2**40).to_bytes(8, "little") + d[8:],
        r"header length \(1099511627776 bytes\) is larger than the file",
    ),
    # config.json: not UTF-8: UnicodeDecodeError naming no file
    ("e1/config.json", "ties.yml", lambda d: b"\xfe" + d, r"e1/config.json: not valid JSON"),
    # config.json: architectures a number / nested lists / numbers: TypeError from tuple(), set(), join()
    ("e2/config.json", "ties.yml", _set("architectures", 5), r"architectures must be a list of class names"),
    ("e2/config.json", "ties.yml", _set("architectures", [["x"]]), r"architectures must be a list"),
    ("base/config.json", "ties.yml", _set("architectures", [1]), r"architectures must be a list"),
    # config.json: vocab_size 0 / -1 / true in a tokenizer merge: merged with every token "beyond its rows"
    ("base/config.json", "ties.yml", _set("vocab_size", 0), r"vocab_size must be a positive integer, got 0"),
    ("e1/config.json", "ties.yml", _set("vocab_size", -1), r"vocab_size must be a positive integer, got -1"),
    (
        "e1/config.json",
        "ties.yml",
        _set("vocab_size", True),
        r"vocab_size must be a positive integer, got True",
    ),
    # adapter config: not UTF-8: UnicodeDecodeError naming no file
    ("lora/adapter_config.json", "ties.yml", lambda d: b"\xff" + d, r"adapter_config.json: not valid JSON"),
    # adapter config: null: AttributeError: 'NoneType' object has no attribute 'get'
    ("lora/adapter_config.json", "ties.yml", lambda d: b"null", r"expected a JSON object, got NoneType"),
    # adapter config: lora_alpha a string / null: TypeError: unsupported operand type(s) for /
    ("lora/adapter_config.json", "ties.yml", _set("lora_alpha", "4"), r"lora_alpha must be a finite number"),
    ("lora/adapter_config.json", "ties.yml", _set("lora_alpha", None), r"lora_alpha must be a finite number"),
    # adapter config: alpha_pattern a number: AttributeError: 'int' object has no attribute 'items'
    (
        "lora/adapter_config.json",
        "ties.yml",
        _set("alpha_pattern", 5),
        r"alpha_pattern must map module patterns",
    ),
    # adapter config: alpha_pattern key not a regular expression: re.error: missing ), unterminated subpattern
    (
        "lora/adapter_config.json",
        "ties.yml",
        _set("alpha_pattern", {"(q": 2}),
        r"alpha_pattern key '\(q' is not a regular",
    ),
    # adapter config: a pattern valid alone, not inside the match: re.error: global flags not at the start
    ("lora/adapter_config.json", "ties.yml", _set("alpha_pattern", {"(?i)q_proj": 2}), r"is not a regular"),
    # adapter config: an alpha of 1e300: RuntimeError: value cannot be converted to type float without
    # overflow
    (
        "lora/adapter_config.json",
        "ties.yml",
        _set("alpha_pattern", {"q_proj": 1e300}),
        rf"LoRA update of '{LAYER0}' may overflow",
    ),
    # tokenizer.json: a BPE continuing_subword_prefix longer than its tokens: pyo3 PanicException traceback
    (
        "base/tokenizer.json",
        "ties.yml",
        _set("model", "continuing_subword_prefix", "<s>"),
        r"tokenizers failed on its",
    ),
    # tokenizer.json: two tokens with one id: loads, then Exception: Token `<s>n` out of vocabulary or a
    # PanicException when saved and loaded again (tokenizers keeps one of the two, by hash order: a merge
    # is the other outcome)
    (
        "base/tokenizer.json",
        "ties.yml",
        _set("model", "vocab", "i", 1),
        Either(r"cannot be saved and loaded"),
    ),
    (
        "base/tokenizer.json",
        "ties.yml",
        _set("model", "vocab", "d", 0),
        Either(r"cannot be saved and loaded"),
    ),
    # tokenizer.json: an id of 2**31: saving it walked every id up to it (minutes, gigabytes): a hang
    (
        "base/tokenizer.json",
        "ties.yml",
        _set("model", "vocab", "z", 2**31),
        r"gives 'z' id 2147483648, far beyond",
    ),
]


@pytest.mark.parametrize(
    ("relative", "config", "corrupt", "pattern"),
    REGRESSIONS,
    ids=[f"{i:02d}-{case[0].replace('/', '-')}" for i, case in enumerate(REGRESSIONS)],
)
def test_inputs_that_once_failed(world, relative, config, corrupt, pattern):
    path = world.root / relative
    code, err, out = _run(world, {path: corrupt(world.originals[path])}, config)
    _check(code, err, out, (str(path), str(path.parent)))
    if not (isinstance(pattern, Either) and code == 0):
        assert code == 2 and re.search(str(pattern), err), err
