"""Every merge method against its float64 reference, on awkward shapes and all storage dtypes."""

import importlib

import pytest
import torch

import mergekernels as mk

from . import reference as ref
from .conftest import DTYPES, SHAPES, assert_close_to_ref, make_inputs

SMALL_SHAPES = [(1,), (7,), (1027,), (3, 5, 7), (33, 65)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic(dtype, shape):
    base, fts = make_inputs(4, shape, dtype, seed=1)
    w = [0.5, -1.0, 2.0, 0.25]
    assert_close_to_ref(
        mk.task_arithmetic(base, fts, weights=w, scale=0.3), ref.task_arithmetic(base, fts, w, 0.3)
    )
    assert_close_to_ref(
        mk.task_arithmetic(base, fts, weights=w, normalize=True),
        ref.task_arithmetic(base, fts, w, normalize=True),
    )


@pytest.fixture(params=["radix", "quickselect"])
def select_path(request, monkeypatch):
    """Run a test through both per-tensor selection paths."""
    if request.param == "radix":
        monkeypatch.setattr(importlib.import_module("mergekernels.selection"), "SMALL_SELECT", 0)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("merge", ["mean", "sum", "weighted"])
def test_ties(dtype, shape, merge, select_path):
    base, fts = make_inputs(5, shape, dtype, seed=2)
    w = [1.0, 0.5, 2.0, 1.5, 0.7]
    for weighted_election in (False, True):
        out = mk.ties(
            base, fts, density=0.3, weights=w, scale=0.8, merge=merge, weighted_election=weighted_election
        )
        assert_close_to_ref(out, ref.ties(base, fts, 0.3, w, 0.8, merge, weighted_election))


def test_ties_single_model_and_full_density():
    base, fts = make_inputs(1, (257,), seed=3)
    # one model, density 1: TIES keeps everything and equals task arithmetic
    assert_close_to_ref(mk.ties(base, fts, density=1.0), ref.task_arithmetic(base, fts))


def test_ties_out_dtype_and_float64_inputs():
    base, fts = make_inputs(3, (65,), torch.float64, seed=4)
    out = mk.ties(base, fts, density=0.5)
    assert out.dtype == torch.float64
    out32 = mk.ties(base, fts, density=0.5, out_dtype=torch.float32)
    assert out32.dtype == torch.float32
    assert_close_to_ref(out32, ref.ties(base.float(), [x.float() for x in fts], 0.5, out_dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("consensus", [None, "ties"])
@pytest.mark.parametrize("rescale", [True, "l1", False])
def test_dare(dtype, shape, consensus, rescale):
    base, fts = make_inputs(3, shape, dtype, seed=5)
    drops = [0.9, 0.5, 0.0]
    out = mk.dare(
        base,
        fts,
        drop=drops,
        weights=[1.0, 2.0, 0.5],
        scale=0.7,
        seed=3,
        key="blk.0",
        rescale=rescale,
        consensus=consensus,
    )
    expected = ref.dare(base, fts, drops, [1.0, 2.0, 0.5], 0.7, 3, "blk.0", rescale, consensus)
    assert_close_to_ref(out, expected)


def test_dare_keeps_expected_fraction_and_scale():
    base, fts = make_inputs(1, (100_000,), seed=6)
    out = mk.dare(base, fts, drop=0.9, key="x")
    tau = fts[0].float() - base.float()
    # dare_linear with one model: kept entries are tau / 0.1, others zero (base returned)
    delta = out - base
    kept = delta != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.01
    torch.testing.assert_close(delta[kept], (tau / 0.1)[kept], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("consensus", [None, "ties"])
def test_breadcrumbs(dtype, shape, consensus, select_path):
    base, fts = make_inputs(3, shape, dtype, seed=7)
    out = mk.breadcrumbs(base, fts, density=0.6, gamma=0.1, scale=0.9, consensus=consensus)
    assert_close_to_ref(out, ref.breadcrumbs(base, fts, 0.6, 0.1, None, 0.9, consensus))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (9,), (6, 11), (2, 3, 4)])
@pytest.mark.parametrize("consensus", ["ties", None])
def test_della(dtype, shape, consensus):
    base, fts = make_inputs(3, shape, dtype, seed=8)
    merge = "mean" if consensus else "sum"
    out = mk.della(base, fts, density=0.5, epsilon=0.2, seed=4, key="d", consensus=consensus, merge=merge)
    assert_close_to_ref(out, ref.della(base, fts, 0.5, 0.2, None, 1.0, 4, "d", consensus, merge))


def test_della_chunking_is_invisible(monkeypatch):
    della_module = importlib.import_module("mergekernels.methods.della")

    base, fts = make_inputs(3, (37, 29), seed=9)
    whole = mk.della(base, fts, seed=1, key="k")
    monkeypatch.setattr(della_module, "CHUNK_ELEMENTS", 3 * 29 * 4)  # 4 rows per chunk
    assert torch.equal(mk.della(base, fts, seed=1, key="k"), whole)


def test_methods_are_deterministic_and_keep_device_and_dtype():
    base, fts = make_inputs(2, (31, 17), torch.bfloat16, seed=10)
    for fn in (mk.task_arithmetic, mk.ties, mk.dare, mk.breadcrumbs, mk.della):
        a, b = fn(base, fts), fn(base, fts)
        assert torch.equal(a, b)
        assert a.dtype == base.dtype and a.device == base.device and a.shape == base.shape


def test_empty_tensors_merge_to_empty():
    base, fts = make_inputs(2, (0, 5), seed=11)
    for fn in (mk.task_arithmetic, mk.ties, mk.dare, mk.breadcrumbs, mk.della):
        out = fn(base, fts)
        assert out.shape == (0, 5) and out.dtype == base.dtype
    assert mk.task_vector_stats(base, fts).gram.abs().sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "row_len"), [(1, 1), (3, 7), (5, 4099), (2, 1)])
