"""The fused merge's modes for mergekit's other methods, against float64 references on awkward
shapes and dtypes: combinations of the inputs themselves (slerp, karcher, ...: ``base_scale``),
nearswap's clip and RAM's active mean; and the statistics of the inputs themselves (no base)."""

import pytest
import torch

from mergekernels import _ops

from .conftest import DTYPES, SHAPES, assert_close_to_ref, make_inputs


def _noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values through a transposed view (2-D and up) or a strided one."""
    if x.dim() >= 2:
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return torch.stack([x, x], dim=1)[:, 0]


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_points_gram_and_combination(dtype, shape, contiguous):
    base, fts = make_inputs(3, shape, dtype, seed=len(shape) + shape[0], delta=0.3)
    if not contiguous:
        base, fts = _noncontiguous(base), [_noncontiguous(x) for x in fts]
    points = [base, *fts]
    flat = torch.stack([x.double().reshape(-1) for x in points])
    gram, absmax, nnz, _, _ = _ops.tv_stats(None, points)
    torch.testing.assert_close(gram, flat @ flat.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(absmax.double(), flat.abs().amax(dim=1))
    assert nnz.tolist() == (flat != 0).sum(dim=1).tolist()

    c = [0.7, -0.4, 1.3, 0.25]
    out = _ops.fused_merge(_ops.prepare(base, fts, "t"), weights=c[1:], base_scale=c[0])
    # each product rounded to float32, then summed in float32 (the reference sums in float64)
    ref = sum(ci * x.double() for ci, x in zip(c, points, strict=True))
    assert_close_to_ref(out, ref.to(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_is_nearswap(dtype, shape):
    base, fts = make_inputs(2, shape, dtype, seed=shape[0], delta=0.05)
    limits = [0.02, 0.0]
    thr = torch.tensor([limits, [0.0, 0.0]], dtype=torch.float32)
    out = _ops.fused_merge(_ops.prepare(base, fts, "t"), weights=[1.0, 0.5], sparsify="clip", thresholds=thr)
    b = base.double()
    ref = b.clone()
    for w, d, x in zip([1.0, 0.5], limits, fts, strict=True):
        tau = x.double() - b
        ref += w * tau * (d / tau.abs().clamp_min(1e-6)).clamp(0, 1)
    assert_close_to_ref(out, ref.to(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_active_mean_is_ram(dtype, shape):
    base, fts = make_inputs(3, shape, dtype, seed=2 * shape[0], delta=0.02)
    eps, lam = 0.015, [1.2, 0.9, 1.05]
    k = len(fts)
    thr = torch.tensor([[eps] * k, [0.0] * k], dtype=torch.float32)
    out = _ops.fused_merge(
        _ops.prepare(base, fts, "t"),
        weights=lam,
        sparsify="trim",
        thresholds=thr,
        tie_cuts=[0] * (2 * k),
        reduce="active",
    )
    b = base.double()
    taus = torch.stack([x.double() - b for x in fts])
    active = taus.abs() > torch.tensor(eps, dtype=torch.float32).double()
    taus = taus * active
    count = active.sum(0)
    lam_t = torch.tensor(lam, dtype=torch.float64).reshape(-1, *[1] * base.dim())
    alone = (taus * lam_t).sum(0)
    ref = b + torch.where(count == 1, alone, taus.sum(0) / count.clamp(min=1))
    assert_close_to_ref(out, ref.to(dtype))
    if base.numel() >= 100:  # both branches of the reduction ran
        assert int((count == 1).sum()) > 0 and int((count >= 2).sum()) > 0


def test_active_mean_refuses_ties():
    base, fts = make_inputs(2, (9,))
    thr = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match="active-mean"):
        _ops.fused_merge(
            _ops.prepare(base, fts, "t"),
            weights=[1, 1],
            sparsify="trim",
            thresholds=thr,
            reduce="active",
            ties=True,
        )


@pytest.mark.parametrize("k", [1, 2, 3, 7])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_element_variance_is_torch_var(dtype, shape, k):
    """SCE's statistic: the same bits as torch.var over the stacked float32 task vectors (mergekit's
    formula), and the float64 variance within float32 rounding."""
    base, fts = make_inputs(k, shape, dtype, seed=k + shape[0], delta=0.05)
    fts[0] = _noncontiguous(fts[0])
    got = _ops.element_variance(base, fts)
    taus = torch.stack([x.float() - base.float() for x in fts])
    want = taus.var(dim=0, unbiased=False)
    assert got.dtype == torch.float32 and got.shape == base.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    exact = taus.double().var(dim=0, unbiased=False)
    torch.testing.assert_close(got.double(), exact, rtol=4e-7, atol=1e-30)
