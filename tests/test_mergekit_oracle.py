"""``mergekernels merge`` against mergekit 0.1.5 itself, on tiny Llama / Mistral / Qwen2 checkpoints.

Each case is one YAML config that both tools run unchanged; the outputs must hold the same tensors
(float32 outputs within float32 rounding, bf16 outputs within 1 ulp) and the same num_hidden_layers.
mergekit runs from its own cached environment (``make mergekit-venv``, see tests/mergekit_oracle.py);
without it the module skips. All of a session's mergekit merges run in ONE mergekit process, before
the first case (importing mergekit is ~6 s of the ~7 s one tiny merge takes); a merge mergekit itself
rejects fails its case with mergekit's traceback.

Left out by design: the random methods (dare_*, della*: another generator), and ties / breadcrumbs
with density < 1 (mergekit's argsort keeps exactly k entries, ours every entry tied with the k-th).

mergekit 0.1.5's parameter semantics that the cases pin down:
- a gradient list is interpolated at t = i / (n - 1) for the i-th layer of an n-layer slice (t runs
  over each slice on its own, not over the output's layers; the models form is one slice of all the
  layers), and at t = 1 (its LAST value) for the one layer of a one-layer slice;
- the non-layer tensors (embed_tokens before the layers; norm and lm_head after them) are merged
  with the parameters of the FIRST slice (embeddings) or the LAST slice (norm, lm_head) at t = 0 (the
  FIRST value of every gradient), from that slice's sources; with passthrough, the embeddings come
  from the first slice's model and norm / lm_head from the last slice's;
- a parameter is looked up in the slice source's ``parameters``, then the slice's, then the top-level
  ``parameters``; a filtered list takes the first entry whose ``filter`` is a substring of the tensor
  name (no filter, or ``*``, matches all); a scope without a match falls through to the next scope;
- in the ``slices`` form the base model must be one of each slice's sources (mergekit adds it only in
  the ``models`` form); ``linear`` ignores ``base_model`` but a base not listed in ``models`` is added
  as an input without a weight, which mergekit refuses: the linear cases list every model.

(e) runs mergekit's own examples/ configs (rewritten onto the tiny models, see oracle.adapt_example) when
they can be found: mergekit 0.1.5's sdist and wheel do not ship them, so by default that case skips;
MK_ORACLE_EXAMPLES=<a mergekit checkout>/examples runs them. They are never copied into this repository.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from . import mergekit_oracle as oracle

if oracle.oracle_python() is None:
    pytest.skip(oracle.skip_reason(), allow_module_level=True)

# The model sets: per name, the architecture and the write_model arguments. Each set is a base and
# three fine-tuned models a, b, c (base + 0.01 N(0, 1), another seed each). Sizes differ per set so
# that shape handling is exercised; qwen2 has q/k/v biases and tied embeddings (no lm_head).
SETS = {
    "llama": dict(arch="llama", layers=8, hidden=32, intermediate=88, vocab=97, heads=4, kv_heads=2),
    "mistral": dict(arch="mistral", layers=6, hidden=48, intermediate=100, vocab=101, heads=6, kv_heads=2),
    "qwen2": dict(
        arch="qwen2", layers=7, hidden=32, intermediate=72, vocab=97, heads=4, kv_heads=4, tie_embeddings=True
    ),
    "llama-bf16": dict(
        arch="llama",
        layers=6,
        hidden=32,
        intermediate=88,
        vocab=97,
        heads=4,
        kv_heads=2,
        dtype=torch.bfloat16,
    ),
}
MODELS = ("base", "a", "b", "c")


class Case:
    """One config: its model set, a builder (model name -> absolute path => the config mapping), and
    the dtype mergekit's output must have."""

    def __init__(self, name: str, models: str, build: Callable[[dict], dict], out_dtype=torch.float32):
        self.name, self.models, self.build, self.out_dtype = name, models, build, out_dtype


CASES: dict[str, Case] = {}
GROUPS: dict[str, list[str]] = {
    "models": [],
    "gradients": [],
    "slices": [],
    "bf16": [],
    "lora": [],
    "methods": [],
    "random": [],
}


def case(group: str, name: str, models: str, out_dtype=torch.float32):
    def register(build):
        CASES[name] = Case(name, models, build, out_dtype)
        GROUPS[group].append(name)
        return build

    return register