def test_row_ranks_equal_stable_sort(dtype, rows, row_len):
    from mergekernels import _ops

    base, (ft,) = make_inputs(1, (rows, row_len), dtype, seed=rows * row_len)
    ft.view(-1)[::5] = base.view(-1)[::5]  # exact ties at 0
    ranks = _ops.row_ranks(base, ft, row_len)
    mags = (ft.float() - base.float()).abs().reshape(rows, row_len)
    expected = torch.empty(rows, row_len, dtype=torch.int32)
    expected.scatter_(
        1, torch.argsort(mags, dim=1, stable=True), torch.arange(row_len, dtype=torch.int32).expand(rows, -1)
    )
    assert torch.equal(ranks.reshape(rows, row_len), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {"scale": 0.6}),
        ("ties", {"density": 0.3}),
        ("dare_ties", {"drop": 0.5, "seed": 3, "key": "w"}),
        ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
        ("della", {"density": 0.5, "seed": 1, "key": "w"}),
    ],
)
def test_out_holds_the_same_bits(method, params, dtype):
    """``out=``: the fused methods write into a given tensor (the engine's shard buffer), the same
    bits as the tensor they return without it, in any output dtype; a wrong ``out`` is refused."""
    from mergekernels.methods import METHODS

    spec = METHODS[method]
    base, fts = make_inputs(3, (37, 29), dtype, seed=5)
    call = {**spec.implied, **params}
    for out_dtype in (dtype, torch.float32, torch.bfloat16):
        want = spec.function(base, fts, out_dtype=out_dtype, **call)
        out = torch.full(base.shape, float("nan"), dtype=out_dtype)
        got = spec.function(base, fts, out=out, **call)
        assert got.data_ptr() == out.data_ptr() and got.dtype == out_dtype
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), out_dtype
    with pytest.raises(ValueError, match=r"out must be a contiguous tensor of shape \(37, 29\)"):
        spec.function(base, fts, out=torch.empty(29, 37, dtype=dtype).t(), **call)
    with pytest.raises(TypeError, match="out has dtype torch.float64"):
        spec.function(base, fts, out=torch.empty(base.shape, dtype=torch.float64), **call)
