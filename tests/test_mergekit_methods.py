"""mergekit's other methods (slerp, model_stock, nearswap) against float64 references written from
their documented definitions; tests/test_mergekit_oracle.py compares them with mergekit itself."""

from __future__ import annotations

import math

import pytest
import torch

import mergekernels as mk


def reference(v0: torch.Tensor, v1: torch.Tensor, t: float, threshold=0.9995, eps=1e-8) -> torch.Tensor:
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    n0, n1 = a.norm().item(), b.norm().item()
    n0, n1 = (n0 if n0 > eps else 1.0), (n1 if n1 > eps else 1.0)
    cos = max(-1.0, min(1.0, float((a / n0) @ (b / n1))))
    if abs(cos) > threshold:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(cos)
        out = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    return out.reshape(v0.shape)


@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (3, 5, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 1.4])
def test_slerp_matches_the_definition(shape, dtype, t):
    g = torch.Generator().manual_seed(hash((shape, t)) % 1000)
    v0 = torch.randn(shape, generator=g).to(dtype)
    v1 = (0.5 * v0.float() + torch.randn(shape, generator=g)).to(dtype)
    out = mk.slerp(v0, [v1], t=t)
    assert out.dtype == dtype and out.shape == v0.shape
    want = reference(v0, v1, t)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_slerp_ends_collinear_zero_and_noncontiguous():
    v0 = torch.randn(16, 9)
    v1 = torch.randn(16, 9)
    torch.testing.assert_close(mk.slerp(v0, [v1], t=0.0), v0)
    torch.testing.assert_close(mk.slerp(v0, [v1], t=1.0), v1, rtol=1e-5, atol=1e-6)
    # collinear (and antipodal) inputs interpolate linearly
    torch.testing.assert_close(mk.slerp(v0, [2 * v0], t=0.25), 1.25 * v0)
    torch.testing.assert_close(mk.slerp(v0, [-v0], t=0.5), torch.zeros_like(v0))
    # a zero tensor does not divide by zero
    assert torch.isfinite(mk.slerp(torch.zeros(5), [torch.randn(5)], t=0.5)).all()
    wide = torch.randn(9, 16)
    torch.testing.assert_close(mk.slerp(wide.T, [v1], t=0.6), mk.slerp(wide.T.contiguous(), [v1], t=0.6))
    with pytest.raises(ValueError, match="exactly one other model"):
        mk.slerp(v0, [v1, v1], t=0.5)


def stock_reference(base, fts, rows: bool) -> torch.Tensor:
    """Model Stock in float64: per row (over the last dimension) when rows, else the whole tensor."""
    b = base.double()
    two_d = (-1, base.shape[-1]) if rows and base.dim() > 1 else (1, -1)

    def shaped(x):
        return x.reshape(two_d)

    w0 = shaped(b)
    taus = [shaped(x.double()) - w0 for x in fts]
    k = len(fts)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            norm = (taus[i].norm(dim=-1) * taus[j].norm(dim=-1)).clamp_min(1e-6)
            cos.append(((taus[i] * taus[j]).sum(-1) / norm).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    t = torch.where((1 + (k - 1) * c).abs() < 1e-6, 0.0, k * c / (1 + (k - 1) * c))
    return (t * sum(shaped(x.double()) for x in fts) / k + (1 - t) * w0).reshape(base.shape)


@pytest.mark.parametrize("shape", [(5,), (12, 7), (2, 3, 4)])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_stock(shape, filter_wise, k, dtype):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g)
    common = 0.1 * torch.randn(shape, generator=g)
    fts = [(base + common + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]
    base = base.to(dtype)
    out = mk.model_stock(base, fts, filter_wise=filter_wise)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), stock_reference(base, fts, filter_wise), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="at least two"):
        mk.model_stock(base, fts[:1])


