"""WUDI and RegMean (closed-form matrix methods) against float64 references, and the input-Gram
collector against hand computations."""

from __future__ import annotations

import pytest
import torch

from mergekernels.methods.regmean import collect_input_grams, regmean, regmean_batched
from mergekernels.methods.wudi import wudi, wudi_batched

from . import reference_closed_form as ref
from .conftest import DTYPES, ULP, assert_close_to_ref, make_inputs

# (out, in) shapes and task counts covering both systems the closed form solves: primal
# (T * out >= in; out >= in and out < in) and dual (T * out < in, R singular), plus 1 x 1.
WUDI_CASES = [((1, 1), 3), ((9, 5), 3), ((5, 12), 3), ((3, 17), 3), ((2, 31), 4), ((16, 16), 2)]


def _exact_grid(shape, generator, step=2.0**-8, span=4):
    """Float32 values that are small multiples of a power of two: sums and products stay exact."""
    return torch.randint(-span, span + 1, shape, generator=generator).float() * step


def _close_tau(out, base, expected_tau, rtol=1e-5):
    """The merged task vector (float32 output) against the reference in relative Frobenius norm."""
    got = out.double() - base.float().double()
    err = (got - expected_tau).norm() / expected_tau.norm().clamp(min=1e-30)
    assert err <= rtol, f"relative error {err.item():.3g}"


# ----------------------------------------------------------------------------------------------
# WUDI
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "k"), WUDI_CASES)
def test_wudi_closed_form_equals_reference_minimiser(dtype, shape, k):
    base, fts = make_inputs(k, shape, dtype, seed=shape[0] * 31 + shape[1])
    out = wudi(base, fts, scale=0.7)
    assert out.dtype == dtype and out.shape == base.shape
    assert_close_to_ref(out, ref.wudi(base, fts, scale=0.7))
    if dtype == torch.float32:
        taus = ref.task_vectors(base, fts)
        _close_tau(wudi(base, fts), base, ref.wudi_minimiser(taus))


def test_wudi_non_contiguous_inputs():
    base, fts = make_inputs(3, (13, 6), seed=40)
    base_t, fts_t = base.T, [x.T for x in fts]  # 6 x 13 views: T * out >= in, primal
    assert not base_t.is_contiguous()
    out = wudi(base_t, fts_t)
    assert_close_to_ref(out, ref.wudi(base_t.contiguous(), [x.contiguous() for x in fts_t]))


@pytest.mark.parametrize(("shape", "k"), WUDI_CASES)
def test_wudi_closed_form_beats_adam_and_zeroes_the_gradient(shape, k):
    base, fts = make_inputs(k, shape, seed=41 + shape[1])
    # a zero base keeps the returned tensors equal to the solvers' float32 task vectors
    base, fts = torch.zeros_like(base), [x - base for x in fts]
    taus = ref.task_vectors(base, fts)
    closed, closed_loss = wudi(base, fts, return_loss=True)
    adam, adam_loss = wudi(base, fts, solver="adam", steps=60, return_loss=True)
    assert closed_loss.dtype == torch.float64 and closed_loss.shape == (1,)
    # the reported losses are the loss of the returned task vectors
    for out, loss in ((closed, closed_loss), (adam, adam_loss)):
        expected = ref.wudi_loss(out.double() - base.double(), taus)
        assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    start = ref.wudi_loss(taus.sum(0), taus)
    assert closed_loss.item() <= adam_loss.item() * (1 + 1e-6) + 1e-12
    assert closed_loss.item() <= start * (1 + 1e-6) + 1e-12
    # first-order optimality: the gradient at the closed form is rounding noise next to the one
    # at the starting point (which is not a minimiser unless the problem is trivial)
    tau_closed = closed.double() - base.double()
    scale = ref.wudi_gradient(taus.sum(0), taus).norm()
    if scale > 1e-6:
        assert ref.wudi_gradient(tau_closed, taus).norm() <= 1e-4 * scale


