"""ACE-Merging and its covariance ops against float64 references written from the spec."""

import math
import zlib

import pytest
import torch

import mergekernels as mk
from mergekernels import _ops
from mergekernels.methods.ace import ace_batched

from .conftest import ULP, cuda
from .reference_ace import ace_reference

OPS = torch.ops.mergekernels


def experts(shape, k, seed=0, spread=1.0, dtype=torch.float32, rank=None):
    """Base and k fine-tuned tensors; expert t's task vector is scaled by spread**t (spread > 1 makes
    the energies heterogeneous) and has the given rank if one is asked for."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    fts = []
    for t in range(k):
        if rank is None:
            tau = torch.randn(shape, generator=g)
        else:
            tau = torch.randn(*shape[:-1], rank, generator=g) @ torch.randn(rank, shape[-1], generator=g)
        fts.append(base + 0.02 * spread**t * tau)
    return base.to(dtype), [x.to(dtype) for x in fts]


def assert_matches(out, ref, base, dtype, rtol=1e-4):
    """out vs the float64 reference: one rounding to the output dtype plus a float32-level error
    relative to the merged task vector (the solve amplifies float32 rounding by the condition number
    of sum_t R_t, large when gate="off" meets energies that differ by 10^6)."""
    assert out.dtype == dtype and out.shape == ref.shape
    o = out.double()
    assert torch.isfinite(o).all()
    delta = (ref - base.double()).abs().max().item()
    tol = ULP[dtype] * ref.abs() + rtol * max(delta, 1e-30) + 1e-12
    err = (o - ref).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g}, merged task vector scale {delta:.3g}"


SHAPES = [(37, 23), (23, 37), (16, 16), (5, 1), (1, 5), (2, 3), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("gate", ["auto", "on", "off"])
def test_ace_matches_reference(shape, k, gate):
    # Energies 10^6 apart with the gate forced off make sum_t R_t ill-conditioned (tested below);
    # here the forced-off branch gets energies within a factor of ~25.
    spread = 1.5 if gate == "off" else 6.0
    base, fts = experts(shape, k, seed=zlib.crc32(repr((shape, k, gate)).encode()), spread=spread)
    out, info = mk.ace(base, fts, gate=gate, return_info=True)
    ref, ref_info = ace_reference(base, fts, gate=gate)
    assert_matches(out, ref, base, torch.float32)
    assert bool(info.het[0]) == ref_info["het"]
    torch.testing.assert_close(info.energies[:, 0], ref_info["energies"], rtol=1e-12, atol=0)
    if k == 1:
        assert math.isnan(float(info.gamma[0]))
    else:
        assert float(info.gamma[0]) == pytest.approx(ref_info["gamma"], rel=1e-9)
    k_ref = math.floor(0.3 * min(shape))
    assert bool(info.refined[0]) == (ref_info["het"] and k_ref > 0)


def _condition_number(base, fts, eps=1e-2):
    """cond(A) of the non-het closed form, A = sum_t (G_t + eps I) + 1 c^T, in float64."""
    grams = []
    for x in fts:
        tau = x.double() - base.double()
        w = tau - tau.mean(0)
        grams.append(w.T @ w)
    n = base.shape[1]
    a = sum(grams) + len(fts) * eps * torch.eye(n, dtype=torch.float64) + sum(grams).mean(0)[None, :]
    return torch.linalg.cond(a).item()


@pytest.mark.parametrize("seed", range(6))
def test_ill_conditioned_forced_off_is_accurate_to_its_condition_number(seed):
    """Gate forced off with energies 10^6 apart: float32 Grams and products lose what the condition
    number of A amplifies, and no more (the float64 solve adds nothing)."""
    base, fts = experts((2, 3), 5, seed=seed, spread=6.0)
    out = mk.ace(base, fts, gate="off")
    ref, _ = ace_reference(base, fts, gate="off")
    scale = (ref - base.double()).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 4 * _condition_number(base, fts) * 2.0**-24 * scale + ULP[torch.float32] * ref.abs().max()


def test_auto_gate_takes_both_branches():
    base, homogeneous = experts((40, 30), 4, seed=1, spread=1.0)
    _, hetero = experts((40, 30), 4, seed=1, spread=10.0)
    _, info_h = mk.ace(base, homogeneous, return_info=True)
    _, info_x = mk.ace(base, hetero, return_info=True)
    assert not bool(info_h.het[0]) and bool(info_x.het[0])
    assert float(info_h.gamma[0]) < 0.3 < float(info_x.gamma[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("params", [{}, {"eps": 1e-5, "tau": 0.1, "k_frac": 0.5, "scale": 0.7}])
def test_dtypes_and_parameters(dtype, params):
    base, fts = experts((33, 21), 3, seed=3, spread=5.0, dtype=dtype)
    out = mk.ace(base, fts, **params)
    ref, _ = ace_reference(base, fts, **params)
    assert_matches(out, ref, base, dtype, rtol=5e-5)


@pytest.mark.parametrize("shape", [(24, 20), (20, 24)])
@pytest.mark.parametrize("gate", ["on", "off"])
def test_rank_deficient_task_vectors(shape, gate):
    base, fts = experts(shape, 3, seed=4, spread=3.0, rank=2)
    out = mk.ace(base, fts, gate=gate)
    ref, _ = ace_reference(base, fts, gate=gate)
    assert_matches(out, ref, base, torch.float32, rtol=1e-4)


def test_transposed_orientation_is_the_merge_of_the_transpose():
    """Conv1D-style weights (in x out): orientation="transposed" merges with the other side's
    covariance, i.e. it is the stored-orientation merge of the transposes, transposed back."""
    base, fts = experts((19, 31), 3, seed=5, spread=4.0)
    out = mk.ace(base, fts, orientation="transposed")
    ref, _ = ace_reference(base.T, [x.T for x in fts])
    assert_matches(out, ref.T, base, torch.float32)
    stored = mk.ace(base, fts)
    assert (out - stored).abs().max() > 1e-4  # the two orientations are different merges


def test_non_contiguous_inputs():
    base, fts = experts((26, 18), 3, seed=6, spread=5.0)
    base_nc, fts_nc = base.T.contiguous().T, [x.T.contiguous().T for x in fts]
    assert not base_nc.is_contiguous()
    torch.testing.assert_close(mk.ace(base_nc, fts_nc), mk.ace(base, fts), rtol=0, atol=0)


def test_batched_equals_per_tensor():
    layers = [experts((21, 13), 3, seed=10 + i, spread=1.0 + 4 * (i % 2)) for i in range(4)]
    base = torch.stack([b for b, _ in layers])
    fts = [torch.stack([f[t] for _, f in layers]) for t in range(3)]
    merged, info = ace_batched(base, fts)
    assert info.het.tolist() == [False, True, False, True]
    for i, (b, f) in enumerate(layers):
        single, single_info = mk.ace(b, f, return_info=True)
        torch.testing.assert_close(merged[i], single, rtol=1e-6, atol=1e-6)
        assert bool(single_info.het[0]) == bool(info.het[i])


def test_non_matrix_tensors_get_the_mean():
    g = torch.Generator().manual_seed(7)
    for shape in [(9,), (2, 3, 4), ()]:
        base = torch.randn(shape, generator=g)
        fts = [base + torch.randn(shape, generator=g) for _ in range(3)]
        expected = base.double() + 0.5 * torch.stack([x.double() - base.double() for x in fts]).mean(0)
        out = mk.ace(base, fts, scale=0.5)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_model_level_groups_excludes_and_reports():
    g = torch.Generator().manual_seed(8)
    base = {
        "l0.weight": torch.randn(12, 10, generator=g),
        "l1.weight": torch.randn(12, 10, generator=g),
        "l2.weight": torch.randn(10, 12, generator=g),
        "l0.bias": torch.randn(12, generator=g),
        "head.weight": torch.randn(4, 12, generator=g),
        "steps": torch.tensor(5),
    }
    sds = [
        {
            n: (v + 0.05 * (t + 1) ** 2 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
            for n, v in base.items()
        }
        for t in range(3)
    ]
    diagnostics = {}
    out = mk.merge(base, sds, method="ace", exclude=["head.*"], diagnostics=diagnostics)
    assert list(out) == list(base)
    assert torch.equal(out["head.weight"], base["head.weight"]) and torch.equal(out["steps"], base["steps"])
    for name in ["l0.weight", "l1.weight", "l2.weight"]:
        ref, ref_info = ace_reference(base[name], [sd[name] for sd in sds])
        assert_matches(out[name], ref, base[name], torch.float32)
        assert diagnostics[name]["het"] == ref_info["het"]
        assert diagnostics[name]["gamma"] == pytest.approx(ref_info["gamma"], rel=1e-9)
        assert len(diagnostics[name]["energies"]) == 3
    mean_bias = base["l0.bias"] + torch.stack([sd["l0.bias"] - base["l0.bias"] for sd in sds]).mean(0)
    torch.testing.assert_close(out["l0.bias"], mean_bias)
    # A memory cap of one byte batches one tensor at a time: same result.
    capped = mk.merge(base, sds, method="ace", exclude=["head.*"], memory_cap=1)
    for name in out:
        torch.testing.assert_close(capped[name], out[name], rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    base, fts = experts((6, 5), 2)
    with pytest.raises(ValueError, match="gate"):
        mk.ace(base, fts, gate="maybe")
    with pytest.raises(ValueError, match="orientation"):
        mk.ace(base, fts, orientation="sideways")
    with pytest.raises(ValueError, match="k_frac"):
        mk.ace(base, fts, k_frac=1.5)
    with pytest.raises(ValueError, match="finetuned"):
        mk.ace(base, [])
    with pytest.raises(ValueError, match=r"finetuned\[1\] has shape"):
        mk.ace(base, [fts[0], fts[1][:, :4]])
    with pytest.raises(ValueError, match="does not take"):
        mk.merge({"w": base}, [{"w": f} for f in fts], method="ace", density=0.3)


# ---------------------------------------------------------------------------------------------
# The ops underneath.
def test_covariance_moments_reference():
    base, fts = experts((3, 17, 300), 2, seed=9, dtype=torch.bfloat16)
    centred, colmean, energy, centred_energy = _ops.covariance_moments(base, fts)
    for t, x in enumerate(fts):
        tau = (x.float() - base.float()).double()
        mu = tau.mean(1, keepdim=True)
        torch.testing.assert_close(colmean[t].double(), mu[:, 0], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(centred[:, t].double(), tau - mu, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(energy[t], (tau**2).sum((1, 2)), rtol=1e-12, atol=0)
        torch.testing.assert_close(
            centred_energy[t], (centred[:, t].double() ** 2).sum((1, 2)), rtol=1e-12, atol=0
        )


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (40, 300), (5, 600), (2, 3, 9, 1100)])
def test_sym_gram_is_exactly_symmetric(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    g = _ops.sym_gram(x)
    assert torch.equal(g, g.mT)
    torch.testing.assert_close(g.double(), x.double().mT @ x.double(), rtol=1e-5, atol=1e-4)


def test_spd_solve_with_rank_one_prior():
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(4, 30, 9, generator=gen, dtype=torch.float64)
    r = a.mT @ a + 0.1 * torch.eye(9, dtype=torch.float64)
    b = torch.randn(4, 6, 9, generator=gen, dtype=torch.float64)
    c = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    x, fallback = _ops.spd_solve(b, r, c)
    expected = b @ torch.linalg.inv(r + c[:, None, :])
    torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-9)
    assert not fallback.any()
    x_plain, _ = _ops.spd_solve(b.float(), r.float())
    torch.testing.assert_close(x_plain.double(), b @ torch.linalg.inv(r), rtol=1e-5, atol=1e-5)


def test_spd_solve_falls_back_with_a_warning():
    r = torch.diag(torch.tensor([[1.0, -1.0, 2.0]], dtype=torch.float64)[0]).unsqueeze(0)  # indefinite
    b = torch.randn(1, 4, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="my_solve.*pseudo-inverse"):
        x, fallback = _ops.spd_solve(b, r, what="my_solve")
    assert fallback.tolist() == [True]
    torch.testing.assert_close(x, b @ torch.linalg.pinv(r), rtol=1e-12, atol=1e-12)


def test_opcheck_covariance_ops():
    base, fts = experts((2, 9, 7), 3, seed=13, spread=4.0)
    gram = _ops.sym_gram(torch.randn(2, 11, 7))
    ridge, prior_scale = torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 1
    r = gram.double() + torch.eye(7, dtype=torch.float64)
    cases = [
        (OPS.covariance_moments, (base, fts)),
        (OPS.covariance_assemble, (gram, ridge, prior_scale)),
        (OPS.sym_gram, (torch.randn(3, 8, 5),)),
        (OPS.spd_solve, (torch.randn(2, 4, 7, dtype=torch.float64), r, torch.randn(2, 7), "x")),
        (OPS.ace_merge, (base, fts, 1e-2, 0.3, 0.3, 1.0, 0, 1e-6)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_covariance_assemble_reference():
    gram = _ops.sym_gram(torch.randn(3, 20, 6, generator=torch.Generator().manual_seed(14)))
    ridge = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    scale = torch.tensor([1.0, 3.0, 0.25], dtype=torch.float64)
    system, prior = OPS.covariance_assemble(gram, ridge, scale)
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(system, gram.double() + ridge[:, None, None] * eye, rtol=0, atol=0)
    torch.testing.assert_close(prior, gram.double().mean(1) / scale[:, None], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("shape", [(37, 23), (23, 37), (130, 70)])
@pytest.mark.parametrize("gate", ["on", "off"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_cpu(shape, gate, dtype):
    layers = [experts(shape, 3, seed=20 + i, spread=5.0, dtype=dtype) for i in range(3)]
    base = torch.stack([b for b, _ in layers])
    fts = [torch.stack([f[t] for _, f in layers]) for t in range(3)]
    cpu, cpu_info = ace_batched(base, fts, gate=gate)
    gpu, gpu_info = ace_batched(base.cuda(), [x.cuda() for x in fts], gate=gate)
    delta = (cpu.double() - base.double()).abs().max().item()
    err = (gpu.cpu().double() - cpu.double()).abs().max().item()
    assert err <= ULP[dtype] * cpu.double().abs().max().item() + 1e-4 * delta
    torch.testing.assert_close(gpu_info.energies.cpu(), cpu_info.energies, rtol=1e-9, atol=0)
    assert torch.equal(gpu_info.het.cpu(), cpu_info.het)


@cuda
def test_cuda_moments_and_assemble_equal_cpu():
    base, fts = experts((2, 65, 100), 3, seed=30, dtype=torch.float16)
    cpu = _ops.covariance_moments(base, fts)
    gpu = _ops.covariance_moments(base.cuda(), [x.cuda() for x in fts])
    for a, b in zip(cpu[:2], gpu[:2], strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-7)
    for a, b in zip(cpu[2:], gpu[2:], strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=0)
    gram = _ops.sym_gram(cpu[0][:, 0])
    ridge, scale = torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 1
    c_sys, c_prior = OPS.covariance_assemble(gram, ridge, scale)
    g_sys, g_prior = OPS.covariance_assemble(gram.cuda(), ridge.cuda(), scale.cuda())
    torch.testing.assert_close(g_sys.cpu(), c_sys, rtol=0, atol=0)
    torch.testing.assert_close(g_prior.cpu(), c_prior, rtol=1e-12, atol=0)