def test_nearswap():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 9, generator=g)
    b = a + 0.05 * torch.randn(40, 9, generator=g)
    b[0, 0] = a[0, 0]  # equal entries: |a - b| clamps at 1e-6, weight 1
    for t in (0.0, 0.01, 0.05, 1.0):
        diff = (b.double() - a.double()).abs().clamp_min(1e-6)
        w = (t / diff).clamp(0, 1)
        want = w * b.double() + (1 - w) * a.double()
        torch.testing.assert_close(mk.nearswap(a, [b], t=t).double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mk.nearswap(a, [b], t=10.0), b)


def multislerp_reference(points, weights, eps=1e-8, origin=None, normalize=True):
    """mergekit's documented steps in float64: unit vectors, their weighted mean, the tangent space at
    it, the exponential map back, the weighted mean norm."""
    x = torch.stack([p.double().reshape(-1) for p in points])
    if origin is not None:
        x = x - origin.double().reshape(-1)
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    norms = x.norm(dim=1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = tangent.norm() + eps
    out = (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms.squeeze(1) * w).sum()
    out = out.reshape(points[0].shape)
    return out + origin.double() if origin is not None else out


def karcher_reference(points, max_iter=10, tol=1e-5):
    """The weighted Karcher mean on the sphere, iterated on the vectors themselves (float64)."""
    x = [p.double().reshape(-1) for p in points]
    k = len(x)
    norms = [v.norm() for v in x]
    units = [v / n for v, n in zip(x, norms, strict=True)]
    mean = sum(units) / k
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = torch.clamp(mean @ u, -1, 1)
            theta = torch.arccos(dot)
            if theta < tol:
                continue
            tangent += (theta / torch.sin(theta)) * (u - dot * mean) / k
        step = tangent.norm()
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * tangent / step
        mean = mean / mean.norm()
    return (sum(norms) / k * mean).reshape(points[0].shape)


def _points(k, shape=(17, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.3 * torch.randn(shape, generator=g) for _ in range(k)]


@pytest.mark.parametrize("origin", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp(origin, normalize):
    base, fts = _points(3)
    weights = [1.0, 0.5, 2.0] if origin else [1.0, 0.5, 2.0, 0.7]
    out = mk.multislerp(base, fts, weights=weights, normalize_weights=normalize, origin=origin)
    points = fts if origin else [base, *fts]
    want = multislerp_reference(points, weights, origin=base if origin else None, normalize=normalize)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mk.multislerp(base, fts[:1], weights=[2.0]), fts[0])  # one input: itself


@pytest.mark.parametrize("k", [1, 2, 4, 66])  # 67 points: more than one kernel call takes
def test_karcher(k):
    base, fts = _points(k, seed=k)
    out = mk.karcher(base, fts, max_iter=50, tol=1e-9)
    torch.testing.assert_close(out.double(), karcher_reference([base, *fts], 50, 1e-9), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["flatten", "rows", "columns"])
@pytest.mark.parametrize("origin", [True, False])
def test_nuslerp(mode, origin):
    base, fts = _points(2 if origin else 1, seed=5)
    weights = [1.0, 3.0]
    t = 0.75
    out = mk.nuslerp(
        base, fts, weights=weights, flatten=mode == "flatten", row_wise=mode == "columns", origin=origin
    )
    v0, v1 = (fts[0] - base, fts[1] - base) if origin else (base, fts[0])
    v0, v1 = v0.double(), v1.double()
    if mode == "flatten":
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif mode == "columns":
        v0, v1 = v0.T, v1.T
    cos = ((v0 / v0.norm(dim=1, keepdim=True)) * (v1 / v1.norm(dim=1, keepdim=True))).sum(1, keepdim=True)
    theta = torch.acos(cos.clamp(-1, 1))
    want = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    want = want.T if mode == "columns" else want.reshape(base.shape)
    want = want + base.double() if origin else want
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def _taus(k=3, shape=(23, 8), seed=9, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(k)]


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.0])
def test_sce(topk):
    base, fts = _taus()
    taus = torch.stack([x.double() - base.double() for x in fts])
    if topk < 1:
        var = taus.var(dim=0, unbiased=False).reshape(-1)
        k = int(int((var != 0).sum()) * topk)
        keep = torch.zeros_like(var, dtype=torch.bool)
        keep[torch.argsort(var, descending=True, stable=True)[:k]] = True
        taus = taus * keep.reshape(base.shape)
    w = taus.square().reshape(3, -1).mean(1)
    w = torch.full_like(w, 1 / 3) if w.sum() < 1e-6 else w / w.sum()
    agree = torch.sign(taus) == torch.where(taus.sum(0) >= 0, 1.0, -1.0).double()
    kept = w[:, None, None] * agree
    want = base.double() + (taus * kept).sum(0) / kept.sum(0).clamp(min=1e-6)
    torch.testing.assert_close(mk.sce(base, fts, select_topk=topk).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("epsilon", [1e-5, 0.04])
def test_ram_and_ramplus(epsilon):
    base, fts = _taus()
    taus = torch.stack([x.double() - base.double() for x in fts])
    active = taus.abs() > epsilon
    counts = active.sum(0)
    taus = taus * active
    want = base.double() + taus.sum(0) / counts.clamp(min=1)
    torch.testing.assert_close(mk.ram(base, fts, epsilon=epsilon).double(), want, rtol=1e-5, atol=1e-6)
    r, alpha = 0.5, 0.8
    lam = []
    for k in range(3):
        shared = int((active[k] & (counts > 1)).sum())
        alone = int((active[k] & (counts == 1)).sum())
        lam.append(1 + r * min(max(shared / max(alone, epsilon), 0), alpha))
    lam = torch.tensor(lam, dtype=torch.float64)[:, None, None]
    want = base.double() + (taus * torch.where(counts == 1, lam, 1 / counts.clamp(min=1))).sum(0)
    got = mk.ramplus_tl(base, fts, r=r, alpha=alpha, epsilon=epsilon)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_arcee_fusion():
    base, fts = _taus(k=1, scale=0.3)
    a, b = base.double(), fts[0].double()
    p, q = torch.softmax(b, -1) + 1e-8, torch.softmax(a, -1) + 1e-8
    importance = (b - a).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    ordered = importance.reshape(-1).sort().values
    q1, med, q3 = (ordered[int(x * (ordered.numel() - 1))] for x in (0.25, 0.5, 0.75))
    mask = importance >= med + 1.5 * (q3 - q1)
    assert 0 < int(mask.sum()) < mask.numel()  # some entries taken from b, not all
    want = a + (b - a) * mask
    torch.testing.assert_close(mk.arcee_fusion(base, fts).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sce_ties_at_the_selected_variance_keep_the_lowest_indices(dtype):
    """Task vectors on a coarse grid tie in variance everywhere (as bf16 ones do): exactly k entries
    are kept, the ties at the k-th largest variance by lowest index (mergekit's formula, torch.var of
    the task vectors, with its top-k made stable)."""
    g = torch.Generator().manual_seed(3)
    base = (torch.randint(-64, 64, (37, 29), generator=g) / 64).to(dtype)
    fts = [(base.double() + torch.randint(-2, 3, (37, 29), generator=g) / 128).to(dtype) for _ in range(3)]
    topk = 0.35
    work = torch.float64 if dtype == torch.float64 else torch.float32
    taus = torch.stack([x.to(work) - base.to(work) for x in fts])
    var = taus.var(dim=0, unbiased=False).float().reshape(-1)
    k = int(int((var != 0).sum()) * topk)
    assert int((var == var.sort(descending=True).values[k - 1]).sum()) > 1  # the cut falls in a tie
    keep = torch.zeros_like(var, dtype=torch.bool)
    keep[torch.argsort(var, descending=True, stable=True)[:k]] = True
    taus = taus.double() * keep.reshape(base.shape)
    w = taus.square().reshape(3, -1).mean(1)
    w = w / w.sum()
    agree = torch.sign(taus) == torch.where(taus.sum(0) >= 0, 1.0, -1.0).double()
    kept = w[:, None, None] * agree
    want = base.double() + (taus * kept).sum(0) / kept.sum(0).clamp(min=1e-6)
    got = mk.sce(base, fts, select_topk=topk)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