def test_wudi_adam_follows_the_reference_and_decreases_the_loss():
    base, fts = make_inputs(3, (7, 10), seed=42)
    taus = ref.task_vectors(base, fts)
    steps, lr = 25, 1e-5
    out, loss = wudi(base, fts, solver="adam", steps=steps, lr=lr, return_loss=True)
    moved = out.double() - base.double() - taus.sum(0)
    expected = ref.adam(taus, lr, steps) - taus.sum(0)
    assert (moved - expected).abs().max() <= 0.01 * lr * steps
    assert expected.abs().max() > 0.5 * lr * steps  # it did move
    assert loss.item() < ref.wudi_loss(taus.sum(0), taus)
    # no steps: the starting point sum_t tau_t
    start = wudi(base, fts, solver="adam", steps=0)
    _close_tau(start, base, taus.sum(0), rtol=1e-6)


def test_wudi_adam_runs_the_batch_at_once():
    base, fts = make_inputs(2, (3, 5, 4), seed=43)
    batched = wudi_batched(base, fts, solver="adam", steps=10)
    for layer in range(3):
        single = wudi(base[layer], [x[layer] for x in fts], solver="adam", steps=10)
        torch.testing.assert_close(batched[layer], single, rtol=0, atol=1e-6)


def _exact_low_rank(generator, m, n, rank):
    return _exact_grid((m, rank), generator, step=1.0) @ _exact_grid((rank, n), generator, step=2.0**-8)


@pytest.mark.filterwarnings("ignore:.*Cholesky solve failed")  # expected: singular systems
def test_wudi_singular_cases_give_the_minimiser_closest_to_the_sum():
    g = torch.Generator().manual_seed(44)
    cases = []
    # T * out < in: R has rank 6 of 13
    base, fts = make_inputs(3, (2, 13), seed=45)
    cases.append((base, fts))
    # a repeated expert (dual system singular)
    base, fts = make_inputs(3, (3, 11), seed=46)
    cases.append((base, [fts[0], fts[1], fts[0].clone()]))
    # low-rank task vectors with T * out >= in (primal system singular: rank 4 of 8)
    base = _exact_grid((8, 8), g, step=2.0**-6)
    cases.append((base, [base + _exact_low_rank(g, 8, 8, 2) for _ in range(2)]))
    # a zero task vector among others (w_t = 0), primal and dual
    for shape in ((6, 4), (2, 9)):
        base, fts = make_inputs(3, shape, seed=47 + shape[0])
        cases.append((base, [fts[0], base.clone(), fts[1]]))
    # one expert: its own task vector is the minimiser
    base, fts = make_inputs(1, (4, 9), seed=48)
    cases.append((base, fts))
    for base, fts in cases:
        taus = ref.task_vectors(base, fts)
        expected = ref.wudi_minimiser(taus)
        out, loss = wudi(base, fts, return_loss=True)
        _close_tau(out, base, expected)
        tau = out.double() - base.double()
        assert loss.item() <= ref.wudi_loss(expected, taus) + 1e-9
        # closest to the sum: nothing in the null space of R beyond what tau_0 has there
        r, _ = ref.wudi_normal_equations(taus)
        null = torch.eye(r.shape[0], dtype=torch.float64) - r @ torch.linalg.pinv(
            r, hermitian=True, rtol=1e-10
        )
        torch.testing.assert_close(tau @ null, taus.sum(0) @ null, rtol=0, atol=1e-6)


@pytest.mark.parametrize("decay", [1e-3, 1e-4, 3e-5])
def test_wudi_ill_conditioned_but_invertible_is_solved_exactly(decay):
    """tau_t = B_t C with C's singular values spanning `decay`: cond(R) ~ 1e6..5e8. The exact
    minimiser differs from a ridge-regularised one (1e-8 of the mean diagonal) by 0.4% to 40%."""
    g = torch.Generator().manual_seed(55)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    singular_values = torch.logspace(0, torch.log10(torch.tensor(decay)).item(), 6, dtype=torch.float64)
    mix = singular_values[:, None] * q.T
    fts = [(torch.randn(6, 6, generator=g, dtype=torch.float64) @ mix).float() for _ in range(2)]
    base = torch.zeros(6, 6)
    taus = ref.task_vectors(base, fts)
    _close_tau(wudi(base, fts), base, ref.wudi_minimiser(taus))


