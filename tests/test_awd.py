"""AWD (shared/specs/awd.md): the Gram-space descent against full-dimensional descent, the merges
against float64 references, every granularity through mk.awd and mk.merge.

The references here are written from the spec, independent of mergekernels.methods.awd: a
full-dimensional float64 gradient descent on the real vectors, vectorised over independent problems
(rows), using the spec's gradient formula literally; and the merges in float64 from its delta.
"""

import importlib
import math

import pytest
import torch

import mergekernels as mk
from mergekernels.methods.awd import awd_coefficients, awd_full, awd_gradient

from . import reference as ref
from .conftest import DTYPES, SHAPES, ULP, assert_close_to_ref, make_inputs

awd_mod = importlib.import_module("mergekernels.methods.awd")  # (mk.methods.awd is the function)

F64 = torch.float64
GRANULARITIES = ("global", "per_tensor", "per_row")
# A short descent with a large step: the merges move a lot without 300 steps per test.
FAST = {"steps": 40, "lr": 0.05, "alpha": 0.02, "scale_free": True}


# ----------------------------------------------------------------------------------------------
# References.
def full_descent(taus, alpha=0.1, lr=0.01, steps=300, scale_free=False, rtol=1e-12):
    """delta [R, n] for task vectors taus [R, K, n] (R independent problems), float64: plain GD from
    delta = 0 with the spec's gradient, dL_O/du_k = (2/N) sum_{j != k} s_kj (u_j / (a_k a_j) -
    c_kj u_k / a_k^2), grad_delta = -sum_k dL_O/du_k + alpha delta / ||delta||. A u (or delta) with
    squared norm <= rtol * max ||tau||^2 counts as zero (cos 0, subgradient 0), as the module states."""
    t = taus.to(F64)
    r_, k, n = t.shape
    nn = k * (k - 1)
    sq = (t * t).sum(-1)
    tol = rtol * sq.amax(-1)
    rms = sq.mean(-1).sqrt()
    if scale_free:
        step = lr * rms**2
        pen = torch.where(rms > 0, alpha / rms.clamp_min(1e-300), 0.0)
    else:
        step, pen = torch.full((r_,), lr, dtype=F64), torch.full((r_,), alpha, dtype=F64)
    delta = torch.zeros(r_, n, dtype=F64)
    if k < 2:
        return delta
    off = ~torch.eye(k, dtype=torch.bool)
    for _ in range(steps):
        u = t - delta[:, None]
        a2 = (u * u).sum(-1)
        live = a2 > tol[:, None]
        a = a2.sqrt()
        pair = live[:, :, None] & live[:, None, :] & off
        aa = a[:, :, None] * a[:, None, :]
        c = torch.where(pair, (u @ u.mT) / torch.where(pair, aa, 1.0), 0.0)
        s = c.sign()
        first = torch.where(pair, s / torch.where(pair, aa, 1.0), 0.0) @ u
        a2k = torch.where(live, a2, 1.0)
        second = torch.where(live, (s * c).sum(-1) / a2k, 0.0)[..., None] * u
        grad = -(2.0 / nn) * (first - second).sum(1)
        dn2 = (delta * delta).sum(-1)
        big = dn2 > tol
        grad += torch.where(big, pen / torch.where(big, dn2, 1.0).sqrt(), 0.0)[:, None] * delta
        delta = delta - step[:, None] * grad
    return delta


def mean_abs_cos(vectors):
    """Mean |cos| over the pairs i != j of [K, n] vectors (float64)."""
    v = vectors.to(F64)
    n = v.norm(dim=-1)
    c = (v @ v.T) / torch.outer(n, n)
    k = v.shape[0]
    return float(c[~torch.eye(k, dtype=torch.bool)].abs().mean())


def problems(taus, granularity, shape):
    """[K, N] task vectors of one tensor -> [R, K, n] problems of one granularity."""
    k = taus.shape[0]
    if granularity == "per_row" and len(shape) >= 2:
        return taus.reshape(k, shape[0], -1).transpose(0, 1)
    return taus.reshape(1, k, -1)