def src(m: dict, name: str, lo: int, hi: int, **params) -> dict:
    out = {"model": m[name], "layer_range": [lo, hi]}
    if params:
        out["parameters"] = params
    return out


# --- (a) the models form -----------------------------------------------------------------------------

for _set in ("llama", "mistral", "qwen2"):

    @case("models", f"linear-{_set}", _set)
    def _linear(m):
        # no base_model: a weighted average of all four (the first serves as our base)
        weights = {"base": 0.4, "a": 1.0, "b": 0.3, "c": 0.5}
        return {
            "merge_method": "linear",
            "models": [{"model": m[n], "parameters": {"weight": w}} for n, w in weights.items()],
            "parameters": {"normalize": True},
        }

    @case("models", f"task_arithmetic-{_set}", _set)
    def _task_arithmetic(m):
        weights = {"a": 0.5, "b": 0.3, "c": -0.2}
        return {
            "merge_method": "task_arithmetic",
            "base_model": m["base"],
            "models": [{"model": m[n], "parameters": {"weight": w}} for n, w in weights.items()],
            "parameters": {"lambda": 0.9},
            "dtype": "float32",
        }

    @case("models", f"ties-density1-{_set}", _set)
    def _ties(m):
        # density 1: no trimming, only the weighted sign election and the weighted mean of the agreeing
        weights = {"a": 1.0, "b": 0.6, "c": 0.8}
        return {
            "merge_method": "ties",
            "base_model": m["base"],
            "models": [
                {"model": m[n], "parameters": {"weight": w, "density": 1.0}} for n, w in weights.items()
            ],
            "parameters": {"normalize": True},
        }


@case("models", "linear-base-listed-llama", "llama")
def _linear_base_listed(m):
    weights = {"base": 0.25, "a": 0.5, "b": 0.25, "c": 0.5}
    return {
        "merge_method": "linear",
        "base_model": m["base"],
        "models": [{"model": m[n], "parameters": {"weight": w}} for n, w in weights.items()],
        "dtype": "float32",
    }


@case("models", "task_arithmetic-normalize-mistral", "mistral")
def _task_arithmetic_normalize(m):
    weights = {"a": 0.7, "b": 0.2, "c": 0.4}
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [{"model": m[n], "parameters": {"weight": w}} for n, w in weights.items()],
        "parameters": {"normalize": True, "lambda": 1.1},
    }


# --- (b) per-layer gradients and filtered values (models form) ---------------------------------------


@case("gradients", "gradient-weight-task_arithmetic-llama", "llama")
def _gradient_weight(m):
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [
            {"model": m["a"], "parameters": {"weight": [0, 0.3, 1.0]}},
            {"model": m["b"], "parameters": {"weight": [1.0, 0.5]}},
            {"model": m["c"], "parameters": {"weight": 0.7}},
        ],
        "dtype": "float32",
    }


@case("gradients", "filtered-weight-task_arithmetic-qwen2", "qwen2")
def _filtered_weight(m):
    # c has no weight of its own: the top-level filtered list applies to it
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [
            {
                "model": m["a"],
                "parameters": {
                    "weight": [
                        {"filter": "self_attn", "value": [0.2, 0.9]},
                        {"filter": "mlp", "value": 0.4},
                        {"value": 0.5},
                    ]
                },
            },
            {
                "model": m["b"],
                "parameters": {"weight": [{"filter": "mlp", "value": [1.0, 0.0, 1.0]}, {"value": 0.3}]},
            },
            {"model": m["c"]},
        ],
        "parameters": {"weight": [{"filter": "down_proj", "value": 0.1}, {"value": [0.6, 0.2]}]},
    }


@case("gradients", "gradient-lambda-task_arithmetic-mistral", "mistral")
def _gradient_lambda(m):
    weights = {"a": 0.5, "b": 0.3, "c": 0.8}
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [{"model": m[n], "parameters": {"weight": w}} for n, w in weights.items()],
        "parameters": {"lambda": [0.5, 1.0, 1.5]},
    }