@pytest.mark.filterwarnings("ignore:.*Cholesky solve failed")  # expected: singular systems
def test_wudi_batched_mixes_regular_singular_and_zero_entries():
    base, fts = make_inputs(3, (3, 4, 9), seed=49)  # T * out = 12 >= 9: primal
    fts[2][1] = fts[0][1]  # layer 1: a repeated expert
    for x in fts:
        x[2] = base[2]  # layer 2: no expert changed it
    out, loss = wudi_batched(base, fts, scale=0.5, return_loss=True)
    assert loss.shape == (3,) and loss[2].item() == 0.0
    torch.testing.assert_close(out[2], base[2], rtol=0, atol=0)
    for layer in range(3):
        b, f = base[layer], [x[layer] for x in fts]
        assert_close_to_ref(out[layer], ref.wudi(b, f, scale=0.5))


def test_wudi_batched_equals_per_tensor():
    base, fts = make_inputs(3, (4, 5, 11), torch.bfloat16, seed=50)
    out = wudi_batched(base, fts)
    for layer in range(4):
        single = wudi(base[layer], [x[layer] for x in fts])
        assert_close_to_ref(out[layer], single)


@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), ()])
def test_wudi_other_tensors_take_the_mean(shape):
    base, fts = make_inputs(3, shape, seed=51)
    out, loss = wudi(base, fts, scale=0.5, return_loss=True)
    assert loss is None
    assert_close_to_ref(out, ref.mean_of_task_vectors(base, fts, 0.5))


