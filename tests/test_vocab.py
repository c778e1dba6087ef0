"""Tokenizer merges without mergekit: the row rules against a float64 reference written from the
spec, the union's token order, stripping, the engine's outputs (tokenizer, config.json, chat
templates, tied embeddings, truncation without a tokenizer setting) and the errors.
(tests/test_tokenizer_oracle.py compares whole merges with mergekit itself.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from mergekernels.config import load_config
from mergekernels.engine import merge_checkpoints
from mergekernels.vocab import (
    BUILTIN_NAMES,
    RowSource,
    TokenizerError,
    TokenizerSettings,
    TokenSetting,
    VocabularyWarning,
    build_vocabulary,
    builtin_template,
)
from mergekernels.vocab.build import ModelVocabulary, Vocabulary, strip_tokenizer

from .mergekit_oracle import load_dir
from .vocab_models import base_vocabulary, write_tokenizer, write_vocab_model

# --- the row rules ------------------------------------------------------------------------------


def _reference(vocab: Vocabulary, models: list[str], tensors: dict[str, torch.Tensor]) -> dict:
    """Each model's rows in the output order, in float64, from the spec's words: own row unless
    forced; else the configured source; else the only model's row; else the base's; else the mean of
    those that have it; zero if none; padding rows are the model's mean row."""
    x = {m: t.double() for m, t in tensors.items()}
    shape = next(iter(x.values())).shape[1:]
    out = {}
    for m in models:
        rows = []
        for token in vocab.tokens:
            setting = vocab.settings.tokens.get(token)
            own = vocab.models[m].tokens.get(token)
            if own is not None and not (setting and setting.force):
                rows.append(x[m][own])
                continue
            if setting is not None:
                src = setting.source
                if src.kind == "zero":
                    rows.append(torch.zeros(shape, dtype=torch.float64))
                elif src.kind == "model":
                    rows.append(x[src.model][vocab.models[src.model].tokens[token]])
                elif src.token is not None:
                    rows.append(x[src.model][vocab.models[src.model].tokens[src.token]])
                else:
                    rows.append(x[src.model][src.token_id])
                continue
            having = [h for h in models if token in vocab.models[h].tokens]
            if len(having) == 1:
                rows.append(x[having[0]][vocab.models[having[0]].tokens[token]])
            elif not having:
                rows.append(torch.zeros(shape, dtype=torch.float64))
            elif vocab.base in having:
                rows.append(x[vocab.base][vocab.models[vocab.base].tokens[token]])
            else:
                rows.append(sum(x[h][vocab.models[h].tokens[token]] for h in having) / len(having))
        table = torch.stack(rows)
        if vocab.size > len(rows):
            table = torch.cat([table, table.mean(0, keepdim=True).expand(vocab.size - len(rows), *shape)])
        out[m] = table
    return out


def _random_vocabulary(rng: random.Random, models: list[str], pad: int | None) -> Vocabulary:
    words = [f"w{i}" for i in range(23)]
    per_model = {}
    for m in models:
        kept = [w for w in words if rng.random() < 0.7]
        rng.shuffle(kept)
        extra = rng.randrange(3)  # rows no token names (a padded embedding)
        per_model[m] = ModelVocabulary(m, {w: i for i, w in enumerate(kept)}, len(kept) + extra)
    tokens = list(dict.fromkeys(w for m in models for w in per_model[m].tokens)) + ["nowhere"]
    settings = {}
    for token in rng.sample(tokens, 6):
        kind = rng.choice(["zero", "model", "model_token", "model_id"])
        owners = [m for m in models if token in per_model[m].tokens] or models[:1]
        force = rng.random() < 0.5
        if kind == "zero":
            settings[token] = TokenSetting(RowSource("zero"), force)
        elif kind == "model" and token in per_model[owners[0]].tokens:
            settings[token] = TokenSetting(RowSource("model", owners[0]), force)
        elif kind == "model_token":
            m = rng.choice(models)
            other = rng.choice(list(per_model[m].tokens))
            settings[token] = TokenSetting(RowSource("model_token", m, token=other), force)
        else:
            m = rng.choice(models)
            settings[token] = TokenSetting(RowSource("model_token", m, token_id=per_model[m].rows - 1), force)
    size = len(tokens)
    if pad and size % pad:
        size += pad - size % pad
    return Vocabulary(None, tokens, size, per_model, TokenizerSettings("union", settings, pad), models[0])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("trailing", [(5,), (), (3, 2), (1,)])
