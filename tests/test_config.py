"""YAML merge configurations: mergekit's format and semantics, our dialect, validation.

The merges at the end run configurations through ``mk.merge`` and compare the result with an
independent float64 implementation of mergekit's documented semantics for the same configuration
(written below from mergekit's documentation, not from our translation).
"""

import fnmatch
import os
import re
import textwrap

import pytest
import torch
import yaml

import mergekernels as mk
from mergekernels.config import ConfigWarning, MergeConfig, ModelEntry, load_config, method_kwargs

from . import reference as ref
from .conftest import assert_close_to_ref


def write(tmp_path, text, name="merge.yml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path, text):
    return load_config(write(tmp_path, text))


def p(tmp_path, name):
    """A model path as the config resolves it (relative to the YAML's directory)."""
    return os.path.normpath(os.path.join(tmp_path.resolve(), name))


# ----------------------------------------------------------------------------------------------
# mergekit configurations and their translation.
def test_mergekit_ties_example_translates(tmp_path):
    cfg = load(
        tmp_path,
        """
        models:
          - model: base            # the base listed without parameters, as mergekit allows
          - model: ./orca
            parameters:
              density: 0.5
              weight: 1.0
          - model: platypus
            parameters:
              density: 0.3
              weight: 0.5
        merge_method: ties
        base_model: base
        parameters:
          normalize: true
          int8_mask: true
        dtype: float16
        """,
    )
    assert isinstance(cfg, MergeConfig)
    assert cfg.method == "ties" and cfg.dialect == "mergekit"
    assert cfg.base_model == p(tmp_path, "base")
    assert cfg.models == [
        ModelEntry(p(tmp_path, "orca"), {"weights": 1.0, "density": 0.5}),
        ModelEntry(p(tmp_path, "platypus"), {"weights": 0.5, "density": 0.3}),
    ]
    # mergekit's defaults are explicit: no trim unless asked, weighted election, weighted mean, and
    # exactly k entries kept
    assert cfg.params == {
        "scale": 1.0,
        "merge": "weighted",
        "weighted_election": True,
        "density": 1.0,
        "exact_k": True,
    }
    assert cfg.dtype == torch.float16 and cfg.out_dtype == torch.float16  # out_dtype follows dtype
    assert method_kwargs(cfg) == {
        "scale": 1.0,
        "merge": "weighted",
        "weighted_election": True,
        "density": [0.5, 0.3],
        "weights": [1.0, 0.5],
        "exact_k": True,
    }


def test_plain_string_models_and_global_tensor_parameters(tmp_path):
    cfg = load(
        tmp_path,
        """
        merge_method: task_arithmetic
        base_model: base
        models: [a, b, {model: c, parameters: {weight: 0.25}}]
        parameters: {weight: 0.5, lambda: 0.8}
        out_dtype: bfloat16
        """,
    )
    assert [m.path for m in cfg.models] == [p(tmp_path, n) for n in "abc"]
    assert cfg.params == {"weights": 0.5, "scale": 0.8, "normalize": False}
    assert method_kwargs(cfg)["weights"] == [0.5, 0.5, 0.25]
    assert cfg.dtype is None and cfg.out_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "method, normalize, rescale, expected",
    [
        ("dare_ties", None, None, {"merge": "sum", "rescale": "l1", "weighted_election": True}),
        ("dare_ties", True, False, {"merge": "weighted", "rescale": False, "weighted_election": True}),
        ("dare_linear", None, None, {"merge": "sum", "rescale": "l1"}),
        ("dare_linear", True, True, {"merge": "weighted", "rescale": "l1"}),
    ],
)
def test_mergekit_dare_density_is_the_kept_fraction(tmp_path, method, normalize, rescale, expected):
    extra = {k: v for k, v in (("normalize", normalize), ("rescale", rescale)) if v is not None}
    cfg = load_config(
        {
            "merge_method": method,
            "base_model": "/m/base",
            "models": [
                {"model": "/m/a", "parameters": {"weight": 0.7, "density": 0.6}},
                "/m/b",
            ],
            "parameters": {"density": 0.25, **extra},
            "options": {"seed": 11},
        }
    )
    kwargs = method_kwargs(cfg)
    assert kwargs["drop"] == [pytest.approx(0.4), pytest.approx(0.75)]
    assert kwargs["weights"] == [0.7, 1.0]  # b has no weight: 1 (mergekit would require one)
    assert kwargs["seed"] == 11
    for key, value in expected.items():
        assert kwargs[key] == value
    if "ties" not in method:
        assert "weighted_election" not in kwargs


def test_mergekit_dare_default_density_keeps_everything():
    cfg = load_config({"merge_method": "dare_ties", "base_model": "/b", "models": ["/a"]})
    assert method_kwargs(cfg)["drop"] == 0.0


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_mergekit_breadcrumbs_gamma_ignored_at_full_density(method):
    cfg = load_config(
        {
            "merge_method": method,
            "base_model": "/b",
            "models": [
                {"model": "/a", "parameters": {"density": 0.8}},  # default gamma 0.01 applies
                {"model": "/c", "parameters": {"density": 0.9, "gamma": 0.05}},
                "/d",  # global density 1: not sparsified, gamma ignored
            ],
        }
    )
    kwargs = method_kwargs(cfg)
    assert kwargs["density"] == [0.8, 0.9, 1.0]
    assert kwargs["gamma"] == [0.01, 0.05, 0.0]
    assert kwargs["merge"] == "sum"  # mergekit's normalize default is false for breadcrumbs


@pytest.mark.parametrize("method, merge", [("della", "weighted"), ("della_linear", "sum")])
def test_mergekit_della_parameters(method, merge):
    cfg = load_config(
        {
            "merge_method": method,
            "base_model": "/b",
            "models": [{"model": "/a", "parameters": {"density": 0.5, "epsilon": 0.1}}, "/c"],
            "parameters": {"density": 0.6, "lambda": 1.1},
        }
    )
    kwargs = method_kwargs(cfg)
    assert kwargs["density"] == [0.5, 0.6]
    assert kwargs["epsilon"] == [0.1, 0.15]  # mergekit's default epsilon
    assert kwargs["scale"] == 1.1 and kwargs["merge"] == merge and kwargs["seed"] == 0