@case("gradients", "gradient-weight-linear-llama", "llama")
def _gradient_linear(m):
    return {
        "merge_method": "linear",
        "models": [
            {"model": m["base"], "parameters": {"weight": [1.0, 0.0]}},
            {"model": m["a"], "parameters": {"weight": [0.0, 1.0]}},
            {
                "model": m["b"],
                "parameters": {"weight": [{"filter": "self_attn", "value": 0.5}, {"value": 0.1}]},
            },
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }


@case("gradients", "gradient-weight-ties-density1-mistral", "mistral")
def _gradient_ties(m):
    return {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [
            {"model": m["a"], "parameters": {"weight": [0.2, 1.0], "density": 1.0}},
            {"model": m["b"], "parameters": {"weight": [1.0, 0.4, 0.8], "density": 1.0}},
            {"model": m["c"], "parameters": {"weight": 0.6, "density": 1.0}},
        ],
    }


# --- (c) slices ----------------------------------------------------------------------------------------


@case("slices", "slices-layerwise-task_arithmetic-llama", "llama")
def _slices_layerwise(m):
    # gradients in the sources' parameters; the slice's weight is c's (it has none), its lambda a gradient
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "slices": [
            {
                "sources": [
                    src(m, "base", 0, 8),
                    src(m, "a", 0, 8, weight=[0, 0.5, 1.0]),
                    src(m, "b", 0, 8, weight=[{"filter": "mlp", "value": 0.8}, {"value": [1.0, 0.2]}]),
                    src(m, "c", 0, 8),
                ],
                "parameters": {"weight": 0.3, "lambda": [0.8, 1.2]},
            }
        ],
        "dtype": "float32",
    }


@case("slices", "slices-layerwise-linear-mistral", "mistral")
def _slices_linear(m):
    return {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    src(m, "base", 0, 6, weight=[1.0, 0.0]),
                    src(m, "a", 0, 6, weight=[0.0, 1.0]),
                    src(m, "b", 0, 6),
                ],
                "parameters": {"weight": 0.5},
            }
        ],
        "parameters": {"normalize": True},
    }


@case("slices", "slices-two-ranges-task_arithmetic-llama", "llama")
def _slices_two_ranges(m):
    # layers 0-2 merge a and b, layers 3-7 b and c with other parameters; the embeddings follow the
    # first slice, the final norm and lm_head the last (each at t = 0)
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "slices": [
            {
                "sources": [
                    src(m, "base", 0, 3),
                    src(m, "a", 0, 3, weight=0.9),
                    src(m, "b", 0, 3, weight=[0.1, 0.5]),
                ]
            },
            {
                "sources": [
                    src(m, "base", 3, 8),
                    src(m, "b", 3, 8, weight=0.7),
                    src(m, "c", 3, 8, weight=[1.0, 0.0]),
                ],
                "parameters": {"lambda": 0.5},
            },
        ],
        "parameters": {"lambda": [1.0, 2.0]},
    }


@case("slices", "slices-offset-sources-task_arithmetic-qwen2", "qwen2")
def _slices_offset(m):
    # the sources of one slice read different layers of their models (same count)
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "slices": [
            {
                "sources": [
                    src(m, "base", 0, 4),
                    src(m, "a", 3, 7, weight=0.6),
                    src(m, "b", 1, 5, weight=[0.2, 1.0]),
                ]
            },
            {"sources": [src(m, "base", 4, 7), src(m, "c", 4, 7, weight=1.0)]},
        ],
    }


@case("slices", "passthrough-stack-llama", "llama")
def _passthrough_stack(m):
    # a frankenmerge: base layers 0-4 then a's layers 3-7: 10 layers
    return {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(m, "base", 0, 5)]}, {"sources": [src(m, "a", 3, 8)]}],
        "dtype": "float32",
    }


@case("slices", "passthrough-repeat-mistral", "mistral")
def _passthrough_repeat(m):
    # base layers 0-3 then 2-5: layers 2 and 3 twice (8 layers)
    return {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(m, "base", 0, 4)]}, {"sources": [src(m, "base", 2, 6)]}],
    }


@case("slices", "single-layer-slices-task_arithmetic-llama", "llama")
def _single_layer(m):
    # one-layer slices first and last: their layer takes each gradient's LAST value (t = 1), while
    # the embeddings (first slice) and norm / lm_head (last slice) take the FIRST (t = 0)
    def slice_(lo, hi, **params):
        return {
            "sources": [src(m, "base", lo, hi), src(m, "a", lo, hi, **params), src(m, "b", lo, hi)],
        }

    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "slices": [
            slice_(0, 1, weight=[0.0, 1.0]),
            slice_(1, 7),
            {**slice_(7, 8), "parameters": {"weight": [0.2, 0.6, 0.7], "lambda": [1.5, 0.5]}},
        ],
        "parameters": {"weight": [0.1, 0.9]},
    }