def test_rows_follow_the_spec(seed, dtype, trailing):
    rng = random.Random(seed)
    models = ["base", "a", "b", "c"][: 2 + seed % 3]
    vocab = _random_vocabulary(rng, models, pad=[None, 4, 7][seed % 3])
    layout_models = models if seed % 2 else models[1:] + models[:1]  # the base need not come first
    if seed == 5:  # a tensor merged without the base: its rows fall back to the average
        layout_models = [m for m in models if m != "base"]
        vocab.settings.tokens.clear()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in layout_models:
        full = torch.randn((vocab.models[m].rows + 1, *trailing), generator=g).to(dtype)
        # non-contiguous inputs: every other row of a larger tensor
        wide = torch.zeros((2 * full.shape[0], *trailing), dtype=dtype)
        wide[::2] = full
        tensors[m] = wide[::2]
    expected = _reference(vocab, layout_models, tensors)
    with pytest.warns(VocabularyWarning) if "nowhere" not in vocab.settings.tokens else _no_warning():
        out = vocab.layout(tuple(layout_models)).permute(dict(tensors))
    assert list(out) == layout_models
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for m in layout_models:
        assert out[m].dtype == dtype and out[m].shape == (vocab.size, *trailing)
        torch.testing.assert_close(out[m].double(), expected[m], rtol=tol, atol=tol)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_token_only_some_models_have_gets_the_same_row_in_the_others():
    """The spec's point: a model lacking a token takes the donor's row, so task vectors are zero there."""
    per = {
        "base": ModelVocabulary("base", {"x": 0, "y": 1}, 2),
        "a": ModelVocabulary("a", {"x": 0, "y": 1, "<im>": 2}, 3),
        "b": ModelVocabulary("b", {"x": 0, "<tool>": 1, "y": 2}, 3),
    }
    vocab = Vocabulary(None, ["x", "y", "<im>", "<tool>"], 4, per, TokenizerSettings("union"), "base")
    t = {
        m: torch.arange(per[m].rows * 2, dtype=torch.float32).reshape(-1, 2) + 10 * i
        for i, m in enumerate(per)
    }
    out = vocab.layout(("base", "a", "b")).permute(dict(t))
    assert torch.equal(out["base"][2], t["a"][2]) and torch.equal(out["b"][2], t["a"][2])  # only a has <im>
    assert torch.equal(out["a"][3], t["b"][1]) and torch.equal(out["base"][3], t["b"][1])  # only b has <tool>
    assert torch.equal(out["b"][1], t["b"][2])  # b's y sits at its own id 2


# --- the output vocabulary ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    write_tokenizer(root / "base")
    write_tokenizer(root / "a", special=["<|im_start|>", "<|im_end|>"])
    write_tokenizer(root / "b", added=["<tool>"], regular=["xyz"], special=["<|im_end|>"])
    return {p.name: p for p in root.iterdir()}


def test_union_keeps_the_base_ids_then_adds_regular_then_added_tokens(tokenizers):
    settings = TokenizerSettings("union", {"<new>": TokenSetting(RowSource("zero"))})
    vocab = build_vocabulary(
        settings, "base", {"base": tokenizers["base"], "a": tokenizers["a"], "b": tokenizers["b"]}
    )
    n = len(base_vocabulary())
    assert vocab.tokens[:n] == list(base_vocabulary())
    assert vocab.tokens[n:] == ["xyz", "<|im_start|>", "<|im_end|>", "<tool>", "<new>"]
    assert vocab.size == n + 5
    added = {t.content: t for t in vocab.tokenizer.added_tokens_decoder.values()}
    assert added["<|im_start|>"].special and added["<|im_end|>"].special
    assert not added["<tool>"].special and not added["xyz"].special
    assert vocab.models["b"].tokens["xyz"] == n and vocab.models["a"].tokens["<|im_start|>"] == n
    ids = vocab.tokenizer("the <|im_start|> and", add_special_tokens=False).input_ids
    assert ids == [vocab.tokens.index("the"), vocab.tokens.index("<|im_start|>"), vocab.tokens.index("and")]


def test_base_and_model_sources(tokenizers):
    dirs = {"base": tokenizers["base"], "a": tokenizers["a"]}
    assert build_vocabulary(TokenizerSettings("base"), "base", dirs).tokens == list(base_vocabulary())
    vocab = build_vocabulary(TokenizerSettings(str(tokenizers["b"]), {}, 8), "base", dirs, tokenizers["b"])
    assert vocab.tokens[-3:] == ["xyz", "<tool>", "<|im_end|>"] and vocab.size == 40


def test_a_tokenizer_naming_more_tokens_than_rows_is_stripped(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizers["b"]))
    n = len(base_vocabulary())
    stripped = strip_tokenizer(tok, n + 1, "b")  # keeps xyz (a BPE entry), drops the added tokens
    assert len(stripped) == n + 1 and "xyz" in stripped.get_vocab() and "<tool>" not in stripped.get_vocab()
    assert (
        stripped("the and", add_special_tokens=False).input_ids
        == tok("the and", add_special_tokens=False).input_ids
    )