def test_mergekit_linear_translations():
    # base given, not listed: mergekit adds it to the average, with the global weight
    data = {
        "merge_method": "linear",
        "base_model": "/b",
        "models": [
            {"model": "/a", "parameters": {"weight": 2}},
            {"model": "/c", "parameters": {"weight": 1}},
        ],
    }
    with pytest.raises(ValueError, match="base_model '/b' is not listed under `models`; mergekit adds it"):
        load_config(data)
    cfg = load_config({**data, "parameters": {"weight": 1}})
    assert [m.path for m in cfg.models] == ["/a", "/c"]
    assert method_kwargs(cfg) == {"weights": [2.0, 1.0], "normalize": False, "scale": 0.25}
    # no base: the first model is theta_0 and keeps its weight: scale = 1 / total weight
    cfg = load_config(
        {
            "merge_method": "linear",
            "models": [
                {"model": "/a", "parameters": {"weight": 1}},
                {"model": "/c", "parameters": {"weight": 3}},
            ],
        }
    )
    assert cfg.base_model == "/a" and [m.path for m in cfg.models] == ["/c"]
    assert cfg.params == {"normalize": False, "scale": 0.25}


def test_dialect_selection():
    models = [{"model": "/a", "parameters": {"density": 0.5}}]
    cfg = load_config(
        {"merge_method": "ties", "base_model": "/b", "models": models, "dialect": "mergekernels"}
    )
    assert cfg.dialect == "mergekernels" and cfg.params == {}
    kwargs = method_kwargs(cfg)
    assert kwargs == {"density": [0.5]}  # our defaults (merge="mean", paper election) stay the function's
    cfg = load_config(
        {"merge_method": "ace", "base_model": "/b", "models": ["/a", "/c"], "parameters": {"eps": 1e-5}}
    )
    assert cfg.dialect == "mergekernels" and cfg.params == {"eps": 1e-5}


def test_our_dialect_per_model_lists_take_global_or_signature_defaults():
    cfg = load_config(
        {
            "merge_method": "dare",
            "base_model": "/b",
            "models": [
                {"model": "/a", "parameters": {"drop": 0.5, "weights": 2}},
                {"model": "/c", "parameters": {"drop": 0.7}},
                "/d",
            ],
            "parameters": {"consensus": "ties", "rescale": "l1", "merge": "weighted", "scale": "5e-1"},
            "options": {"seed": 3},
        }
    )
    kwargs = method_kwargs(cfg)
    assert kwargs["drop"] == [0.5, 0.7, 0.9]  # d: dare's signature default 0.9
    assert kwargs["weights"] == [2.0, 1.0, 1.0]  # weights=None in the signature means 1
    assert kwargs["scale"] == 0.5  # YAML 1.1 reads 5e-1 as a string; accepted as a number
    assert kwargs["seed"] == 3 and kwargs["consensus"] == "ties" and kwargs["rescale"] == "l1"
    cfg = load_config(
        {
            "merge_method": "ties",
            "dialect": "mergekernels",
            "base_model": "/b",
            "models": [{"model": "/a", "parameters": {"density": 0.3}}, "/c"],
            "parameters": {"density": 0.6},
        }
    )
    assert method_kwargs(cfg)["density"] == [0.3, 0.6]  # c: the global value
    cfg = load_config(
        {
            "merge_method": "task_arithmetic",
            "dialect": "mergekernels",
            "base_model": "/b",
            "models": [{"model": "/a", "parameters": {"weights": 3}}, "/c"],
            "parameters": {"weights": None, "normalize": True},
        }
    )
    assert method_kwargs(cfg) == {"weights": [3.0, 1.0], "normalize": True}  # null weights mean 1


def test_our_dialect_converts_dtype_parameters_and_regmean_grams(tmp_path):
    cfg = load_config(
        {
            "merge_method": "tsv_m",
            "base_model": "/b",
            "models": ["/a"],
            "parameters": {"svd_dtype": "float64"},
        }
    )
    assert cfg.params == {"svd_dtype": torch.float64}
    grams = {"w": [torch.eye(3), 2 * torch.eye(3)]}
    torch.save(grams, tmp_path / "grams.pt")
    cfg = load(
        tmp_path,
        """
        merge_method: regmean
        base_model: base
        models: [a, b]
        parameters: {grams: grams.pt, reduction: 0.6}
        """,
    )
    assert cfg.params["grams"] == p(tmp_path, "grams.pt")
    kwargs = method_kwargs(cfg)
    assert kwargs["reduction"] == 0.6 and torch.equal(kwargs["grams"]["w"][1], 2 * torch.eye(3))


