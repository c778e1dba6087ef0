"""Model-level merges of state dicts."""

import pytest
import torch

import mergekernels as mk

from . import reference as ref
from .conftest import assert_close_to_ref, make_inputs


def _models(k=3, dtype=torch.bfloat16):
    shapes = {
        "embed.weight": (50, 16),
        "layers.0.weight": (16, 16),
        "layers.0.bias": (16,),
        "head.weight": (4, 16),
    }
    base, fts = {}, [{} for _ in range(k)]
    for i, (name, shape) in enumerate(shapes.items()):
        b, f = make_inputs(k, shape, dtype, seed=i)
        base[name] = b
        for t in range(k):
            fts[t][name] = f[t]
    base["position_ids"] = torch.arange(10)
    for sd in fts:
        sd["position_ids"] = torch.arange(10) + 1
    return base, fts


@pytest.mark.parametrize("method", sorted(mk.METHODS))
def test_every_method_merges_a_model(method):
    base, fts = _models()
    params = {}
    if method == "regmean":  # needs input Grams: random positive definite ones for the 2-D weights
        params["grams"] = {
            name: [torch.eye(t.shape[1]) + torch.rand(t.shape[1]).diag() for _ in fts]
            for name, t in base.items()
            if t.dim() == 2
        }
    if method == "apl":  # needs calibration scores (tests/test_apl.py); here its explicit DARE fallback
        params.update(scores=None, fallback="dare")
    if method in ("slerp", "nearswap", "arcee_fusion"):  # between the base and one other model
        fts = fts[:1]
    if method == "nuslerp":  # between two models
        fts = fts[:2]
    if method == "nearswap":
        params["t"] = 0.01
    if method == "passthrough":  # one model per tensor: slices of configurations, not mk.merge
        with pytest.raises(ValueError, match="passthrough takes one model per tensor"):
            mk.merge(base, fts, method=method)
        return
    merged = mk.merge(base, fts, method=method, **params)
    assert merged.keys() == base.keys()
    assert torch.equal(merged["position_ids"], base["position_ids"])  # integer buffers copied from base
    for name, tensor in base.items():
        assert merged[name].dtype == tensor.dtype and merged[name].shape == tensor.shape


def test_model_merge_equals_per_tensor_with_name_keys_and_per_model_params():
    base, fts = _models()
    merged = mk.merge(base, fts, method="dare_ties", drop=[0.8, 0.5, 0.3], weights=[1, 2, 3], seed=9)
    for name in ("embed.weight", "layers.0.bias"):
        expected = ref.dare(
            base[name], [sd[name] for sd in fts], [0.8, 0.5, 0.3], [1, 2, 3], 1.0, 9, name, True, "ties"
        )
        assert_close_to_ref(merged[name], expected)


def test_method_without_its_required_data_is_refused():
    base, fts = _models()
    with pytest.raises(ValueError, match="regmean.*needs grams"):
        mk.merge(base, fts, method="regmean")


def test_exclude_keeps_base_values():
    base, fts = _models()
    merged = mk.merge(base, fts, method="ties", exclude=["head.*"])
    assert torch.equal(merged["head.weight"], base["head.weight"])
    assert not torch.equal(merged["layers.0.weight"], base["layers.0.weight"])


def test_global_threshold_is_model_wide():
    base, fts = _models(2, torch.float32)
    names = [n for n in base if base[n].is_floating_point()]
    merged = mk.merge(base, fts, method="ties", threshold_scope="global", density=0.1, merge="sum")
    cat_base = torch.cat([base[n].reshape(-1) for n in names])
    cat_ft = [torch.cat([sd[n].reshape(-1) for n in names]) for sd in fts]
    thr = ref.ties_thresholds(cat_base, cat_ft, 0.1)
    for n in names:
        expected = ref.ties(base[n], [sd[n] for sd in fts], merge="sum", thresholds=thr)
        assert_close_to_ref(merged[n], expected)


def test_merge_errors_name_the_problem():
    base, fts = _models()
    with pytest.raises(ValueError, match="unknown merge method 'tiez'; valid methods: .*ties"):
        mk.merge(base, fts, method="tiez")
    with pytest.raises(ValueError, match="does not take drop"):
        mk.merge(base, fts, method="ties", drop=0.5)
    del fts[1]["layers.0.bias"]
    with pytest.raises(KeyError, match="fine-tuned model 1 lacks 1 tensor.*layers.0.bias"):
        mk.merge(base, fts, method="ties")
    base2, fts2 = _models()
    fts2[2]["head.weight"] = torch.zeros(5, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="tensor 'head.weight'.*finetuned\\[2\\] has shape"):
        mk.merge(base2, fts2, method="task_arithmetic")
    with pytest.raises(ValueError, match="applies to ties"):
        mk.merge(base2, fts2, method="dare", threshold_scope="global")