# --- merges through the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = write_vocab_model(root / "base", seed=0, chat_template="BASE {{ messages }}")
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    write_vocab_model(root / "a", seed=1, perturb_from=base, special=["<|im_start|>"], chat_template=template)
    write_vocab_model(root / "b", seed=2, perturb_from=base, added=["<tool>"], chat_template=template)
    tied = write_vocab_model(root / "tbase", seed=3, tie_embeddings=True)
    write_vocab_model(root / "ta", seed=4, tie_embeddings=True, perturb_from=tied, special=["<|im_start|>"])
    notok = write_vocab_model(root / "notok", seed=5, perturb_from=base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / "notok" / f).unlink()
    del notok
    return {p.name: p for p in root.iterdir() if p.is_dir()}


def _merge(tmp_path, models, name="out", base="base", experts=("a", "b"), **extra):
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(models[base]),
        "models": [{"model": str(models[e]), "parameters": {"weight": 0.5}} for e in experts],
        **extra,
    }
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / name
    merge_checkpoints(str(path), out, quiet=True, device="cpu")
    return out


def test_union_merge_writes_a_matching_tokenizer_and_config(tmp_path, models):
    from transformers import AutoTokenizer

    out = _merge(tmp_path, models, tokenizer_source="union", chat_template="auto")
    tok = AutoTokenizer.from_pretrained(str(out))
    tensors = load_dir(out)
    n = len(tok)
    assert n == len(base_vocabulary()) + 2
    assert tensors["model.embed_tokens.weight"].shape[0] == n == tensors["lm_head.weight"].shape[0]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n
    # auto: the template two of the three models have
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
    assert (out / "chat_template.jinja").is_file()
    # <tool>: only b has it, so base and a take b's row and the merge is b's row scaled
    base = load_dir(models["base"])["model.embed_tokens.weight"]
    b = load_dir(models["b"])["model.embed_tokens.weight"]
    row = tok.convert_tokens_to_ids("<tool>")
    torch.testing.assert_close(tensors["model.embed_tokens.weight"][row], b[len(base)], rtol=1e-6, atol=1e-6)


def test_tied_embeddings_stay_tied(tmp_path, models):
    out = _merge(tmp_path, models, base="tbase", experts=("ta",), tokenizer_source="union")
    tensors = load_dir(out)
    assert "lm_head.weight" not in tensors
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == len(base_vocabulary()) + 1


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_chat_template_without_a_tokenizer_merge(tmp_path, models, name):
    from transformers import AutoTokenizer

    with pytest.warns(VocabularyWarning, match="cut to their common first rows"):  # a and b add a row
        out = _merge(tmp_path, models, name=name, chat_template=name)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template.strip() == builtin_template(name).strip()
    assert len(tok) == len(base_vocabulary())  # the base's tokenizer, template replaced


def test_without_a_tokenizer_setting_vocabulary_tensors_are_cut_to_common_rows(tmp_path, models):
    shapes = r"model.embed_tokens.weight: \[35, 16\] in \S*base, \[36, 16\] in \S*a -> 35 rows"
    with pytest.warns(VocabularyWarning, match=shapes):
        out = _merge(tmp_path, models, name="cut", experts=("a",))
    tensors = load_dir(out)
    base, a = load_dir(models["base"]), load_dir(models["a"])
    n = len(base_vocabulary())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        expected = base[name] + 0.5 * (a[name][:n] - base[name])
        torch.testing.assert_close(tensors[name], expected, rtol=1e-6, atol=1e-6)
    # the larger model as the base: its extra rows go, and config.json says so
    with pytest.warns(VocabularyWarning):
        out = _merge(tmp_path, models, name="cut2", base="a", experts=("base",))
    assert load_dir(out)["lm_head.weight"].shape[0] == n
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n


def test_a_model_without_a_tokenizer_shares_the_base_tokens_with_a_warning(tmp_path, models):
    with pytest.warns(VocabularyWarning, match=r"notok: no tokenizer files .* taken to be the base's"):
        out = _merge(tmp_path, models, experts=("notok", "a"), tokenizer_source="union")
    assert load_dir(out)["lm_head.weight"].shape[0] == len(base_vocabulary()) + 1


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (dict(tokenizer_source="@notok"), r"notok: no tokenizer files"),
        (dict(tokenizer_source="union", base="notok"), r"notok: no tokenizer files"),
        (
            dict(tokenizer={"tokens": {"<tool>": {"source": "@a", "force": True}}}),
            r"tokenizer.tokens\['<tool>'\]: model .*a has no token '<tool>'",
        ),
        (
            dict(
                tokenizer={
                    "tokens": {"<x>": {"source": {"kind": "model_token", "model": "@a", "token": "zz"}}}
                }
            ),
            r"tokenizer.tokens\['<x>'\]: model .*a has no token 'zz'",
        ),
        (
            dict(
                tokenizer={
                    "tokens": {"<x>": {"source": {"kind": "model_token", "model": "@b", "token_id": 99}}}
                }
            ),
            r"token_id 99 is beyond the 36 rows of .*b",
        ),
    ],
)
def test_tokenizer_errors_name_the_model_and_token_and_leave_no_output(tmp_path, models, extra, pattern):
    extra = json.loads(json.dumps(extra).replace('"@', '"' + str(models["base"].parent) + "/"))
    base = extra.pop("base", "base")
    with pytest.raises(TokenizerError, match=pattern):
        _merge(tmp_path, models, name="bad", base=base, **extra)
    assert not (tmp_path / "bad").exists()