def test_paths_resolve_against_the_yaml_directory(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    cfg = load(
        sub,
        """
        merge_method: task_arithmetic
        base_model: ../models/base
        models: [../models/a, /abs/b, "~/c"]
        """,
    )
    assert cfg.base_model == str(tmp_path.resolve() / "models" / "base")
    assert [m.path for m in cfg.models] == [
        str(tmp_path.resolve() / "models" / "a"),
        "/abs/b",
        os.path.expanduser("~/c"),
    ]
    # a dict source resolves nothing (paths stay relative to the working directory)
    cfg = load_config({"merge_method": "task_arithmetic", "base_model": "base", "models": ["./a"]})
    assert cfg.base_model == "base" and cfg.models[0].path == "a"


def test_base_listed_among_models_is_dropped(tmp_path):
    cfg = load(
        tmp_path,
        """
        merge_method: dare_ties
        base_model: ./base
        models:
          - model: base
          - model: a
            parameters: {weight: 0.4, density: 0.5}
        """,
    )
    assert [m.path for m in cfg.models] == [p(tmp_path, "a")]


def test_options_exclude_and_source_round_trip(tmp_path):
    text = """
        merge_method: ties
        base_model: base
        models:
          - model: a
            parameters: {density: 0.4, weight: 1.0}
          - b
        exclude: ["lm_head.*", "*.embed_tokens.*"]
        tokenizer_source: base
        options:
          shard_size: 500MB
          memory_cap: 2GiB
          threshold_scope: global
          seed: 5
          allow_missing: base
          allow_nonfinite: true
        """
    path = write(tmp_path, text)
    cfg = load_config(path)
    assert cfg.exclude == ["lm_head.*", "*.embed_tokens.*"]
    assert cfg.options == {
        "shard_size": 500_000_000,
        "memory_cap": 2 << 30,
        "threshold_scope": "global",
        "seed": 5,
        "allow_missing": "base",
        "allow_nonfinite": True,
    }
    assert cfg.source == yaml.safe_load(textwrap.dedent(text))
    # saved beside the output and read back: the same configuration
    write(tmp_path, yaml.safe_dump(cfg.source, sort_keys=False), "saved.yml")
    assert load_config(tmp_path / "saved.yml") == cfg
    # source is a copy: editing the config does not change it, nor does it change the caller's dict
    data = yaml.safe_load(textwrap.dedent(text))
    cfg = load_config(data)
    cfg.source["models"].append("x")
    assert data["models"][-1] == "b"
    sizes = {
        "5GB": 5 * 10**9,
        "1.5gb": 1_500_000_000,
        "4GiB": 4 << 30,
        "5e9": 5 * 10**9,
        "123": 123,
        1024: 1024,
    }
    for given, expected in sizes.items():
        assert load_config(_with(options={"shard_size": given})).options["shard_size"] == expected
    defaults = load_config({"merge_method": "ties", "base_model": "b", "models": ["a"]}).options
    assert defaults == {
        "shard_size": 5_000_000_000,
        "threshold_scope": "tensor",
        "seed": 0,
        "allow_missing": "error",
        "allow_nonfinite": False,
        "memory_cap": None,
    }


# ----------------------------------------------------------------------------------------------
# Validation: every error names the file and lists what is valid.
BASE = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}


