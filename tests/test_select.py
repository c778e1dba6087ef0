"""Exact magnitude selection: equal to what a full sort gives, per tensor and streamed."""

import math

import pytest
import torch

import mergekernels as mk
from mergekernels import selection

from . import reference as ref
from .conftest import DTYPES, SHAPES, make_inputs


@pytest.fixture(params=["radix", "quickselect"])
def select_path(request, monkeypatch):
    """Run a test through both per-tensor selection paths."""
    if request.param == "radix":
        monkeypatch.setattr(selection, "SMALL_SELECT", 0)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, (70_001,)])
@pytest.mark.parametrize("density", [1e-6, 0.2, 0.5, 1.0])
def test_threshold_equals_sort(dtype, shape, density, select_path):
    base, fts = make_inputs(3, shape, dtype, seed=7)
    thr = mk.magnitude_threshold(base, fts, density)
    assert thr.dtype == torch.float32
    assert thr.tolist() == ref.ties_thresholds(base, fts, density)


def test_threshold_with_many_ties_and_zeros(select_path):
    base = torch.zeros(5000)
    ft = torch.tensor([0.0, 0.5, -0.5, 0.25] * 1250)  # heavy ties, a quarter zeros
    for density in (0.1, 0.25, 0.5, 0.74, 0.76, 1.0):
        thr = mk.magnitude_threshold(base, [ft], density).item()
        assert thr == ref.ties_thresholds(base, [ft], density)[0]


def test_per_model_density(select_path):
    base, fts = make_inputs(3, (999,), seed=8)
    dens = [0.1, 0.5, 0.9]
    assert mk.magnitude_threshold(base, fts, dens).tolist() == ref.ties_thresholds(base, fts, dens)


def test_streaming_threshold_equals_concatenation():
    shapes = [(17, 33), (1,), (4096,), (5, 7, 3)]
    pairs = [make_inputs(2, s, torch.bfloat16, seed=i) for i, s in enumerate(shapes)]
    sel = mk.MagnitudeThreshold(num_tasks=2)
    for b, f in pairs:
        sel.count(b, f)
    sel.set_density(0.3)
    for b, f in pairs:
        sel.refine(b, f)
    got = sel.thresholds().tolist()
    cat_base = torch.cat([b.reshape(-1) for b, _ in pairs])
    cat_ft = [torch.cat([f[t].reshape(-1) for _, f in pairs]) for t in range(2)]
    assert got == ref.ties_thresholds(cat_base, cat_ft, 0.3)


def test_rank_zero_selects_nothing():
    base, fts = make_inputs(2, (100,), seed=9)
    sel = mk.MagnitudeThreshold(2)
    sel.count(base, fts)
    sel.set_rank([0, 5])
    sel.refine(base, fts)
    thr = sel.thresholds()
    assert math.isinf(thr[0].item()) and thr[1].item() == ref.kth_largest(ref.tau32(base, fts)[1].abs(), 5)


def test_selector_misuse_is_reported():
    base, fts = make_inputs(2, (10,), seed=1)
    sel = mk.MagnitudeThreshold(2)
    with pytest.raises(RuntimeError, match="before set_rank"):
        sel.refine(base, fts)
    with pytest.raises(ValueError, match="expected 2"):
        sel.count(base, fts[:1])
    sel.count(base, fts)
    with pytest.raises(ValueError, match="ranks must be"):
        sel.set_rank(11)