def test_config_keeps_the_settings(tmp_path):
    path = tmp_path / "m.yml"
    path.write_text(
        """
        merge_method: task_arithmetic
        base_model: base
        models: [{model: a, parameters: {weight: 1}}]
        tokenizer:
          source: a
          pad_to_multiple_of: 64
          tokens:
            <|im_start|>: {source: a, force: true}
            <z>: {source: {kind: zero}}
            <t>: {source: {kind: model_token, model: base, token_id: 3}}
        chat_template: llama3
        """.replace("\n        ", "\n")
    )
    cfg = load_config(path)
    a = str(tmp_path / "a")
    assert cfg.tokenizer == TokenizerSettings(
        a,
        {
            "<|im_start|>": TokenSetting(RowSource("model", a), True),
            "<z>": TokenSetting(RowSource("zero")),
            "<t>": TokenSetting(RowSource("model_token", str(tmp_path / "base"), token_id=3)),
        },
        64,
    )
    assert cfg.chat_template == "llama3" and cfg.tokenizer.source_model == a


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_vocabulary_tensors_stream_in_row_chunks_with_the_same_bytes(tmp_path, models, method):
    """Row chunks of a few rows (each gathered on its own, the shared rows found first) give the
    whole-tensor merge's bytes; ties adds a pre-pass over the chunks."""
    extra = dict(
        merge_method=method,
        tokenizer={
            "source": "union",
            "pad_to_multiple_of": 16,
            "tokens": {"<tool>": {"source": {"kind": "zero"}, "force": True}},
        },
    )
    if method == "ties":
        extra["parameters"] = {"density": 0.5}
    cfg = {
        "base_model": str(models["base"]),
        "models": [{"model": str(models[e]), "parameters": {"weight": 0.5}} for e in ("a", "b")],
        **extra,
    }
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    whole = merge_checkpoints(str(path), tmp_path / "whole", quiet=True, device="cpu")
    merge_checkpoints(str(path), tmp_path / "rows", quiet=True, device="cpu", chunk_bytes=3 * 16 * 4)
    for f in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "rows" / f.name).read_bytes()
    assert whole.tensors == len(load_dir(tmp_path / "whole"))
    embed = load_dir(tmp_path / "rows")["model.embed_tokens.weight"]
    n = len(base_vocabulary())  # then <|im_start|> (a), <tool> (b), 11 padding rows
    assert embed.shape[0] == 48 and torch.equal(embed[n + 1], torch.zeros(16))
    assert torch.equal(embed[n + 2 :], embed[n + 2].expand(48 - n - 2, 16))


def test_pieces_of_any_size_give_the_whole_tensor_bits():
    """Across several padding-sum blocks (PAD_BLOCK_ROWS): every chunking gives the same bits."""
    from mergekernels.vocab.rows import PAD_BLOCK_ROWS

    g = torch.Generator().manual_seed(0)
    count = 2 * PAD_BLOCK_ROWS + 37
    words = [f"t{i}" for i in range(count)]
    per = {
        "base": ModelVocabulary("base", {w: i for i, w in enumerate(words[:-5])}, count - 5),
        "a": ModelVocabulary("a", {w: i for i, w in enumerate(reversed(words))}, count),
    }
    vocab = Vocabulary(None, words, count + 11, per, TokenizerSettings("union", {}, 16), "base")
    tensors = {m: torch.randn((v.rows, 7), generator=g) for m, v in per.items()}
    layout = vocab.layout(("base", "a"))

    def fetch(model, ids):
        return tensors[model].index_select(0, ids)

    whole = {m: layout.assemble(m, 0, vocab.size, fetch, layout.prepare(fetch)) for m in per}
    for step in (1, 333, PAD_BLOCK_ROWS, vocab.size - 1):
        filler = layout.prepare(fetch)
        for m in per:
            parts = [
                layout.assemble(m, r, min(r + step, vocab.size), fetch, filler)
                for r in reversed(range(0, vocab.size, step))  # padding rows asked for first
            ]
            assert torch.equal(torch.cat(parts[::-1]), whole[m]), (m, step)
