"""Tokenizer merges against mergekit 0.1.5 itself, on tiny Llama models with real tokenizers.

The models (tests/vocab_models.py) share a BPE vocabulary and add different tokens: ``a`` adds the
special tokens ``<|im_start|>`` / ``<|im_end|>``, ``b`` a regular token ``xyz``, a normal added token
``<tool>`` and ``<|im_end|>``, so ``a`` and ``b`` give id 35 to different tokens. Each case runs one
config through both tools; the outputs must have the same vocabulary, the same row for every token
(within float32 rounding), the same ``config.json`` vocab_size and the same other tensors.

Ids: mergekit walks the models of a union in hash order (``list(set(...))``), so the ids its union
gives tokens from different models change from run to run; the union cases compare rows by token,
the others (base, a named model, one added model) compare ids exactly too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from . import mergekit_oracle as oracle
from .vocab_models import write_vocab_model

if oracle.oracle_python() is None:
    pytest.skip(oracle.skip_reason(), allow_module_level=True)

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "and then?"},
]


def _models(root: Path) -> dict[str, str]:
    base = write_vocab_model(root / "base", seed=0)
    write_vocab_model(root / "a", seed=1, perturb_from=base, special=["<|im_start|>", "<|im_end|>"])
    write_vocab_model(
        root / "b", seed=2, perturb_from=base, added=["<tool>"], regular=["xyz"], special=["<|im_end|>"]
    )
    tied = write_vocab_model(root / "tbase", seed=3, tie_embeddings=True)
    write_vocab_model(root / "ta", seed=4, tie_embeddings=True, perturb_from=tied, special=["<|im_start|>"])
    # a base whose embedding has more rows than its tokenizer has tokens (padded, as many hub models)
    padded = write_vocab_model(root / "pbase", seed=5, rows=40)
    write_vocab_model(root / "pa", seed=6, rows=40, perturb_from=padded, added=["<tool>"])
    # the same id (35) holds the base's <pad> and the fine-tuned model's <|im_start|>
    conflict = write_vocab_model(root / "cbase", seed=7, special=["<pad>"])
    write_vocab_model(root / "ca", seed=8, perturb_from=conflict, special=["<|im_start|>"])
    # bf16 models (merged in float32 and written in bf16: with `dtype: bfloat16` mergekit also rounds
    # the method's own sums to bf16, a difference the README lists)
    half = write_vocab_model(root / "hbase", seed=9, dtype=torch.bfloat16)
    write_vocab_model(root / "ha", seed=10, dtype=torch.bfloat16, perturb_from=half, special=["<|im_start|>"])
    write_vocab_model(root / "hb", seed=11, dtype=torch.bfloat16, perturb_from=half, special=["<|im_start|>"])
    write_vocab_model(root / "hc", seed=12, dtype=torch.bfloat16, perturb_from=half, added=["<tool>"])
    return {p.name: str(p) for p in root.iterdir() if p.is_dir()}


def _config(m: dict[str, str], base="base", experts=("a", "b"), method="task_arithmetic", **extra) -> dict:
    weights = (0.5, 0.7, 0.3)
    models = [{"model": m[e], "parameters": {"weight": w}} for e, w in zip(experts, weights, strict=False)]
    return {"merge_method": method, "base_model": m[base], "models": models, "dtype": "float32", **extra}


def _cases(m: dict[str, str]) -> dict[str, tuple[dict, bool]]:
    """name -> (config, whether mergekit's ids are deterministic for it)."""
    return {
        "union": (_config(m, tokenizer_source="union"), False),
        "union-block": (_config(m, tokenizer={}), False),
        "base": (_config(m, tokenizer_source="base"), True),
        "model": (_config(m, tokenizer_source=m["a"]), True),
        "one-added-model": (_config(m, experts=("a",), tokenizer_source="union"), True),
        "linear": (
            {
                **_config(m, method="linear", experts=("a", "b", "base"), tokenizer_source="union"),
                "base_model": m["base"],
            },
            False,
        ),
        "forced": (
            _config(
                m,
                tokenizer={
                    "source": "union",
                    "pad_to_multiple_of": 16,
                    "tokens": {
                        "<|im_start|>": {"source": m["a"], "force": True},
                        "<tool>": {"source": {"kind": "zero"}, "force": True},
                        "<|im_end|>": {
                            "source": {"kind": "model_token", "model": m["base"], "token": "</s>"}
                        },
                        "<new>": {"source": {"kind": "model_token", "model": m["b"], "token_id": 5}},
                        "the": {"source": m["b"], "force": True},
                    },
                },
                chat_template="chatml",
            ),
            False,
        ),
        "pad-model": (
            _config(m, experts=("a",), tokenizer={"source": m["a"], "pad_to_multiple_of": 7}),
            True,
        ),
        "base-conflict": (_config(m, base="cbase", experts=("ca",), tokenizer_source="base"), True),
        "union-conflict": (_config(m, base="cbase", experts=("ca",), tokenizer_source="union"), True),
        "bf16": (
            {
                **_config(
                    m,
                    base="hbase",
                    experts=("ha", "hb", "hc"),
                    tokenizer={"source": "union", "pad_to_multiple_of": 8},
                ),
                "out_dtype": "bfloat16",
            },
            False,
        ),
        "tied": (_config(m, base="tbase", experts=("ta",), tokenizer_source="union"), True),
        "padded-base": (_config(m, base="pbase", experts=("pa",), tokenizer_source="union"), True),
        "template-literal": (
            _config(
                m,
                experts=("a",),
                tokenizer_source="base",
                chat_template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}",
            ),
            True,
        ),
    }


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Every case merged by both tools: name -> (ours, mergekit's, deterministic ids)."""
    root = tmp_path_factory.mktemp("vocab")
    m = _models(root / "models")
    cases = _cases(m)
    jobs = [(cfg, root / f"mergekit-{name}") for name, (cfg, _) in cases.items()]
    failures = oracle.run_mergekit_many(jobs)
    out = {}
    for (name, (cfg, exact)), failure in zip(cases.items(), failures, strict=True):
        ours = root / f"ours-{name}"
        oracle.run_ours(cfg, ours)
        out[name] = (ours, root / f"mergekit-{name}", exact, failure)
    return out


def _rows_by_token(tensor: torch.Tensor, vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    return {token: tensor[i] for token, i in vocab.items()}


@pytest.mark.parametrize(
    "name",
    [
        "union",
        "union-block",
        "base",
        "model",
        "one-added-model",
        "linear",
        "forced",
        "pad-model",
        "base-conflict",
        "union-conflict",
        "bf16",
        "tied",
        "padded-base",
        "template-literal",
    ],
)
def test_tokenizer_merge_matches_mergekit(merged, name):
    from transformers import AutoTokenizer

    ours_dir, theirs_dir, exact, failure = merged[name]
    assert failure is None, f"mergekit failed on {name}:\n{failure}"
    ours_tok = AutoTokenizer.from_pretrained(str(ours_dir))
    theirs_tok = AutoTokenizer.from_pretrained(str(theirs_dir))
    ours_vocab, theirs_vocab = ours_tok.get_vocab(), theirs_tok.get_vocab()
    assert set(ours_vocab) == set(theirs_vocab)
    if exact:
        assert ours_vocab == theirs_vocab
    else:  # the base's ids are kept by both
        shared = {t: i for t, i in theirs_vocab.items() if i < 35}
        assert {t: ours_vocab[t] for t in shared} == shared
    for added in theirs_tok.added_tokens_decoder.values():
        mine = ours_tok.added_tokens_decoder[ours_vocab[added.content]]
        assert (mine.special, mine.normalized) == (added.special, added.normalized), added.content
    configs = [json.loads((d / "config.json").read_text()) for d in (ours_dir, theirs_dir)]
    assert configs[0]["vocab_size"] == configs[1]["vocab_size"]
    assert configs[0]["tie_word_embeddings"] == configs[1]["tie_word_embeddings"]

    ours, theirs = oracle.load_dir(ours_dir), oracle.load_dir(theirs_dir)
    assert set(ours) == set(theirs)
    problems = []
    for tensor_name, value in theirs.items():
        mine = ours[tensor_name]
        if tensor_name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert mine.shape == value.shape, tensor_name
            count = len(theirs_vocab)
            a, b = _rows_by_token(mine, ours_vocab), _rows_by_token(value, theirs_vocab)
            mine = torch.stack([a[t] for t in theirs_vocab] + list(mine[count:]))
            value = torch.stack([b[t] for t in theirs_vocab] + list(value[count:]))
        msg = oracle.compare_tensors(tensor_name, mine, value)
        if msg:
            problems.append(msg)
    assert not problems, "\n".join(problems)
    if theirs_tok.chat_template is not None or ours_tok.chat_template is not None:
        render = [
            t.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
            for t in (ours_tok, theirs_tok)
        ]
        assert render[0] == render[1]