def _with(**changes):
    data = {**BASE, **changes}
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize(
    "data, pattern",
    [
        (
            _with(modles=[]),
            r"unknown top-level key 'modles'; valid: merge_method, base_model, models, parameters",
        ),
        (_with(merge_method="tie"), r"unknown merge_method 'tie'; valid: linear, task_arithmetic, ties.*ace"),
        (_with(merge_method=None), r"`merge_method` is missing; valid: linear"),
        (_with(dialect="fusionbench"), r"unknown dialect 'fusionbench'; valid: mergekit, mergekernels"),
        (_with(merge_method="ace", dialect="mergekit"), r"'ace' is not a mergekit method; .*one of: linear"),
        (
            _with(parameters={"densty": 0.5}),
            r"unknown parameter 'densty' for ties; "
            r"valid: weight, density, normalize, rescale, lambda, int8_mask$",
        ),
        (
            _with(models=[{"model": "a", "parameters": {"gamma": 0.1}}]),
            r"models\[0\] \('a'\): unknown parameter 'gamma' for ties; valid per model: weight, density",
        ),
        (
            _with(models=[{"model": "a", "parameters": {"normalize": True}}]),
            r"models\[0\] \('a'\): 'normalize' is a global parameter of ties; "
            r".*per-model parameters: weight, density",
        ),
        (
            _with(merge_method="linear", parameters={"lambda": 2.0}),
            r"unknown parameter 'lambda' for linear; valid: weight, normalize",
        ),
        (_with(parameters={"density": 0}), r"parameters.density must be a number in \(0, 1\], got 0"),
        (_with(parameters={"density": 1.5}), r"parameters.density must be a number in \(0, 1\]"),
        (_with(parameters={"weight": "heavy"}), r"parameters.weight must be a number, got 'heavy'"),
        (_with(parameters={"weight": True}), r"parameters.weight must be a number, got True"),
        (_with(parameters={"normalize": "yes"}), r"parameters.normalize must be true or false"),
        (
            _with(models=[{"model": "a", "parameters": {"density": [1, 0.7, 0]}}]),
            r"models\[0\] \('a'\) parameters.density\[2\] must be a number in \(0, 1\], got 0",
        ),
        (
            _with(models=[{"model": "a", "parameters": {"weight": [{"filter": "mlp", "valu": 0.5}]}}]),
            r"weight\[0\]: unknown key 'valu' in a filtered value; valid: filter, value",
        ),
        (
            _with(parameters={"weight": [{"filter": "mlp", "value": [0.5, {"value": 1}]}]}),
            r"parameters.weight\[0\].value: filtered entries cannot be nested",
        ),
        (_with(parameters={"weight": [0.5, True]}), r"parameters.weight\[1\] must be a number, got True"),
        (_with(base_model=None), r"base_model is missing: ties merges task vectors"),
        (_with(models=[]), r"`models` is empty"),
        (_with(models=None), r"`models` is missing"),
        (_with(models=["b"]), r"`models` lists only the base model"),
        (_with(models=[{"path": "a"}]), r"models\[0\]: unknown key 'path'; valid: model, parameters"),
        (_with(models=[{"model": 3}]), r"models\[0\]: `model` must be a path string"),
        (_with(models="a"), r"`models` must be a list"),
        (
            _with(slices=[{"sources": []}]),
            r"give one of `models`, `slices` or `modules`, not models and slices",
        ),
        (
            _with(models=None, modules={"model.visual": {"slices": []}}),
            r"modules.model.visual.slices: slices inside",
        ),
        (_with(models=None, modules={"model.visual": {}}), r"modules.model.visual.models is missing"),
        (_with(models=None, slices=[{"sources": []}]), r"slices\[0\].sources must be a non-empty list"),
        (
            _with(models=None, slices=[{"sources": [{"model": "a", "layer_range": [2, 2]}]}]),
            r"slices\[0\].sources\[0\] \('a'\): layer_range must be \[START, STOP\] with 0 <= START < STOP",
        ),
        (
            _with(models=None, slices=[{"sources": [{"model": "a", "layer_range": [0, 2]}]}]),
            r"slices\[0\]: the base model 'b' is not among its sources; ties merges task vectors",
        ),
        (
            _with(
                models=None,
                slices=[
                    {
                        "sources": [
                            {"model": "b", "layer_range": [0, 2]},
                            {"model": "a", "layer_range": [1, 2]},
                        ]
                    }
                ],
            ),
            r"slices\[0\]: its sources give different numbers of layers \(\[1, 2\]\)",
        ),
        (
            _with(merge_method="slerp", models=["a", "c"], parameters={"t": 0.5}),
            r"slerp takes the base and exactly one other model, got 2 other\(s\) \(a, c\)",
        ),
        (_with(merge_method="slerp", models=["a"]), r"slerp needs `t`"),
        (
            _with(merge_method="slerp", models=[{"model": "a", "parameters": {"t": 0.5}}]),
            r"models\[0\] \('a'\): unknown parameter 't' for slerp per model; valid: $",
        ),
        (
            _with(merge_method="passthrough", models=["a"]),
            r"passthrough takes exactly one model per slice; models has 2 models \(with the base_model\)",
        ),
        (
            _with(tokenizer_source="union", tokenizer={"source": "base"}),
            r"give either `tokenizer_source` or a `tokenizer` block, not both",
        ),
        (_with(tokenizer_source=3), r"tokenizer_source must be 'base', 'union' or a model path, got 3"),
        (
            _with(tokenizer="union"),
            r"`tokenizer` must be a mapping with source / tokens / pad_to_multiple_of",
        ),
        (_with(tokenizer={"sorce": "base"}), r"tokenizer: unknown key\(s\) 'sorce'; valid: source, tokens"),
        (
            _with(tokenizer={"pad_to_multiple_of": 0}),
            r"tokenizer.pad_to_multiple_of must be a positive integer, got 0",
        ),
        (_with(tokenizer={"tokens": ["<x>"]}), r"tokenizer.tokens must map token strings to settings"),
        (
            _with(tokenizer={"tokens": {"<x>": {"force": True}}}),
            r"tokenizer.tokens\['<x>'\] needs a `source`: a model, \{kind: zero\}",
        ),
        (
            _with(tokenizer={"tokens": {"<x>": {"source": "a", "force": "yes"}}}),
            r"tokenizer.tokens\['<x>'\].force must be true or false, got 'yes'",
        ),
        (
            _with(tokenizer={"tokens": {"<x>": {"source": {"kind": "ones"}}}}),
            r"tokenizer.tokens\['<x>'\].source must be a model path, \{kind: zero\}, or",
        ),
        (
            _with(
                tokenizer={
                    "tokens": {
                        "<x>": {
                            "source": {"kind": "model_token", "model": "a", "token": "<s>", "token_id": 1}
                        }
                    }
                }
            ),
            r"give `token` or `token_id`, not both",
        ),
        (
            _with(tokenizer={"tokens": {"<x>": {"source": "elsewhere"}}}),
            r"tokenizer.tokens\['<x>'\] takes its row from .*elsewhere, which is not one of the merged",
        ),
        (
            _with(chat_template="vicuna"),
            r"unknown chat_template 'vicuna': give 'auto', one of the built-in names "
            r"\(alpaca, chatml, exaone, llama3, mistral\) or a Jinja template",
        ),
        (
            _with(chat_template=["chatml"]),
            r"chat_template must be 'auto', a built-in name or a Jinja template",
        ),
        (_with(dtype="f32"), r"dtype 'f32' is not supported; valid: bfloat16 \(bf16\), float16"),
        (_with(out_dtype="int8"), r"out_dtype 'int8' is not supported; valid: bfloat16"),
        (_with(exclude="lm_head.*"), r"exclude must be a list of glob patterns"),
        (
            _with(options={"sead": 1}),
            r"unknown option 'sead'; valid: allow_missing, allow_nonfinite, memory_cap, seed",
        ),
        (
            _with(options={"threshold_scope": "model"}),
            r"options.threshold_scope must be one of tensor, global",
        ),
        (_with(options={"allow_missing": "skip"}), r"options.allow_missing must be one of error, base"),
        (
            _with(options={"shard_size": "5 parsecs"}),
            r"options.shard_size must be a byte count or a size such as '5GB'",
        ),
        (_with(options={"shard_size": 0}), r"options.shard_size must be a positive whole number of bytes"),
        (_with(options={"seed": -1}), r"options.seed must be a non-negative integer"),
        (
            _with(merge_method="task_arithmetic", options={"threshold_scope": "global"}),
            r"'global' applies to ties",
        ),
        (_with(parameters={"rescale": True}), r"rescale: true is not supported for ties"),
        (
            _with(merge_method="della", parameters={"rescale": False}),
            r"rescale: false is not supported for della",
        ),
        (
            _with(merge_method="breadcrumbs", parameters={"density": 0.95, "gamma": 0.1}),
            r"density \+ gamma = 1.05 > 1 for breadcrumbs; mergekit silently shrinks gamma .*gamma <= 0.05",
        ),
        (
            _with(merge_method="della", parameters={"density": 0.9, "epsilon": 0.1}),
            r"epsilon 0.1 with density 0.9: mergekit needs density - epsilon > 0 and density \+ epsilon < 1",
        ),
        (
            _with(models=[{"model": "a", "parameters": {"weight": -1.0}}]),
            r"negative weight -1 with ties's sign consensus is not supported",
        ),
        (
            _with(merge_method="linear", models=["a"], parameters={"normalize": False, "weight": 0.4}),
            r"linear with normalize: false .* only when the weights sum to 1 \(they sum to 0.8\)",
        ),
        (
            _with(
                merge_method="linear",
                base_model=None,
                models=[
                    {"model": "a", "parameters": {"weight": 0.0}},
                    {"model": "c", "parameters": {"weight": 0}},
                ],
            ),
            r"linear: the weights sum to 0",
        ),
        (
            _with(merge_method="linear", base_model=None, models=["a"], parameters={"weight": 1.0}),
            r"linear needs at least one model besides",
        ),
        (
            _with(
                merge_method="linear",
                base_model=None,
                models=[{"model": "a", "parameters": {"weight": 1}}, "c"],
            ),
            r"models\[1\] \('c'\): no `weight`; mergekit's linear needs one for every model",
        ),
        # our dialect
        (
            _with(merge_method="ace", models=[{"model": "a", "parameters": {"eps": 1e-3}}]),
            r"'eps' of ace cannot be set per model; .*\(per-model parameters of ace: none\)",
        ),
        (
            _with(merge_method="ace", parameters={"epsilon": 1e-3}),
            r"unknown parameter 'epsilon' for ace; "
            r"valid: eps, tau, k_frac, scale, orientation, gate, rank_rtol, tf32$",
        ),
        (
            _with(merge_method="dare", models=[{"model": "a", "parameters": {"density": 0.5}}]),
            r"unknown parameter 'density' for dare; valid per model: drop, weights",
        ),
        (
            _with(merge_method="dare", parameters={"seed": 3}),
            r"seed is an engine option: set it as options.seed",
        ),
        (
            _with(merge_method="dare", parameters={"drop": 1.0}),
            r"parameters.drop must be a number in \[0, 1\), got 1.0",
        ),
        (
            _with(merge_method="dare", parameters={"rescale": "l2"}),
            r"rescale must be true or false or one of inverse, l1, none",
        ),
        (_with(merge_method="ace", parameters={"gate": "maybe"}), r"gate must be one of auto, on, off"),
        (_with(merge_method="wudi", parameters={"steps": 2.5}), r"parameters.steps must be an integer"),
        (_with(merge_method="tsv_m", parameters={"svd_dtype": "float16"}), r"svd_dtype must be a dtype name"),
        (_with(merge_method="regmean", models=["a"]), r"regmean needs parameter grams"),
        (
            _with(merge_method="ties", dialect="mergekernels", parameters={"merge": "median"}),
            r"parameters.merge must be one of mean, sum, weighted",
        ),
        (
            _with(merge_method="ties", dialect="mergekernels", parameters={"normalize": True}),
            r"unknown parameter 'normalize' for ties; "
            r"valid: density, weights, scale, merge, weighted_election, exact_k$",
        ),
        (
            _with(
                merge_method="della",
                dialect="mergekernels",
                models=["a"],
                parameters={"density": 0.9, "epsilon": 0.2},
            ),
            r"della needs density - epsilon > 0 and density \+ epsilon <= 1",
        ),
        (
            _with(
                merge_method="breadcrumbs",
                dialect="mergekernels",
                models=["a"],
                parameters={"density": 0.995},
            ),
            r"breadcrumbs needs density \+ gamma <= 1",
        ),
    ],
)
def test_invalid_configs_name_the_key_and_the_valid_values(tmp_path, data, pattern):
    """strict: what mergekit ignores (unknown keys and parameters) is refused too."""
    with pytest.raises(ValueError, match=r"^merge config: .*" + pattern):
        load_config(data, strict=True)
    path = write(tmp_path, yaml.safe_dump(data), "bad.yml")  # the same from a file: the file is named
    with pytest.raises(ValueError, match=r"^" + re.escape(str(path)) + ": .*" + pattern):
        load_config(path, strict=True)