def ta_reference(base, fts, delta, weights=None, scale=1.0, out_dtype=None):
    """theta_0 + scale * sum_i v_i (tau_i - delta), float64, rounded to the output dtype."""
    taus = ref.tau32(base, fts).to(F64)
    v = torch.ones(len(fts), dtype=F64) if weights is None else torch.tensor(weights, dtype=F64)
    merged = base.detach().cpu().to(F64).reshape(-1) + scale * (
        v[:, None] * (taus - delta.reshape(1, -1))
    ).sum(0)
    return merged.reshape(base.shape).to(out_dtype or base.dtype)


def tensor_delta(base, fts, granularity, **hp):
    """The reference delta of one tensor (flattened, float64) under a per-tensor granularity."""
    taus = ref.tau32(base, fts).to(F64)
    return full_descent(problems(taus, granularity, base.shape), **hp).reshape(-1)


def shared_inputs(k, shape, dtype=torch.float32, seed=0, shared=0.9, norm=None):
    """base and fine-tuned tensors whose task vectors share a component: tau_i = c + eps_i with
    |c|^2 : |eps|^2 = shared : (1 - shared) per row; rows of norm ~`norm` (default ~1 per tensor)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    c = torch.randn(shape, generator=g)
    eps = [torch.randn(shape, generator=g) for _ in range(k)]
    total = c.numel()
    unit = 1.0 / math.sqrt(total) if norm is None else norm / math.sqrt(total)
    fts = [base + unit * (math.sqrt(shared) * c + math.sqrt(1 - shared) * e) for e in eps]
    return base.to(dtype), [x.to(dtype) for x in fts], c


def state_dicts(k=3, dtype=torch.bfloat16, seed=0):
    shapes = {"embed.weight": (11, 6), "layer.weight": (6, 6), "layer.bias": (6,), "scalar": (1,)}
    base, fts = {}, [{} for _ in range(k)]
    for i, (name, shape) in enumerate(shapes.items()):
        b, f, _ = shared_inputs(k, shape, dtype, seed=seed + i, norm=1.0)
        base[name] = b
        for t in range(k):
            fts[t][name] = f[t]
    base["step"] = torch.tensor([3])
    for sd in fts:
        sd["step"] = torch.tensor([4])
    return base, fts


# ----------------------------------------------------------------------------------------------
# The descent.
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("scale_free", [False, True])
def test_gram_descent_equals_full_descent(k, scale_free):
    g = torch.Generator().manual_seed(k)
    d = 300
    c = torch.randn(d, generator=g, dtype=F64)
    taus = torch.stack([0.05 * (c + torch.randn(d, generator=g, dtype=F64)) for _ in range(k)])
    taus[0] *= 3.0  # unequal norms
    hp = {"alpha": 0.1, "lr": 0.01 if not scale_free else 0.005, "steps": 300, "scale_free": scale_free}
    if not scale_free:
        taus = taus / taus.norm(dim=-1).mean()  # norm ~1: the absolute step moves delta
    w, info = awd_coefficients(taus @ taus.T, **hp)
    expected = full_descent(taus[None], **hp)[0]
    library_full = awd_full(taus, **hp)
    got = w @ taus
    r = float(taus.norm(dim=-1).square().mean().sqrt())
    assert float(expected.norm()) > 0.1 * r  # delta moved: the comparison means something
    assert float((got - expected).norm()) <= 1e-9 * r
    assert float((library_full - expected).norm()) <= 1e-9 * r
    assert info.delta_norm.item() == pytest.approx(float(expected.norm()), rel=1e-9)
    assert info.mean_abs_cos_before.item() == pytest.approx(mean_abs_cos(taus), rel=1e-12)
    assert info.mean_abs_cos_after.item() == pytest.approx(mean_abs_cos(taus - expected), rel=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gram_descent_equals_full_descent_per_granularity(granularity, monkeypatch):
    """Coefficients of the model-level pass (one Gram, Grams per tensor, Grams per row; chunked) give
    the delta of full-dimensional descent on the concatenated / per-tensor / per-row vectors."""
    monkeypatch.setattr(awd_mod, "CHUNK_ELEMS", 7)  # several chunks per tensor
    monkeypatch.setattr(awd_mod, "SOLVE_CHUNK_ELEMS", 5 * 16)  # several solve batches (5 problems)
    base, fts = state_dicts(4, torch.float32)
    names = [n for n in base if base[n].is_floating_point()]
    hp = {"alpha": 0.05, "lr": 0.01, "steps": 120, "scale_free": True}
    shared, per_tensor, diagnostics = awd_mod.prepare_stats(
        lambda n: (base[n], [sd[n] for sd in fts]), names, {"granularity": granularity, **hp}
    )
    taus = {n: ref.tau32(base[n], [sd[n] for sd in fts]).to(F64) for n in names}
    if granularity == "global":
        cat = torch.cat([taus[n] for n in names], dim=1)
        expected = full_descent(cat[None], **hp)[0]
        assert float((shared["coefficients"] @ cat - expected).norm()) <= 1e-9 * float(cat.norm())
        assert float(expected.norm()) > 0.1 * float(cat.norm(dim=1).mean())
        assert set(diagnostics) == {"awd"}
        return
    assert shared == {} and set(per_tensor) == set(names) and set(diagnostics) == {"awd", *names}
    for n in names:
        probs = problems(taus[n], granularity, base[n].shape)
        expected = full_descent(probs, **hp)
        w = per_tensor[n]["coefficients"].reshape(probs.shape[0], -1)
        got = (w[:, :, None] * probs).sum(1)
        scale = float(probs.norm(dim=-1).mean())
        assert float((got - expected).norm()) <= 1e-9 * scale * probs.shape[0]
        if probs.shape[-1] > 1:  # (a 1-element tensor: K scalars, delta stays ~0)
            assert float(expected.norm()) > 0.1 * scale


def test_gradient_equals_autograd():
    g = torch.Generator().manual_seed(3)
    for k in (2, 3, 6):
        taus = torch.randn(k, 40, generator=g, dtype=F64) + 0.5 * torch.randn(40, generator=g, dtype=F64)
        gram = taus @ taus.T
        for alpha in (0.0, 0.3):
            w = 0.2 * torch.randn(1, k, generator=g, dtype=F64)
            delta = (w[0] @ taus).clone().requires_grad_(True)
            u = taus - delta
            un = u / u.norm(dim=-1, keepdim=True)
            cos = un @ un.T
            loss = cos[~torch.eye(k, dtype=torch.bool)].abs().sum() / (k * (k - 1)) + alpha * delta.norm()
            loss.backward()
            coef = awd_gradient(gram[None], w, alpha=alpha)[0]
            assert torch.allclose(coef @ taus, delta.grad, rtol=1e-10, atol=1e-12)


def test_orthogonal_task_vectors_leave_delta_at_zero():
    """Disjoint supports: every cosine is exactly 0, so delta stays exactly 0 for any granularity, and
    AWD+M is M bit for bit."""
    k, shape = 3, (6, 9)
    base = torch.randn(shape)
    fts = []
    for i in range(k):
        t = torch.zeros(shape)
        t[:, 3 * i : 3 * i + 3] = torch.randn(6, 3)
        fts.append(base + t)
    w, info = awd_coefficients(mk.task_vector_stats(base, fts).gram)
    assert torch.equal(w, torch.zeros(k, dtype=F64)) and info.delta_norm.item() == 0.0
    for gran in GRANULARITIES:
        out, info = mk.awd(base, fts, granularity=gran, weights=[1, 2, 3], scale=0.7, return_info=True)
        assert torch.equal(out, mk.task_arithmetic(base, fts, weights=[1, 2, 3], scale=0.7))
        assert float(info.delta_norm.max()) == 0.0
        assert torch.equal(mk.awd(base, fts, granularity=gran, then="ties"), mk.ties(base, fts))


def test_shared_component_is_found():
    """tau_i = c + eps_i: delta points at c and the mean |cos| of the u_i falls sharply (spec: 0.81 ->
    0.02 at norm ~1 with the default step)."""
    base, fts, c = shared_inputs(6, (2000,), torch.float32, seed=5, shared=0.81)
    taus = ref.tau32(base, fts).to(F64)
    w, info = awd_coefficients(mk.task_vector_stats(base, fts).gram)
    delta = w @ taus
    cos_c = float(delta @ c.to(F64) / (delta.norm() * c.to(F64).norm()))
    before, after = info.mean_abs_cos_before.item(), info.mean_abs_cos_after.item()
    assert before > 0.75 and after < 0.05, (before, after)
    assert cos_c > 0.9
    assert after == pytest.approx(mean_abs_cos(taus - delta), rel=1e-6)
    assert info.loss_after.item() < info.loss_before.item()


def test_scale_free_steps_do_not_depend_on_the_norm():
    base, fts, _ = shared_inputs(4, (500,), torch.float64, seed=6, norm=1.0)
    taus = ref.tau32(base, fts).to(F64)
    g1, g30 = taus @ taus.T, (30.0 * taus) @ (30.0 * taus).T
    # The spec's absolute step: at norm ~1 delta moves far, at norm ~30 it barely moves.
    _, i1 = awd_coefficients(g1)
    _, i30 = awd_coefficients(g30)
    assert i1.moved.item() > 0.3 and i30.moved.item() < 1e-3
    # Scale-free: the same coefficients, the same relative movement and cosines.
    w1, s1 = awd_coefficients(g1, scale_free=True)
    w30, s30 = awd_coefficients(g30, scale_free=True)
    assert s1.moved.item() > 0.3
    assert torch.allclose(w1, w30, rtol=1e-9, atol=1e-12)
    assert s30.moved.item() == pytest.approx(s1.moved.item(), rel=1e-9)
    assert s30.mean_abs_cos_after.item() == pytest.approx(s1.mean_abs_cos_after.item(), rel=1e-9)


def test_degenerate_problems():
    # K = 1: no pairs, delta stays 0, AWD+TA is TA.
    base, fts = make_inputs(1, (33, 5), seed=7)
    w, info = awd_coefficients(mk.task_vector_stats(base, fts).gram)
    assert torch.equal(w, torch.zeros(1, dtype=F64)) and info.mean_abs_cos_before.item() == 0.0
    for gran in GRANULARITIES:
        assert torch.equal(
            mk.awd(base, fts, granularity=gran, scale=0.5), mk.task_arithmetic(base, fts, scale=0.5)
        )
    # All task vectors zero (an untouched row): nothing moves, no NaN.
    w, info = awd_coefficients(torch.zeros(7, 3, 3, dtype=F64))
    assert torch.equal(w, torch.zeros(7, 3, dtype=F64)) and not info.active.any()
    assert math.isnan(info.summary()["mean_abs_cos_before"]) and info.summary()["moved"] == 0.0
    # One zero task vector among others: its pairs count as cos 0 (and in N); Gram = full descent.
    base, fts, _ = shared_inputs(4, (300,), torch.float64, seed=8)
    fts[2] = base.clone()
    taus = ref.tau32(base, fts).to(F64)
    w, info = awd_coefficients(taus @ taus.T)
    expected = full_descent(taus[None])[0]
    assert torch.isfinite(w).all() and float(expected.norm()) > 0.1
    # (u = -delta for the zero vector: its cosines' gradient ~ 1/||delta|| makes the first steps
    # sensitive, so two exact descents agree to ~1e-9 here, not 1e-14.)
    assert float((w @ taus - expected).norm()) <= 1e-7
    live = taus[[0, 1, 3]]
    assert info.mean_abs_cos_before.item() == pytest.approx(mean_abs_cos(live) * 6 / 12, rel=1e-12)


@pytest.mark.parametrize("case", ["one_element", "short_rows", "repeated_model"])
def test_dependent_task_vectors_keep_small_coefficients(case):
    """More tasks than dimensions (1-element tensors, rows shorter than K) or a repeated model: w stays
    the minimum-norm coefficients (no drift along directions that do not move delta) and the merge
    matches the full-dimensional reference."""
    if case == "one_element":
        base, fts = make_inputs(4, (1,), seed=9)
        gran = "per_tensor"
    elif case == "short_rows":
        base, fts, _ = shared_inputs(5, (8, 2), seed=10, norm=4.0)
        gran = "per_row"
    else:
        base, fts, _ = shared_inputs(3, (50,), seed=11)
        fts.append(fts[0].clone())
        gran = "per_tensor"
    out = mk.awd(base, fts, granularity=gran, **FAST)
    stats = awd_mod.row_grams(base, fts) if gran == "per_row" else mk.task_vector_stats(base, fts).gram
    w, _ = awd_coefficients(stats, **FAST)
    assert float(w.abs().max()) < 2.0
    delta = tensor_delta(base, fts, gran, **FAST)
    assert_close_to_ref(out, ta_reference(base, fts, delta))


# ----------------------------------------------------------------------------------------------
# Merges of one tensor.
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_awd_task_arithmetic_equals_reference(granularity, dtype, shape):
    base, fts, _ = shared_inputs(3, shape, dtype, seed=sum(shape))
    weights, scale = [1.0, 0.5, 2.0], 0.8
    out, info = mk.awd(
        base, fts, granularity=granularity, weights=weights, scale=scale, return_info=True, **FAST
    )
    delta = tensor_delta(base, fts, granularity, **FAST)
    assert_close_to_ref(out, ta_reference(base, fts, delta, weights, scale))
    if math.prod(shape) > 1:
        assert info.summary()["moved"] > 0.05  # delta is not 0: the reference is not plain TA


def test_awd_linear_normalizes_by_the_weights():
    base, fts, _ = shared_inputs(3, (41, 3), seed=12)
    delta = tensor_delta(base, fts, "per_row", **FAST)
    expected = ta_reference(base, fts, delta, [1 / 3.5, 0.5 / 3.5, 2 / 3.5], 0.9)
    out = mk.awd(base, fts, granularity="per_row", then="linear", weights=[1, 0.5, 2], scale=0.9, **FAST)
    assert_close_to_ref(out, expected)
    out = mk.awd(base, fts, granularity="per_tensor", then="linear", weights=[1, 0.5, 2], scale=0.9, **FAST)
    assert_close_to_ref(
        out,
        ta_reference(
            base, fts, tensor_delta(base, fts, "per_tensor", **FAST), [1 / 3.5, 0.5 / 3.5, 2 / 3.5], 0.9
        ),
    )


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_awd_ties_equals_ties_on_disentangled_vectors(granularity, dtype):
    base, fts, _ = shared_inputs(4, (37, 29), dtype, seed=13)
    delta = tensor_delta(base, fts, granularity, **FAST)
    taus = ref.tau32(base, fts).to(F64)
    theta_u = [(base.to(F64).reshape(-1) + t - delta).reshape(base.shape) for t in taus]
    expected = ref.ties(base, theta_u, 0.3, [1.0, 2.0, 1.0, 0.5], 0.7, "mean", False)
    out = mk.awd(
        base,
        fts,
        granularity=granularity,
        then="ties",
        density=0.3,
        weights=[1.0, 2.0, 1.0, 0.5],
        scale=0.7,
        **FAST,
    )
    assert out.dtype == dtype
    o, e = out.double(), expected.double()
    bad = (o - e).abs() > 2 * ULP[dtype] * e.abs() + 1e-6
    # u_i is formed in float32 here and in float64 by the reference: an element whose |u| sits at
    # TIES's cut (or whose elected sign is a near tie) may go either way; allow a handful.
    assert int(bad.sum()) <= 3, int(bad.sum())
    assert not torch.equal(out, mk.ties(base, fts, density=0.3, weights=[1.0, 2.0, 1.0, 0.5], scale=0.7))


@pytest.mark.parametrize("then", ["dare_ties", "breadcrumbs", "della", "tsv_m", "ace"])
def test_awd_runs_other_methods_on_the_disentangled_tensors(then):
    base, fts, _ = shared_inputs(3, (24, 16), seed=14)
    w, _ = awd_coefficients(awd_mod.row_grams(base, fts), **FAST)
    theta_u = awd_mod.disentangled(base, fts, w)
    rng = {"seed": 5, "key": "layer.weight"} if mk.METHODS[then].uses_rng else {}
    scale = "alpha" if then == "tsv_m" else "scale"
    expected = mk.METHODS[then].function(base, theta_u, **mk.METHODS[then].implied, **{scale: 0.6}, **rng)
    out = mk.awd(base, fts, granularity="per_row", then=then, scale=0.6, **rng, **FAST)
    assert torch.equal(out, expected)
    # theta_0 + u_i: the rows of u are tau - w_row . tau.
    taus = ref.tau32(base, fts).to(F64).reshape(3, 24, 16)
    u = taus - torch.einsum("rk,krn->rn", w, taus)[None]
    assert torch.allclose(torch.stack(theta_u).to(F64) - base.to(F64), u, atol=1e-6)


def test_noncontiguous_inputs_and_coefficients():
    base, fts, _ = shared_inputs(3, (20, 31), torch.bfloat16, seed=15)
    bt, ftt = base.t(), [x.t() for x in fts]
    assert not bt.is_contiguous()
    for gran in GRANULARITIES:
        expected = mk.awd(bt.contiguous(), [x.contiguous() for x in ftt], granularity=gran, **FAST)
        assert torch.equal(mk.awd(bt, ftt, granularity=gran, **FAST), expected)
        assert torch.equal(
            mk.awd(bt, ftt, granularity=gran, then="ties", **FAST),
            mk.awd(bt.contiguous(), [x.contiguous() for x in ftt], granularity=gran, then="ties", **FAST),
        )
    # Given coefficients skip the solve: global coefficients are applied as they are.
    w = torch.tensor([0.1, -0.2, 0.05], dtype=F64)
    out = mk.awd(base, fts, coefficients=w)
    taus = ref.tau32(base, fts).to(F64)
    assert_close_to_ref(out, ta_reference(base, fts, w @ taus))


def test_float64_inputs_and_out_dtype():
    base, fts, _ = shared_inputs(3, (9, 7), torch.float64, seed=16)
    out = mk.awd(base, fts, granularity="per_row", **FAST)
    assert out.dtype == torch.float64
    out = mk.awd(base, fts, granularity="per_row", out_dtype=torch.bfloat16, **FAST)
    assert out.dtype == torch.bfloat16
    assert mk.awd(base, fts, then="ties", out_dtype=torch.float16, **FAST).dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# Whole models.
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_merge_model_equals_reference(granularity):
    base, fts = state_dicts(3, torch.bfloat16)
    diagnostics = {}
    merged = mk.merge(
        base, fts, method="awd", granularity=granularity, scale=0.9, diagnostics=diagnostics, **FAST
    )
    names = [n for n in base if base[n].is_floating_point()]
    assert torch.equal(merged["step"], base["step"])
    taus = {n: ref.tau32(base[n], [sd[n] for sd in fts]).to(F64) for n in names}
    if granularity == "global":
        cat = torch.cat([taus[n] for n in names], dim=1)
        delta = full_descent(cat[None], **FAST)[0]
        parts = dict(zip(names, delta.split([taus[n].shape[1] for n in names]), strict=True))
    else:
        parts = {n: tensor_delta(base[n], [sd[n] for sd in fts], granularity, **FAST) for n in names}
    for n in names:
        assert_close_to_ref(merged[n], ta_reference(base[n], [sd[n] for sd in fts], parts[n], scale=0.9))
    model = diagnostics["awd"]
    assert model["mean_abs_cos_after"] < 0.8 * model["mean_abs_cos_before"]
    assert model["moved"] > 0.05 and model["steps"] == FAST["steps"]
    if granularity == "global":
        assert set(diagnostics) == {"awd"} and model["problems"] == 1
    else:
        assert set(diagnostics) == {"awd", *names}
        rows = diagnostics["embed.weight"]["problems"]
        assert rows == (11 if granularity == "per_row" else 1)
        assert diagnostics["layer.bias"]["problems"] == 1


def test_merge_with_a_random_then_uses_tensor_names():
    base, fts = state_dicts(3, torch.float32)
    merged = mk.merge(
        base, fts, method="awd", then="dare_ties", drop=0.5, seed=3, granularity="per_tensor", **FAST
    )
    for name in ("embed.weight", "layer.bias"):
        b, f = base[name], [sd[name] for sd in fts]
        expected = mk.awd(
            b, f, then="dare_ties", drop=0.5, seed=3, key=name, granularity="per_tensor", **FAST
        )
        assert torch.equal(merged[name], expected)
    other = mk.merge(
        base, fts, method="awd", then="dare_ties", drop=0.5, seed=4, granularity="per_tensor", **FAST
    )
    assert not torch.equal(other["embed.weight"], merged["embed.weight"])


def test_merge_global_differs_from_per_tensor_and_excludes():
    base, fts = state_dicts(3, torch.float32)
    glob = mk.merge(base, fts, method="awd", exclude=["scalar"], **FAST)
    per = mk.merge(base, fts, method="awd", granularity="per_tensor", exclude=["scalar"], **FAST)
    assert torch.equal(glob["scalar"], base["scalar"])
    assert not torch.equal(glob["embed.weight"], per["embed.weight"])


# ----------------------------------------------------------------------------------------------
# Errors name the parameter.
def test_errors_name_the_parameter():
    base, fts = make_inputs(3, (5, 4), seed=17)
    with pytest.raises(ValueError, match="granularity"):
        mk.awd(base, fts, granularity="per_column")
    with pytest.raises(ValueError, match="then='nope'"):
        mk.awd(base, fts, then="nope")
    with pytest.raises(ValueError, match="regmean.*data-free"):
        mk.awd(base, fts, then="regmean")
    with pytest.raises(ValueError, match="then='awd'"):
        mk.awd(base, fts, then="awd")
    with pytest.raises(ValueError, match="'density'"):
        mk.awd(base, fts, density=0.5)  # task arithmetic takes no density
    with pytest.raises(ValueError, match="alpha"):
        mk.awd(base, fts, alpha=-1.0)
    with pytest.raises(ValueError, match="steps"):
        mk.awd(base, fts, steps=2.5)
    with pytest.raises(ValueError, match="coefficients"):
        mk.awd(base, fts, granularity="per_row", coefficients=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="gram"):
        awd_coefficients(torch.zeros(3, 2))
    sd_base = {"w": base}
    sds = [{"w": x} for x in fts]
    with pytest.raises(ValueError, match="granularity"):
        mk.merge(sd_base, sds, method="awd", granularity="rows")
    with pytest.raises(ValueError, match="regmean"):
        mk.merge(sd_base, sds, method="awd", then="regmean")
    with pytest.raises(ValueError, match="'drop'"):
        mk.merge(sd_base, sds, method="awd", then="ties", drop=0.3)


def test_empty_and_zero_dim_tensors():
    scalar, fts = torch.tensor(1.0), [torch.tensor(1.5), torch.tensor(0.75)]
    empty = torch.zeros(0, 3)
    for gran in GRANULARITIES:
        # K scalars span one dimension: cosines are +-1 whatever delta is, delta stays ~0.
        assert mk.awd(scalar, fts, granularity=gran).item() == pytest.approx(1.25, abs=1e-6)
        assert mk.awd(empty, [empty + 1, empty], granularity=gran).shape == (0, 3)
        assert mk.awd(torch.zeros(4, 0), [torch.zeros(4, 0)] * 2, granularity=gran).shape == (4, 0)
        out = mk.merge(
            {"s": scalar, "e": empty}, [{"s": x, "e": empty} for x in fts], method="awd", granularity=gran
        )
        assert out["s"].item() == pytest.approx(1.25, abs=1e-6) and out["e"].shape == (0, 3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        mk.awd(scalar, [torch.tensor(float("nan")), fts[0]])