# --- (d) bf16 storage ------------------------------------------------------------------------------


@case("bf16", "bf16-task_arithmetic-llama", "llama-bf16", out_dtype=torch.bfloat16)
def _bf16(m):
    weights = {"a": 0.5, "b": 0.3, "c": 0.8}
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [{"model": m[n], "parameters": {"weight": w}} for n, w in weights.items()],
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


# --- (f) model+lora ----------------------------------------------------------------------------------
# mergekit merges the adapter into a copy with PEFT (merge_and_unload) before merging; ours adds
# s * B @ A as each tensor is read. Adapters: "lora-a" (alpha 8, r 4, on a) and "lora-rs" (rsLoRA,
# alpha_pattern for v_proj, on b), both on the llama set (see the zoo fixture).


@case("lora", "lora-task_arithmetic-llama", "llama")
def _lora_task_arithmetic(m):
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [
            {"model": f"{m['a']}+{m['lora-a']}", "parameters": {"weight": 0.7}},
            {"model": f"{m['b']}+{m['lora-rs']}", "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
    }


@case("lora", "lora-passthrough-llama", "llama")
def _lora_passthrough(m):
    return {"merge_method": "passthrough", "models": [{"model": f"{m['base']}+{m['lora-a']}"}]}


# --- (g) the other mergekit methods ----------------------------------------------------------------


@case("methods", "slerp-gradient-llama", "llama")
def _slerp_gradient(m):
    # mergekit's gradient-slerp example, on the tiny model: t per filter, as gradients
    return {
        "merge_method": "slerp",
        "base_model": m["base"],
        "slices": [{"sources": [src(m, "base", 0, 8), src(m, "a", 0, 8)]}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "dtype": "float32",
    }


@case("methods", "slerp-models-qwen2", "qwen2")
def _slerp_models(m):
    # the models form: base + one other; t beyond [0, 1] extrapolates
    return {
        "merge_method": "slerp",
        "base_model": m["a"],
        "models": [{"model": m["a"]}, {"model": m["b"]}],
        "parameters": {"t": [0.2, 1.3]},
    }


@case("methods", "slerp-bf16-llama", "llama-bf16", out_dtype=torch.bfloat16)
def _slerp_bf16(m):
    return {
        "merge_method": "slerp",
        "base_model": m["base"],
        "models": [{"model": m["c"]}],
        "parameters": {"t": 0.4},
    }


@case("methods", "model_stock-llama", "llama")
def _model_stock(m):
    return {
        "merge_method": "model_stock",
        "base_model": m["base"],
        "models": [{"model": m[n]} for n in ("a", "b", "c")],
        "dtype": "float32",
    }


@case("methods", "model_stock-filter_wise-mistral", "mistral")
def _model_stock_rows(m):
    return {
        "merge_method": "model_stock",
        "base_model": m["base"],
        "models": [{"model": m["a"]}, {"model": m["b"]}],
        "parameters": {"filter_wise": True},
        "dtype": "float32",
    }


@case("methods", "nearswap-qwen2", "qwen2")
def _nearswap(m):
    # t near the typical |a - b| (0.01 N(0, 1) perturbations), as a gradient: both branches occur
    return {
        "merge_method": "nearswap",
        "base_model": m["base"],
        "models": [{"model": m["b"]}],
        "parameters": {"t": [0.002, 0.02]},
        "dtype": "float32",
    }


@case("methods", "nuslerp-base-llama", "llama")
def _nuslerp_base(m):
    return {
        "merge_method": "nuslerp",
        "base_model": m["base"],
        "models": [
            {"model": m["a"], "parameters": {"weight": 0.3}},
            {"model": m["b"], "parameters": {"weight": 0.9}},
        ],
        "dtype": "float32",
    }


@case("methods", "nuslerp-rows-nobase-mistral", "mistral")
def _nuslerp_rows(m):
    return {
        "merge_method": "nuslerp",
        "models": [
            {"model": m["a"], "parameters": {"weight": 1.0}},
            {"model": m["c"], "parameters": {"weight": 2.0}},
        ],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        "dtype": "float32",
    }


@case("methods", "nuslerp-columns-base-qwen2", "qwen2")
def _nuslerp_columns(m):
    return {
        "merge_method": "nuslerp",
        "base_model": m["base"],
        "models": [
            {"model": m["b"], "parameters": {"weight": 0.5}},
            {"model": m["c"], "parameters": {"weight": 0.5}},
        ],
        "parameters": {"nuslerp_flatten": False},
        "dtype": "float32",
    }


@case("methods", "multislerp-base-llama", "llama")
def _multislerp_base(m):
    return {
        "merge_method": "multislerp",
        "base_model": m["base"],
        "models": [
            {"model": m[n], "parameters": {"weight": w}} for n, w in (("a", 1.0), ("b", 0.5), ("c", 2.0))
        ],
        "dtype": "float32",
    }


@case("methods", "multislerp-nobase-qwen2", "qwen2")
def _multislerp_nobase(m):
    return {
        "merge_method": "multislerp",
        "models": [{"model": m[n], "parameters": {"weight": w}} for n, w in (("a", 1.0), ("b", 3.0))],
        "parameters": {"normalize_weights": False},
        "dtype": "float32",
    }


@case("methods", "karcher-llama", "llama")
def _karcher(m):
    # the base is appended to the models (mergekit's models form): four points
    return {
        "merge_method": "karcher",
        "base_model": m["base"],
        "models": [{"model": m[n]} for n in ("a", "b", "c")],
        "parameters": {"max_iter": 20, "tol": 1e-6},
        "dtype": "float32",
    }


@case("methods", "ties-trimmed-bf16-llama", "llama-bf16", out_dtype=torch.bfloat16)
def _ties_trimmed(m):
    # bf16 storage: the norms' task vectors take few distinct values, so many entries tie with the
    # trim threshold; mergekit (its sort made stable) and ours keep exactly k, the same ones
    return {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [
            {"model": m[n], "parameters": {"weight": w, "density": d}}
            for n, w, d in (("a", 1.0, 0.3), ("b", 0.6, 0.5), ("c", 1.2, 0.1))
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


@case("methods", "breadcrumbs_ties-bf16-llama", "llama-bf16", out_dtype=torch.bfloat16)
def _breadcrumbs_trimmed(m):
    return {
        "merge_method": "breadcrumbs_ties",
        "base_model": m["base"],
        "models": [
            {"model": m[n], "parameters": {"weight": 1.0, "density": 0.4, "gamma": 0.05}} for n in ("a", "b")
        ],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


@case("methods", "breadcrumbs-float32-mistral", "mistral")
def _breadcrumbs_float(m):
    return {
        "merge_method": "breadcrumbs",
        "base_model": m["base"],
        "models": [
            {"model": m[n], "parameters": {"weight": 0.7, "density": 0.5, "gamma": 0.1}} for n in ("a", "c")
        ],
        "dtype": "float32",
    }


# --- (h) the random methods: equal in distribution ---------------------------------------------------
# DARE and DELLA draw their masks from our counter-based generator, mergekit from torch.bernoulli:
# other entries, the same distribution. One fine-tuned model, so the update is its masked, rescaled
# task vector: the kept fraction and the update's L1 norm must agree (see test_random_methods).


@case("random", "dare_linear-llama", "llama")
def _dare_linear(m):
    return {
        "merge_method": "dare_linear",
        "base_model": m["base"],
        "models": [{"model": m["a"], "parameters": {"weight": 1.0, "density": 0.3}}],
        "dtype": "float32",
    }


@case("random", "dare_ties-mistral", "mistral")
def _dare_ties(m):
    return {
        "merge_method": "dare_ties",
        "base_model": m["base"],
        "models": [{"model": m["b"], "parameters": {"weight": 1.0, "density": 0.6}}],
        "dtype": "float32",
    }


@case("random", "della_linear-qwen2", "qwen2")
def _della_linear(m):
    return {
        "merge_method": "della_linear",
        "base_model": m["base"],
        "models": [{"model": m["c"], "parameters": {"weight": 1.0, "density": 0.4, "epsilon": 0.1}}],
        "dtype": "float32",
    }


def _listed(m: dict, *names: str) -> list[dict]:
    """`models` entries (mergekit takes only mappings there, not plain paths)."""
    return [{"model": m[n]} for n in names]


@case("methods", "sce-llama", "llama")
def _sce(m):
    return {
        "merge_method": "sce",
        "base_model": m["base"],
        "models": [{"model": m[n]} for n in ("a", "b", "c")],
        "parameters": {"select_topk": 0.3},
        "dtype": "float32",
    }


@case("methods", "sce-all-mistral", "mistral")
def _sce_all(m):
    return {
        "merge_method": "sce",
        "base_model": m["base"],
        "models": _listed(m, "a", "c"),
        "dtype": "float32",
    }


@case("methods", "arcee_fusion-qwen2", "qwen2")
def _arcee_fusion(m):
    return {
        "merge_method": "arcee_fusion",
        "base_model": m["base"],
        "models": _listed(m, "b"),
        "dtype": "float32",
    }


@case("methods", "ram-llama", "llama")
def _ram(m):
    # epsilon near the perturbations' scale, so that entries are active for some models only
    return {
        "merge_method": "ram",
        "base_model": m["base"],
        "models": _listed(m, "a", "b", "c"),
        "parameters": {"epsilon": 0.008},
        "dtype": "float32",
    }


@case("methods", "ramplus_tl-mistral", "mistral")
def _ramplus(m):
    return {
        "merge_method": "ramplus_tl",
        "base_model": m["base"],
        "models": _listed(m, "a", "b", "c"),
        "parameters": {"epsilon": 0.01, "r": 0.5, "alpha": 0.9},
        "dtype": "float32",
    }


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, dict[str, str]]:
    """The model sets on disk: set name -> model name -> absolute path."""
    root = tmp_path_factory.mktemp("mergekit-oracle-models")
    paths = {}
    for set_name, spec in SETS.items():
        spec = dict(spec)
        arch = spec.pop("arch")
        base = oracle.write_model(root / set_name / "base", arch, seed=0, **spec)
        for i, name in enumerate(MODELS[1:], start=1):
            oracle.write_model(root / set_name / name, arch, seed=i, perturb_from=base, **spec)
        paths[set_name] = {name: str(root / set_name / name) for name in MODELS}
        if set_name == "llama":
            oracle.write_lora(root / set_name / "lora-a", base, seed=11)
            oracle.write_lora(
                root / set_name / "lora-rs", base, seed=12, rank=3, rslora=True, alpha_pattern={"v_proj": 2.0}
            )
            paths[set_name].update({n: str(root / set_name / n) for n in ("lora-a", "lora-rs")})
    return paths


EXAMPLE_SET = "llama"  # the examples run on the 8-layer llama set (see oracle.adapt_example)
EXAMPLES, EXAMPLES_FROM = oracle.example_configs()


def _example_params() -> list:
    if not EXAMPLES:
        return [pytest.param(None, id="no-examples", marks=pytest.mark.skip(reason=EXAMPLES_FROM))]
    params = []
    dummy = {name: f"/models/{name}" for name in MODELS}
    for file_name in sorted(EXAMPLES):
        try:
            oracle.adapt_example(EXAMPLES[file_name], dummy, SETS[EXAMPLE_SET]["layers"])
            marks = ()
        except oracle.UnsupportedExample as exc:
            marks = pytest.mark.skip(reason=f"mergekit example {file_name} left out: {exc}")
        except Exception as exc:  # a file that is not a config at all
            marks = pytest.mark.skip(reason=f"mergekit example {file_name} unreadable: {exc!r}")
        params.append(pytest.param(file_name, id=file_name, marks=marks))
    return params


def _example_out_dtype(config: dict) -> torch.dtype:
    name = config.get("out_dtype") or config.get("dtype") or "float32"  # the tiny models are float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _selected(request, argname: str, known) -> list[str]:
    """The values of ``argname`` among this module's tests that this session runs (not skipped)."""
    chosen = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get(argname) in known:
            if not item.get_closest_marker("skip"):
                chosen.add(callspec.params[argname])
    return sorted(chosen)


@pytest.fixture(scope="module")
def mergekit_runs(zoo, tmp_path_factory, request) -> dict[str, tuple[Path, Path, str | None, torch.dtype]]:
    """Every selected case's and example's YAML, written and merged by mergekit in one mergekit
    process: name -> (config file, mergekit's output directory, None or why mergekit failed, the
    output dtype)."""
    root = tmp_path_factory.mktemp("mergekit-oracle-cases")
    configs = {}
    for name in _selected(request, "name", CASES):
        configs[name] = (CASES[name].build(zoo[CASES[name].models]), CASES[name].out_dtype)
    layers = SETS[EXAMPLE_SET]["layers"]
    for file_name in _selected(request, "example", EXAMPLES):
        config = oracle.adapt_example(EXAMPLES[file_name], zoo[EXAMPLE_SET], layers)
        configs[f"example-{Path(file_name).stem}"] = (config, _example_out_dtype(config))
    jobs = [
        (oracle.write_config(cfg, root / f"{name}.yml"), root / name / "mergekit")
        for name, (cfg, _) in configs.items()
    ]
    start = time.perf_counter()
    results = oracle.run_mergekit_many(jobs)
    print(f"mergekit: {len(jobs)} merges in {time.perf_counter() - start:.1f}s")
    return {
        name: (cfg, out, err, dtype)
        for (name, (_, dtype)), (cfg, out), err in zip(configs.items(), jobs, results, strict=True)
    }


def _check(name: str, mergekit_runs, tmp_path: Path) -> None:
    cfg, theirs, error, out_dtype = mergekit_runs[name]
    if error is not None:
        pytest.fail(f"mergekit rejects {cfg.name}:\n{error}", pytrace=False)
    ours = tmp_path / "ours"
    oracle.run_ours(cfg, ours)
    oracle.assert_same_model(ours, theirs, out_dtype=out_dtype)


def _update_statistics(directory: Path, base_dir: str) -> tuple[float, float, int]:
    """(fraction of entries changed from the base, L1 norm of the update, entries) over the model."""
    merged, base = oracle.load_dir(directory), oracle.load_dir(base_dir)
    changed = total = 0
    l1 = 0.0
    for name, value in merged.items():
        update = value.double() - base[name].double()
        changed += int((update != 0).sum())
        total += update.numel()
        l1 += float(update.abs().sum())
    return changed / total, l1, total


@pytest.mark.parametrize("name", GROUPS["random"])
def test_random_methods_agree_in_distribution(name, mergekit_runs, tmp_path, zoo):
    """DARE / DELLA: the fraction of entries kept agrees within 4 standard deviations of a binomial
    draw, and (DARE's L1 rescale keeps each tensor's L1 norm) the update's L1 norm within 1%;
    DELLA's survivors are divided by their keep probability here, matched in L1 by mergekit, so its
    L1 norms agree in expectation (within 5%)."""
    cfg, theirs, error, _ = mergekit_runs[name]
    if error is not None:
        pytest.fail(f"mergekit rejects {cfg.name}:\n{error}", pytrace=False)
    ours = tmp_path / "ours"
    oracle.run_ours(cfg, ours)
    base_dir = zoo[CASES[name].models]["base"]
    kept_ours, l1_ours, n = _update_statistics(ours, base_dir)
    kept_theirs, l1_theirs, _ = _update_statistics(theirs, base_dir)
    p = (kept_ours + kept_theirs) / 2
    assert abs(kept_ours - kept_theirs) <= 4 * (2 * p * (1 - p) / n) ** 0.5, (kept_ours, kept_theirs)
    tolerance = 0.05 if name.startswith("della") else 0.01
    assert abs(l1_ours - l1_theirs) <= tolerance * l1_theirs, (l1_ours, l1_theirs)


# --- the cases -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, id=f"{group}-{name}")
        for group, names in GROUPS.items()
        if group != "random"
        for name in names
    ],
)
def test_same_model_as_mergekit(name, mergekit_runs, tmp_path):
    """Each case's YAML: mergekit's output and ours hold the same tensors (float32 rounding, 1 ulp
    for bf16) and the same layer count. Groups: the models form, gradients and filters, slices,
    bf16, model+lora, the methods beyond the task-vector family."""
    _check(name, mergekit_runs, tmp_path)


# --- (e) mergekit's own examples ---------------------------------------------------------------------


@pytest.mark.parametrize("example", _example_params())
def test_mergekit_examples(example, mergekit_runs, tmp_path):
    """Each example of mergekit's examples/ whose method both tools reproduce exactly, on the llama set
    (model references and layer ranges rewritten: see oracle.adapt_example)."""
    _check(f"example-{Path(example).stem}", mergekit_runs, tmp_path)