def test_wudi_out_dtype_and_empty():
    base, fts = make_inputs(2, (5, 3), torch.bfloat16, seed=52)
    out = wudi(base, fts, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close_to_ref(out, ref.wudi(base.float(), [x.float() for x in fts]))
    base, fts = make_inputs(2, (0, 4), seed=53)
    out, loss = wudi(base, fts, return_loss=True)
    assert out.shape == (0, 4) and loss.shape == (1,) and loss.item() == 0.0


def test_wudi_rejects_bad_input():
    base, fts = make_inputs(2, (4, 3), seed=54)
    with pytest.raises(ValueError, match="finetuned is empty"):
        wudi(base, [])
    with pytest.raises(ValueError, match="shape"):
        wudi(base, [fts[0], fts[1][:, :2]])
    with pytest.raises(TypeError, match="floating"):
        wudi(base, [fts[0].to(torch.int32)])
    with pytest.raises(ValueError, match="solver"):
        wudi(base, fts, solver="sgd")
    with pytest.raises(ValueError, match="steps"):
        wudi(base, fts, solver="adam", steps=-1)
    with pytest.raises(ValueError, match=r"\[L, m, n\]"):
        wudi_batched(base, fts)


# ----------------------------------------------------------------------------------------------
# RegMean
def _random_grams(k, n, seed, tokens=None, dtype=torch.float64):
    """Input Grams X^T X / #tokens of random activations with per-feature scales."""
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or 3 * n + 2
    grams = []
    for _ in range(k):
        x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * (0.5 + torch.rand(n, generator=g))
        grams.append((x.T @ x / tokens).to(dtype))
    return grams


def _close_weights(out, expected, rtol=1e-5):
    err = (out.double() - expected.double()).norm() / expected.double().norm()
    assert err <= rtol, f"relative error {err.item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (4, 9), (17, 6)])
@pytest.mark.parametrize("reduction", [0.95, 0.6, 1.0])
def test_regmean_equals_reference(dtype, shape, reduction):
    base, fts = make_inputs(3, shape, dtype, seed=60 + shape[1], delta=0.1)
    grams = _random_grams(3, shape[1], seed=61 + shape[0])
    out = regmean(base, fts, grams, reduction=reduction)
    assert out.dtype == dtype and out.shape == base.shape
    expected = ref.regmean(base.float(), fts, grams, reduction).double()
    tol = 2 * ULP[dtype] * expected.abs() + 1e-6 * expected.abs().max()
    assert ((out.double() - expected).abs() <= tol).all()


def test_regmean_minimises_its_objective_and_beats_the_mean():
    base, fts = make_inputs(3, (6, 5), seed=62, delta=0.1)
    grams = [g.float() for g in _random_grams(3, 5, seed=63)]  # float32 Grams are accepted
    out = regmean(base, fts, grams, reduction=0.6)
    mean = torch.stack(fts).mean(0)
    best = ref.regmean_objective(out, fts, grams, 0.6)
    assert best < ref.regmean_objective(mean, fts, grams, 0.6)
    g = torch.Generator().manual_seed(64)
    for _ in range(5):
        nudged = out + 1e-3 * torch.randn(out.shape, generator=g)
        assert best < ref.regmean_objective(nudged, fts, grams, 0.6)


def test_regmean_equal_grams_give_the_plain_mean():
    base, fts = make_inputs(4, (7, 6), seed=65, delta=0.1)
    gram = _random_grams(1, 6, seed=66)[0]
    for reduction in (0.95, 0.3, 1.0):
        out = regmean(base, fts, [gram] * 4, reduction=reduction)
        torch.testing.assert_close(out, torch.stack(fts).mean(0), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*Cholesky solve failed")  # expected: singular systems
def test_regmean_singular_gram_keeps_the_mean_on_unseen_features():
    base, fts = make_inputs(3, (5, 6), seed=67, delta=0.1)
    grams = _random_grams(3, 6, seed=68)
    for g in grams:  # feature 2 never fires
        g[2, :] = 0.0
        g[:, 2] = 0.0
    out = regmean(base, fts, grams, reduction=1.0)
    expected = ref.regmean(base, fts, grams, 1.0)
    _close_weights(out, expected)
    torch.testing.assert_close(out[:, 2], torch.stack(fts).mean(0)[:, 2], rtol=0, atol=1e-6)


def test_regmean_transposed_weights():
    base, fts = make_inputs(3, (6, 4), seed=69, delta=0.1)  # out x in
    grams = _random_grams(3, 4, seed=70)
    plain = regmean(base, fts, grams)
    conv = regmean(base.T.contiguous(), [x.T.contiguous() for x in fts], grams, transposed=True)
    torch.testing.assert_close(conv, plain.T, rtol=0, atol=1e-6)


def test_regmean_batched_equals_per_tensor():
    base, fts = make_inputs(3, (3, 4, 5), torch.float16, seed=71, delta=0.1)
    grams = [torch.stack(_random_grams(3, 5, seed=72 + t)) for t in range(3)]  # [layers, 5, 5] per expert
    out = regmean_batched(base, fts, grams)
    for layer in range(3):
        single = regmean(base[layer], [x[layer] for x in fts], [g[layer] for g in grams])
        assert_close_to_ref(out[layer], single)


@pytest.mark.parametrize("shape", [(7,), (4, 3), (2, 3, 4)])
def test_regmean_without_grams_takes_the_mean_of_the_weights(shape):
    base, fts = make_inputs(3, shape, torch.bfloat16, seed=73)
    assert_close_to_ref(regmean(base, fts), ref.mean_of_task_vectors(base, fts))
    if len(shape) != 2:  # Grams are ignored for tensors that are not 2-D
        assert_close_to_ref(regmean(base, fts, [None] * 3), ref.mean_of_task_vectors(base, fts))


def test_regmean_rejects_bad_input():
    base, fts = make_inputs(2, (4, 3), seed=74)
    grams = _random_grams(2, 3, seed=75)
    with pytest.raises(ValueError, match="grams has 1 entries"):
        regmean(base, fts, grams[:1])
    with pytest.raises(ValueError, match=r"grams\[1\] has shape"):
        regmean(base, fts, [grams[0], grams[1][:2, :2]])
    with pytest.raises(ValueError, match="reduction"):
        regmean(base, fts, grams, reduction=1.5)
    with pytest.raises(TypeError, match="sequence"):
        regmean(base, fts, grams[0])
    with pytest.raises(ValueError, match="finetuned is empty"):
        regmean(base, [], grams)


# ----------------------------------------------------------------------------------------------
# Input Grams
class Conv1D(torch.nn.Module):
    """Stand-in for Hugging Face's GPT-2 Conv1D: weight in x out, y = x @ W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf))
        self.bias = torch.nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def _toy_model():
    torch.manual_seed(80)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), Conv1D(3, 7), torch.nn.Linear(3, 2))


def test_collect_input_grams_matches_hand_computation():
    model = _toy_model()
    g = torch.Generator().manual_seed(81)
    batches = [
        torch.randn(2, 4, 5, generator=g),
        torch.randn(3, 5, generator=g),
        torch.randn(1, 1, 1, 5, generator=g),
    ]
    grams = collect_input_grams(model, batches)
    assert sorted(grams) == ["0.weight", "2.weight", "3.weight"]
    with torch.no_grad():
        hidden = [torch.relu(model[0](x)) for x in batches]
        third = [model[2](h) for h in hidden]
    for name, inputs in (("0.weight", batches), ("2.weight", hidden), ("3.weight", third)):
        assert grams[name].dtype == torch.float64
        torch.testing.assert_close(grams[name], ref.input_gram(inputs), rtol=1e-12, atol=1e-12)
        assert torch.equal(grams[name], grams[name].T)
    assert all(not m._forward_hooks for m in model.modules())


def test_collect_input_grams_options_and_cleanup():
    model = _toy_model()
    batches = [{"x": torch.randn(4, 5)}]
    grams = collect_input_grams(model, batches, forward=lambda m, b: m(b["x"]), modules=["3"])
    assert list(grams) == ["3.weight"]
    with pytest.raises(ValueError, match="no module named"):
        collect_input_grams(model, batches, modules=["9"])
    with pytest.raises(ValueError, match="neither"):
        collect_input_grams(model, batches, modules=["1"])

    def broken(m, b):
        m(b["x"])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_input_grams(model, batches, forward=broken)
    assert all(not m._forward_hooks for m in model.modules())
    # a layer never called gets no Gram
    assert collect_input_grams(model, [torch.randn(2, 5)], forward=lambda m, b: m[0](b)).keys() == {
        "0.weight"
    }


def test_regmean_on_collected_grams_fits_each_expert_better_than_the_mean():
    """End to end: two experts of one linear layer, Grams from their own data."""
    g = torch.Generator().manual_seed(82)
    base = torch.nn.Linear(6, 4)
    experts, datas = [], []
    for t in range(2):
        expert = torch.nn.Linear(6, 4)
        with torch.no_grad():
            expert.weight.copy_(base.weight + 0.3 * torch.randn(4, 6, generator=g))
        experts.append(expert)
        # each task uses a different half of the input features more
        scales = torch.tensor([3.0] * 3 + [0.3] * 3) if t == 0 else torch.tensor([0.3] * 3 + [3.0] * 3)
        datas.append([torch.randn(16, 6, generator=g) * scales for _ in range(3)])
    grams = [collect_input_grams(e, d)["weight"] for e, d in zip(experts, datas, strict=True)]
    weights = [e.weight.detach() for e in experts]
    merged = regmean(base.weight.detach(), weights, grams, reduction=1.0)
    mean = torch.stack(weights).mean(0)

    def error(w):
        return sum(
            float(((torch.cat(d) @ (w - wt).T) ** 2).sum()) for d, wt in zip(datas, weights, strict=True)
        )

    assert error(merged) < 0.5 * error(mean)