def test_what_mergekit_ignores_is_ignored_with_one_warning():
    clean = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}],
        "parameters": {"normalize": True},
    }
    noisy = {
        **clean,
        "name": "my-merge",
        "select_topk": 0.1,
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5, "normalize": False}, "x": 1}],
        "parameters": {"normalize": True, "densty": 0.3},
    }
    with pytest.warns(ConfigWarning) as caught:
        cfg = load_config(noisy)
    assert len(caught) == 1
    message = str(caught[0].message)
    for name in ("'name'", "'select_topk'", "'normalize' (models[0]", "'densty'", "models[0].x"):
        assert name in message
    assert method_kwargs(cfg) == method_kwargs(load_config(clean))
    # an old `pattern:` instead of `filter:`: mergekit ignores the key, so the entry matches everything
    slerp = {
        "merge_method": "slerp",
        "base_model": "b",
        "models": ["a"],
        "parameters": {"t": [{"pattern": "self_attn", "value": 0.3}, {"value": 0.5}]},
    }
    with pytest.warns(ConfigWarning, match=r"parameters.t\[0\].pattern \(no filter: matches all\)"):
        cfg = load_config(slerp)
    assert cfg.tensor_params(0, "model.layers.0.mlp.up_proj.weight", ["x", "x"], 0.0).kwargs["t"] == 0.3
    # our own dialect refuses them: a typo there is ours to catch
    with pytest.raises(ValueError, match="unknown parameter 'densty' for ties"):
        load_config({**clean, "dialect": "mergekernels", "parameters": {"densty": 0.3}})


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("merge_method: ties\nmodels: [a\n", r"invalid YAML"),
        (
            "merge_method: ties\nmerge_method: linear\nbase_model: b\nmodels: [a]\n",
            r"invalid YAML.*duplicate key 'merge_method'",
        ),
        (
            "---\nmerge_method: ties\n---\nmerge_method: linear\n",
            r"holds 2 YAML documents: a multi-document \(mergekit-multi\) configuration runs with",
        ),
        ("", r"empty configuration"),
        ("- a\n- b\n", r"the top level must be a mapping"),
    ],
)
def test_yaml_problems_name_the_file(tmp_path, text, pattern):
    path = write(tmp_path, text, "broken.yml")
    with pytest.raises(ValueError, match=r"(?s)^" + re.escape(str(path)) + ": " + pattern):
        load_config(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.yml"):
        load_config("/nowhere/nowhere.yml")


# ----------------------------------------------------------------------------------------------
# mergekit's semantics, written from its documentation, in float64.
def mk_sparsify(delta, density, kind, gamma=0.0, mask=None, rescale=False):
    """mergekit's sparsification of one flattened task vector (density >= 1: unchanged)."""
    if density >= 1:
        return delta
    n = delta.numel()
    order = torch.sort(delta.abs(), descending=True, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    if kind == "magnitude":  # the int(density * n) largest magnitudes
        keep[order[: int(density * n)]] = True
    elif kind == "outliers":  # drop the int(gamma * n) largest, keep the next int(density * n)
        top = int(gamma * n)
        keep[order[top : top + int(density * n)]] = True
    elif kind == "random":  # a Bernoulli(density) mask, given
        keep = mask
    out = torch.where(keep, delta, 0.0)
    if rescale:  # match the L1 norm of the task vector
        before, after = delta.abs().sum(), out.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            out = out * (before / after)
    return out


def mk_gta(
    base,
    models,
    weights,
    *,
    densities,
    kind,
    consensus,
    normalize,
    lam=1.0,
    gammas=None,
    masks=None,
    rescale=False,
):
    """mergekit's generalized task arithmetic for one tensor: sparsified task vectors times their
    weights; with consensus, the majority sign of their sum (>= 0: +) and only the weighted deltas of
    that sign; the sum, divided by the (agreeing) weights' sum if normalize (0 -> 1); times lambda."""
    b = base.reshape(-1).float()
    deltas = []
    for t, x in enumerate(models):
        delta = (x.reshape(-1).float() - b).double()  # mergekit subtracts in the storage dtype (float32 here)
        if kind is not None:
            gamma = gammas[t] if gammas else 0.0
            mask = masks[t] if masks is not None else None
            delta = mk_sparsify(delta, densities[t], kind, gamma, mask, rescale)
        deltas.append(delta)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    weighted = deltas * w
    if consensus:
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
        agree = torch.sign(weighted) == majority
        mixed = torch.where(agree, weighted, 0.0).sum(0)
        divisor = torch.where(agree, w, 0.0).sum(0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = weighted.sum(0)
        divisor = w.sum()
        divisor = divisor if abs(divisor) >= 1e-8 else torch.tensor(1.0, dtype=torch.float64)
    if normalize:
        mixed = mixed / divisor
    return (b.double() + lam * mixed).reshape(base.shape).to(base.dtype)


def mk_linear(models, weights, normalize=True):
    """mergekit's linear: sum_m w_m theta_m, divided by sum_m w_m if normalize."""
    stacked = torch.stack([x.double() for x in models])
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * models[0].dim()))
    out = (w * stacked).sum(0)
    return (out / w.sum() if normalize else out).to(models[0].dtype)


SHAPES = {
    "model.embed_tokens.weight": (37, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 23),
    "model.layers.0.input_layernorm.weight": (16,),
    "lm_head.weight": (5, 16),
}


def _checkpoints(names=("base", "a", "b", "c")):
    """Random float32 state dicts; fine-tuned deltas of different sizes so weights matter."""
    g = torch.Generator().manual_seed(1234)
    sds = {name: {} for name in names}
    for tensor, shape in SHAPES.items():
        base = torch.randn(shape, generator=g)
        sds[names[0]][tensor] = base
        for i, name in enumerate(names[1:]):
            sds[name][tensor] = base + 0.01 * (i + 1) * torch.randn(shape, generator=g)
    for i, name in enumerate(names):
        sds[name]["model.position_ids"] = torch.arange(8) + i  # not merged: copied from the base
    return sds


def _run(cfg, sds):
    """The engine's call: mk.merge with the config's method, keyword arguments and exclusions."""
    name = os.path.basename
    base = sds[name(cfg.base_model)]
    fts = [sds[name(m.path)] for m in cfg.models]
    return mk.merge(base, fts, method=cfg.method, **method_kwargs(cfg), exclude=cfg.exclude)


def _check(merged, expected_fn, base_sd, exclude=()):
    for tensor, value in base_sd.items():
        if not value.is_floating_point() or any(fnmatch.fnmatchcase(tensor, pat) for pat in exclude):
            assert torch.equal(merged[tensor], value), tensor
        else:
            assert_close_to_ref(merged[tensor], expected_fn(tensor))


GTA_CASES = [
    # (YAML, mergekit method description: weights, densities, kind, consensus, normalize, lambda, gammas)
    (
        """
        merge_method: task_arithmetic
        base_model: base
        models:
          - base
          - model: a
            parameters: {weight: 0.6}
          - model: b
            parameters: {weight: -0.3}
          - c
        parameters: {weight: 1.0, lambda: 0.7}
        """,
        dict(
            weights=[0.6, -0.3, 1.0],
            densities=[1, 1, 1],
            kind=None,
            consensus=False,
            normalize=False,
            lam=0.7,
        ),
    ),
    (
        """
        merge_method: task_arithmetic
        base_model: base
        models:
          - {model: a, parameters: {weight: 2.0, density: 0.3}}   # density: no effect in task arithmetic
          - {model: b, parameters: {weight: 1.0}}
        parameters: {normalize: true, int8_mask: true, rescale: true}
        exclude: ["lm_head.*"]
        """,
        dict(weights=[2.0, 1.0], densities=[1, 1], kind=None, consensus=False, normalize=True),
    ),
    (
        """
        merge_method: ties
        base_model: base
        models:
          - model: base
          - model: a
            parameters: {density: 0.5, weight: 1.0}
          - model: b
            parameters: {density: 0.3, weight: 0.5}
          - model: c
            parameters: {density: 0.7, weight: 0.8}
        parameters: {normalize: true, int8_mask: true}
        dtype: float32
        """,
        dict(
            weights=[1.0, 0.5, 0.8],
            densities=[0.5, 0.3, 0.7],
            kind="magnitude",
            consensus=True,
            normalize=True,
        ),
    ),
    (
        """
        merge_method: ties
        base_model: base
        models: [a, b, {model: c, parameters: {weight: 2.0}}]
        parameters: {density: 0.4, normalize: false, lambda: 1.3, weight: 0.5}
        """,
        dict(
            weights=[0.5, 0.5, 2.0],
            densities=[0.4] * 3,
            kind="magnitude",
            consensus=True,
            normalize=False,
            lam=1.3,
        ),
    ),
    (
        """
        merge_method: ties
        base_model: base
        models:
          - {model: a, parameters: {weight: 0.3}}
          - {model: b, parameters: {weight: 0.9}}
        """,
        dict(weights=[0.3, 0.9], densities=[1, 1], kind="magnitude", consensus=True, normalize=True),
    ),
    (
        """
        merge_method: dare_ties
        base_model: base
        models:
          - {model: a, parameters: {weight: 0.5, density: 1.0}}
          - {model: b, parameters: {weight: 0.3}}
          - {model: c, parameters: {weight: 0.7}}
        parameters: {density: 1.0, int8_mask: true}
        """,
        dict(weights=[0.5, 0.3, 0.7], densities=[1, 1, 1], kind="random", consensus=True, normalize=False),
    ),
    (
        """
        merge_method: dare_ties
        base_model: base
        models:
          - {model: a, parameters: {weight: 0.5}}
          - {model: b, parameters: {weight: 0.3}}
        parameters: {normalize: true, lambda: 0.9}
        """,
        dict(weights=[0.5, 0.3], densities=[1, 1], kind="random", consensus=True, normalize=True, lam=0.9),
    ),
    (
        """
        merge_method: dare_linear
        base_model: base
        models:
          - {model: a, parameters: {weight: 0.5}}
          - {model: b, parameters: {weight: 0.25}}
          - {model: c, parameters: {weight: 1.0}}
        parameters: {normalize: true}
        """,
        dict(weights=[0.5, 0.25, 1.0], densities=[1, 1, 1], kind="random", consensus=False, normalize=True),
    ),
    (
        """
        merge_method: breadcrumbs
        base_model: base
        models:
          - {model: a, parameters: {weight: 1.0, density: 0.8, gamma: 0.1}}
          - {model: b, parameters: {weight: 0.5, density: 0.6}}
          - {model: c, parameters: {weight: 0.7}}
        parameters: {gamma: 0.15}
        """,
        dict(
            weights=[1.0, 0.5, 0.7],
            densities=[0.8, 0.6, 1.0],
            gammas=[0.1, 0.15, 0.15],
            kind="outliers",
            consensus=False,
            normalize=False,
        ),
    ),
    (
        """
        merge_method: breadcrumbs_ties
        base_model: base
        models:
          - {model: a, parameters: {weight: 1.0}}
          - {model: b, parameters: {weight: 0.5}}
          - {model: c, parameters: {weight: 0.7, density: 0.5}}
        parameters: {density: 0.7, gamma: 0.1, normalize: true, lambda: 0.8}
        """,
        dict(
            weights=[1.0, 0.5, 0.7],
            densities=[0.7, 0.7, 0.5],
            gammas=[0.1] * 3,
            kind="outliers",
            consensus=True,
            normalize=True,
            lam=0.8,
        ),
    ),
    (
        """
        merge_method: della
        base_model: base
        models:
          - {model: a, parameters: {weight: 1.0, density: 1.0, epsilon: 0.1}}
          - {model: b, parameters: {weight: 0.4}}
          - {model: c, parameters: {weight: 0.6}}
        parameters: {lambda: 0.9}
        """,
        dict(
            weights=[1.0, 0.4, 0.6], densities=[1, 1, 1], kind=None, consensus=True, normalize=True, lam=0.9
        ),
    ),
    (
        """
        merge_method: della_linear
        base_model: base
        models:
          - {model: a, parameters: {weight: 0.5}}
          - {model: b, parameters: {weight: 0.8}}
        parameters: {density: 1.0, epsilon: 0.05, lambda: 1.2}
        """,
        dict(weights=[0.5, 0.8], densities=[1, 1], kind=None, consensus=False, normalize=False, lam=1.2),
    ),
]


@pytest.mark.parametrize(
    "text, semantics",
    GTA_CASES,
    ids=lambda x: x.split("merge_method: ")[1].split()[0] if isinstance(x, str) else "",
)
def test_task_vector_merges_reproduce_mergekit(tmp_path, text, semantics):
    cfg = load(tmp_path, text)
    sds = _checkpoints()
    merged = _run(cfg, sds)
    names = [os.path.basename(m.path) for m in cfg.models]
    assert names == [n for n in "abc"][: len(names)]

    def expected(tensor):
        return mk_gta(sds["base"][tensor], [sds[n][tensor] for n in names], **semantics)

    _check(merged, expected, sds["base"], cfg.exclude)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("rescale", [None, False])
def test_dare_with_drops_matches_mergekit_given_the_same_masks(tmp_path, method, rescale):
    """With density < 1 the masks are random; given ours (our Philox stream, tests/reference.py),
    the rest -- mergekit's L1 rescale, weighted election, sum -- must be mergekit's."""
    extra = "" if rescale is None else f"rescale: {str(rescale).lower()}"
    cfg = load(
        tmp_path,
        f"""
        merge_method: {method}
        base_model: base
        models:
          - {{model: a, parameters: {{weight: 0.5, density: 0.6}}}}
          - {{model: b, parameters: {{weight: 0.3, density: 0.3}}}}
          - {{model: c, parameters: {{weight: 0.7}}}}
        parameters: {{density: 0.8, lambda: 1.1, {extra}}}
        options: {{seed: 17}}
        """,
    )
    sds = _checkpoints()
    merged = _run(cfg, sds)
    densities = [0.6, 0.3, 0.8]

    def expected(tensor):
        n = sds["base"][tensor].numel()
        masks = ref.dare_masks(n, 3, [1.0 - d for d in densities], 17, tensor)
        assert 0.05 < masks.float().mean() < 0.95  # the draw really drops entries
        return mk_gta(
            sds["base"][tensor],
            [sds[x][tensor] for x in "abc"],
            [0.5, 0.3, 0.7],
            densities=densities,
            kind="random",
            consensus=method == "dare_ties",
            normalize=False,
            lam=1.1,
            masks=masks,
            rescale=rescale is None,  # mergekit's default: rescale
        )

    _check(merged, expected, sds["base"])


LINEAR_CASES = [
    # (YAML, models averaged in order, their weights, normalize)
    (
        """
        merge_method: linear
        models:
          - {model: a, parameters: {weight: 1.0}}
          - {model: b, parameters: {weight: 0.5}}
          - {model: c, parameters: {weight: 0.25}}
        dtype: float32
        """,
        ["a", "b", "c"],
        [1.0, 0.5, 0.25],
        True,
    ),
    (
        """
        merge_method: linear
        base_model: base
        models:
          - {model: base, parameters: {weight: 0.2}}
          - {model: a, parameters: {weight: 0.6}}
          - {model: b, parameters: {weight: 0.5}}
        """,
        ["base", "a", "b"],
        [0.2, 0.6, 0.5],
        True,
    ),
    (
        """
        merge_method: linear
        base_model: base
        models:
          - {model: a, parameters: {weight: 2.0}}
          - {model: c, parameters: {weight: 1.0}}
        parameters: {weight: 0.5}   # the base's weight: mergekit adds an unlisted base
        """,
        ["a", "c", "base"],
        [2.0, 1.0, 0.5],
        True,
    ),
    (
        """
        merge_method: linear
        base_model: base
        models:
          - {model: a, parameters: {weight: 0.25}}
          - {model: b, parameters: {weight: 0.25}}
        parameters: {weight: 0.5, normalize: false}
        """,
        ["a", "b", "base"],
        [0.25, 0.25, 0.5],
        False,
    ),
    (
        """
        merge_method: linear
        models:
          - {model: a, parameters: {weight: 0.3}}
          - {model: b, parameters: {weight: 0.7}}
        parameters: {normalize: false}
        exclude: ["model.embed_tokens.*"]
        """,
        ["a", "b"],
        [0.3, 0.7],
        False,
    ),
]


@pytest.mark.parametrize("text, averaged, weights, normalize", LINEAR_CASES)
def test_linear_reproduces_mergekit(tmp_path, text, averaged, weights, normalize):
    cfg = load(tmp_path, text)
    sds = _checkpoints()
    merged = _run(cfg, sds)
    base_sd = sds[os.path.basename(cfg.base_model)]

    def expected(tensor):
        return mk_linear([sds[n][tensor] for n in averaged], weights, normalize)

    _check(merged, expected, base_sd, cfg.exclude)


def test_reference_can_fail(tmp_path):
    """The comparison is sharp: mergekit's ties (weighted election, weighted mean, no trim by
    default) is not what our dialect's ties defaults compute."""
    text = textwrap.dedent(
        """
        merge_method: ties
        base_model: base
        models:
          - {model: a, parameters: {WEIGHT: 1.0, density: 0.5}}
          - {model: b, parameters: {WEIGHT: 0.2, density: 0.5}}
        """
    )
    sds = _checkpoints()
    ours = _run(load(tmp_path, text.replace("WEIGHT", "weights") + "dialect: mergekernels\n"), sds)
    tensor = "model.layers.0.mlp.down_proj.weight"
    expected = mk_gta(
        sds["base"][tensor],
        [sds["a"][tensor], sds["b"][tensor]],
        [1.0, 0.2],
        densities=[0.5, 0.5],
        kind="magnitude",
        consensus=True,
        normalize=True,
    )
    with pytest.raises(AssertionError):
        assert_close_to_ref(ours[tensor], expected)
    assert_close_to_ref(_run(load(tmp_path, text.replace("WEIGHT", "weight")), sds)[tensor], expected)


def test_awd_accepts_the_parameters_of_its_then_method():
    cfg = load_config(
        {
            "merge_method": "awd",
            "dialect": "mergekernels",
            "base_model": "/m/base",
            "models": [{"model": "/m/a", "parameters": {"density": 0.5}}, {"model": "/m/b"}],
            "parameters": {"then": "ties", "density": 0.3, "granularity": "per_row", "then_scale": 0.5},
        }
    )
    assert cfg.params == {"then": "ties", "density": 0.3, "granularity": "per_row", "then_scale": 0.5}
    assert cfg.models[0].params == {"density": 0.5}
    with pytest.raises(ValueError, match="unknown parameter 'drop' for awd; valid: .*density"):
        load_config(
            {
                "merge_method": "awd",
                "dialect": "mergekernels",
                "base_model": "/m/base",
                "models": [{"model": "/m/a"}],
                "parameters": {"then": "ties", "drop": 0.3},
            }
        )
    with pytest.raises(ValueError, match="parameters.then must name a method"):
        load_config(
            {
                "merge_method": "awd",
                "dialect": "mergekernels",
                "base_model": "/m/base",
                "models": [{"model": "/m/a"}],
                "parameters": {"then": "nope"},
            }
        )


def test_engine_plumbing_is_not_a_parameter():
    """The fused methods' per-call ``out`` and ``nonfinite`` (the engine's shard buffer and NaN flags)
    are neither configuration parameters nor ``mk.merge`` keywords."""
    import mergekernels as mk

    for key in ("out", "nonfinite"):
        with pytest.raises(ValueError, match=rf"unknown parameter '{key}' for ties"):
            cfg = {"merge_method": "ties", "dialect": "mergekernels", "base_model": "b", "models": ["m"]}
            load_config({**cfg, "parameters": {key: 1}})
        with pytest.raises(ValueError, match=rf"does not take {key}"):
            mk.merge({"w": torch.zeros(3)}, [{"w": torch.ones(3)}], method="ties", **{key: None})
