"""TSV-M, Iso-C and Iso-CTS against float64 references (tests/reference_spectral.py) and against
properties that hold whatever the reference says: the merged spectrum of each method, the side of
the Iso-CTS projection, batched == per-tensor, and the degenerate cases (T = 1, tiny shapes)."""

import math
from decimal import Decimal

import pytest
import torch

from mergekernels.methods.iso import common_split, iso_c, iso_c_batched, iso_cts, iso_cts_batched
from mergekernels.methods.tsv import polar_factor, tsv_m, tsv_m_batched, tsv_rank

from . import reference_spectral as ref
from .conftest import DTYPES, ULP, cuda, make_inputs

F64 = torch.float64
METHODS = {"tsv_m": (tsv_m, ref.tsv_m), "iso_c": (iso_c, ref.iso_c), "iso_cts": (iso_cts, ref.iso_cts)}
BATCHED = {"tsv_m": tsv_m_batched, "iso_c": iso_c_batched, "iso_cts": iso_cts_batched}
MATRIX_SHAPES = [(1, 1), (2, 3), (3, 2), (17, 9), (9, 17), (8, 8)]
# Relative to the largest entry of the merged task vector. Designed inputs have singular values
# that are well separated where the methods cut (fp32 SVD error ~1e-6 there); random Gaussian task
# vectors have closer singular values, hence the looser bound. A missing polar step or a wrong
# projection changes the result by 1e-2 or more.
RTOL_DESIGNED = 5e-5
RTOL_GAUSSIAN = 2e-4
# Two float32 computations of the same merge (batched vs alone, strided vs contiguous, CUDA vs CPU).
RTOL_SAME = 1e-5
# CUDA vs CPU: cuSOLVER's float32 SVD is another algorithm than LAPACK's; each is within
# RTOL_DESIGNED of the float64 reference (measured on an H200: 1.7e-5 apart on TSV-M).
RTOL_DEVICES = RTOL_DESIGNED


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=F64))
    return q


def spectral_inputs(num_tasks, shape, dtype=torch.float32, seed=0):
    """tau_t = A_t diag(s_t) B_t^T, full rank with distinct singular values (gaps >= 1/(2r) of the
    largest), on a small base so that bf16/fp16 rounding of theta_t leaves the gaps in place."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    base = 0.1 * torch.randn(m, n, generator=g, dtype=F64)
    fts = []
    for t in range(num_tasks):
        s = torch.linspace(2.0, 1.0, r, dtype=F64) * (1 + 0.3 * t)
        fts.append(base + orthonormal(m, r, g) @ torch.diag(s) @ orthonormal(n, r, g).T)
    return base.to(dtype), [x.to(dtype) for x in fts]


def common_inputs(num_tasks, shape, dtype=torch.float32, seed=0, common_fraction=0.8):
    """tau_t = G diag(c) H^T + A_t diag(s_t) B_t^T: a k_c-dimensional part shared by every task
    (so the top-k_c subspace of sum_t tau_t is well separated) plus d task-specific directions
    (so the top-d subspace of each projected tau_t is too); k_c, d as Iso-CTS splits min(m, n)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    kc, d = ref.cts_split(min(m, n), num_tasks, common_fraction)
    base = 0.1 * torch.randn(m, n, generator=g, dtype=F64)
    shared = (
        orthonormal(m, kc, g) @ torch.diag(torch.linspace(3.0, 2.0, kc, dtype=F64)) @ orthonormal(n, kc, g).T
    )
    fts = []
    for t in range(num_tasks):
        s = torch.linspace(1.0, 0.7, d, dtype=F64) * (1 + 0.2 * t)
        fts.append(base + shared + orthonormal(m, d, g) @ torch.diag(s) @ orthonormal(n, d, g).T)
    return base.to(dtype), [x.to(dtype) for x in fts]


def designed_inputs(method, num_tasks, shape, dtype=torch.float32, seed=0):
    make = common_inputs if method == "iso_cts" else spectral_inputs
    return make(num_tasks, shape, dtype, seed)


def assert_matches(out, expected, base, rtol):
    """out (the method, in its dtype) vs the float64 reference: one rounding to out's dtype plus
    rtol times the largest entry of the reference's merged task vector."""
    assert out.shape == expected.shape
    o = out.detach().cpu().to(F64)
    assert torch.isfinite(o).all()
    scale = (expected - base.detach().cpu().to(F64)).abs().max()
    ulp = ULP.get(out.dtype, 2.0**-50)
    tol = 2 * ulp * expected.abs() + rtol * scale + 1e-12
    err = (o - expected).abs()
    assert (err <= tol).all(), (
        f"max error {err.max().item():.3g}, {int((err > tol).sum())} of {err.numel()} over"
    )


def merged_delta(out, base):
    return out.to(F64) - base.to(F64)


# ----------------------------------------------------------------------------------------------
# The rank rules.
@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "expected"),
    [
        (9, 2, 0.8, (7, 1)),  # floor(7.2) = 7, 2 left over: 1 each
        (10, 3, 0.8, (7, 1)),  # k0 = 8, 2/3 rounds to 1: k_c shrinks to 7
        (16, 3, 0.8, (13, 1)),  # k0 = 12, 4/3 rounds to 1: k_c grows to 13
        (5, 2, 0.8, (5, 0)),  # k0 = 4, 1/2 rounds (half to even) to 0: all common, Iso-C
        (100, 8, 0.8, (84, 2)),  # 20/8 = 2.5 rounds to 2
        (100, 8, 0.75, (76, 3)),  # 25/8 = 3.125
        (768, 8, 0.8, (616, 19)),  # k0 = 614, 154/8 = 19.25
        (3, 2, 0.0, (1, 1)),  # 3/2 rounds to 2, capped at floor(3/2) = 1
        (1, 1, 0.8, (0, 1)),
        (2, 3, 0.8, (2, 0)),
        (12, 4, 1.0, (12, 0)),
        (12, 4, 0.0, (0, 3)),
        (10, 1, 0.3, (3, 7)),  # the decimal 0.3 * 10 = 3 (float gives 3.0000000000000004)
        (100, 2, 0.29, (28, 36)),  # k0 = 29 as written (float: 28.999...); 71/2 = 35.5 rounds to 36
    ],
)
def test_common_split_table(rank, tasks, fraction, expected):
    assert common_split(rank, tasks, fraction) == expected


def test_common_split_matches_reference_and_invariants():
    for fraction in (0.0, 0.1, 0.29, 0.3, 0.5, 0.8, 0.95, 1.0):
        for rank in range(1, 41):
            for tasks in range(1, 10):
                kc, d = common_split(rank, tasks, fraction)
                assert (kc, d) == ref.cts_split(rank, tasks, fraction), (rank, tasks, fraction)
                assert kc + tasks * d == rank and 0 <= kc <= rank and d >= 0
                # nearest even split to the requested k0 unless the cap at floor(rank / T) bites
                k0 = math.floor(Decimal(str(fraction)) * rank)
                assert d == rank // tasks or abs(kc - k0) <= tasks / 2


def test_tsv_rank():
    assert tsv_rank(17, 9, 2) == 4
    assert tsv_rank(9, 17, 3) == 3
    assert tsv_rank(4096, 4096, 8) == 512
    assert tsv_rank(2, 5, 3) == 1  # floor(2/3) = 0: one triplet per task instead
    assert tsv_rank(1, 1, 5) == 1


# ----------------------------------------------------------------------------------------------
# Against the float64 reference.
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MATRIX_SHAPES)
@pytest.mark.parametrize("tasks", [1, 2, 5])
def test_designed_inputs_match_reference(method, dtype, shape, tasks):
    fn, reference = METHODS[method]
    base, fts = designed_inputs(method, tasks, shape, dtype, seed=tasks)
    out = fn(base, fts, alpha=0.7)
    assert out.dtype == dtype and out.shape == shape
    assert_matches(out, reference(base, fts, alpha=0.7), base, RTOL_DESIGNED)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", [(17, 9), (9, 17), (33, 65), (40, 40)])
@pytest.mark.parametrize("tasks", [2, 4, 7])
def test_gaussian_inputs_match_reference(method, shape, tasks):
    fn, reference = METHODS[method]
    base, fts = make_inputs(tasks, shape, seed=10 + tasks)
    assert_matches(fn(base, fts), reference(base, fts), base, RTOL_GAUSSIAN)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", [(17, 9), (9, 17), (12, 12)])
def test_float64_svd_matches_reference_tightly(method, shape):
    fn, reference = METHODS[method]
    base, fts = make_inputs(3, shape, F64, seed=20)
    out = fn(base, fts, alpha=1.5, svd_dtype=F64)
    assert out.dtype == F64
    assert_matches(out, reference(base, fts, alpha=1.5, tau_dtype=F64), base, 1e-11)
    # float64 storage with the default float32 SVD: computed in float32, returned as float64
    out32 = fn(base, fts, alpha=1.5)
    assert out32.dtype == F64
    assert_matches(out32, reference(base, fts, alpha=1.5), base, RTOL_GAUSSIAN)


def test_designed_inputs_are_well_separated():
    """The premise of RTOL_DESIGNED: gaps where each method cuts are a sizeable share of the top."""
    for shape in MATRIX_SHAPES:
        for tasks in (1, 2, 3, 5):
            base, fts = spectral_inputs(tasks, shape, seed=tasks)
            k = tsv_rank(*shape, tasks)
            for tau in ref.taus(base, fts):
                s = torch.linalg.svdvals(tau)
                top = s[: k + 1]
                assert top.numel() < 2 or (top[:-1] - top[1:]).min() > 0.02 * s[0]
            base, fts = common_inputs(tasks, shape, seed=tasks)
            kc, d = ref.cts_split(min(shape), tasks)
            s = torch.linalg.svdvals(sum(ref.taus(base, fts)))
            if 0 < kc < s.numel():
                assert s[kc - 1] - s[kc] > 0.2 * s[0]
            _, values, _ = ref.iso_cts_parts(base, fts)
            assert torch.isfinite(values).all()


# ----------------------------------------------------------------------------------------------
# Properties the reference could share a mistake on.
def test_tsv_m_spectrum_is_the_kept_singular_values():
    """U_hat and V_hat have orthonormal columns, so the singular values of the merged task vector
    are exactly the kept ones. Without the polar step they are not."""
    base, fts = make_inputs(3, (19, 12), F64, seed=30, delta=1.0)
    k = tsv_rank(19, 12, 3)
    taus = ref.taus(base, fts, F64)
    kept = torch.cat([torch.linalg.svdvals(t)[:k] for t in taus]).sort(descending=True).values
    merged = merged_delta(tsv_m(base, fts, svd_dtype=F64), base)
    torch.testing.assert_close(torch.linalg.svdvals(merged)[: 3 * k], kept, rtol=1e-10, atol=1e-10)
    # the same stack without orthogonalisation has a different spectrum: the check can fail
    parts = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    u = torch.cat([p.U[:, :k] for p in parts], 1)
    vh = torch.cat([p.Vh[:k] for p in parts], 0)
    no_polar = u @ torch.diag(torch.cat([p.S[:k] for p in parts])) @ vh
    assert (torch.linalg.svdvals(no_polar)[: 3 * k] - kept).abs().max() > 1e-2


def test_polar_factor_is_orthonormal_and_nearest():
    g = torch.Generator().manual_seed(31)
    x = torch.randn(4, 13, 5, generator=g, dtype=F64)
    q = polar_factor(x)
    eye = torch.eye(5, dtype=F64).expand(4, 5, 5)
    torch.testing.assert_close(q.mT @ q, eye, rtol=0, atol=1e-12)
    # q^T x is symmetric positive definite (x = q h, the polar decomposition)
    h = q.mT @ x
    torch.testing.assert_close(h, h.mT, rtol=0, atol=1e-12)
    assert (torch.linalg.eigvalsh(h) > 0).all()
    # the wide case: orthonormal rows; and polar(x^T) = polar(x)^T
    torch.testing.assert_close(polar_factor(x.mT), q.mT, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(17, 9), (9, 17), (10, 10)])
def test_iso_c_spectrum_is_flat(shape):
    base, fts = make_inputs(4, shape, F64, seed=32, delta=1.0)
    total = sum(ref.taus(base, fts, F64))
    mean = torch.linalg.svdvals(total).mean()
    out = iso_c(base, fts, svd_dtype=F64)
    s = torch.linalg.svdvals(merged_delta(out, base))
    torch.testing.assert_close(s, mean.expand_as(s), rtol=1e-10, atol=0)
    # ... with the singular directions of the sum
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(merged_delta(out, base), mean * u @ vh, rtol=0, atol=1e-10)
    # in float32 too
    out32 = iso_c(base.float(), [x.float() for x in fts])
    s32 = torch.linalg.svdvals(merged_delta(out32, base.float()))
    torch.testing.assert_close(s32, mean.expand_as(s32), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(17, 9), (9, 17), (16, 16)])
def test_iso_cts_spectrum_and_projection_side(shape):
    """Every singular value of the merged task vector is the mean of the stacked ones, where the
    task-specific ones come from tau_t projected off the common subspace on the left. Projecting
    on the right gives a clearly different mean, so this test tells the sides apart."""
    base, fts = make_inputs(3, shape, F64, seed=33, delta=1.0)
    kc, d = common_split(min(shape), 3)
    assert kc > 0 and d > 0
    left = ref.iso_cts_parts(base, fts, tau_dtype=F64, side="left")[1].mean()
    right = ref.iso_cts_parts(base, fts, tau_dtype=F64, side="right")[1].mean()
    assert abs(left - right) > 1e-3 * left
    for out, rtol in ((iso_cts(base, fts, svd_dtype=F64), 1e-10), (iso_cts(base.float(), fts), 1e-5)):
        s = torch.linalg.svdvals(merged_delta(out, base))
        torch.testing.assert_close(s, left.expand_as(s), rtol=rtol, atol=0)


def test_iso_cts_keeps_the_common_subspace():
    """With the left projection the common left directions are orthogonal to the task-specific
    ones, so they survive the polar step unchanged: U_c^T U_hat = [I, 0]."""
    base, fts = common_inputs(3, (20, 12), F64, seed=34)
    u, s, v = ref.iso_cts_parts(base, fts, tau_dtype=F64)
    kc, _ = common_split(12, 3)
    u_hat = ref.polar(u)
    torch.testing.assert_close(u[:, :kc].T @ u_hat[:, :kc], torch.eye(kc, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        u[:, :kc].T @ u_hat[:, kc:], torch.zeros(kc, 12 - kc, dtype=F64), atol=1e-10, rtol=0
    )
    # and the method's output agrees with that construction
    expected = s.mean() * u_hat @ ref.polar(v).T
    torch.testing.assert_close(
        merged_delta(iso_cts(base, fts, svd_dtype=F64), base), expected, rtol=0, atol=1e-10
    )


# ----------------------------------------------------------------------------------------------
# Degenerate and limiting cases.
@pytest.mark.parametrize("shape", MATRIX_SHAPES)
def test_single_task(shape):
    base, fts = spectral_inputs(1, shape, seed=40)
    # TSV-M keeps every triplet of the one task: the fine-tuned tensor comes back
    assert_matches(tsv_m(base, fts), fts[0].to(F64), base, RTOL_DESIGNED)
    # Iso-CTS with one task: common + task-specific = the full SVD of tau, i.e. Iso-C
    assert_matches(iso_cts(base, fts), ref.iso_c(base, fts), base, RTOL_DESIGNED)
    assert_matches(iso_cts(base, fts, common_fraction=0.0), ref.iso_c(base, fts), base, RTOL_DESIGNED)


def test_iso_cts_without_task_specific_part_is_iso_c():
    base, fts = spectral_inputs(3, (9, 17), seed=41)
    assert torch.equal(iso_cts(base, fts, common_fraction=1.0), iso_c(base, fts))
    base, fts = spectral_inputs(2, (2, 3), seed=42)  # r = 2, T = 2: d = round(1/2) = 0
    assert common_split(2, 2) == (2, 0)
    assert torch.equal(iso_cts(base, fts), iso_c(base, fts))


@pytest.mark.parametrize(
    ("shape", "tasks"), [((1, 1), 2), ((1, 1), 3), ((2, 5), 3), ((5, 2), 4), ((3, 3), 7)]
)
def test_tsv_m_more_tasks_than_rank(shape, tasks):
    base, fts = make_inputs(tasks, shape, seed=43, delta=1.0)
    out = tsv_m(base, fts)
    assert_matches(out, ref.tsv_m(base, fts), base, RTOL_DESIGNED)
    if shape == (1, 1):  # one triplet per task, polar factors [u_t]/sqrt(T): the mean of tau
        mean = sum(ref.taus(base, fts)) / tasks
        assert_matches(out, base.to(F64) + mean, base, 1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_alpha_scales_the_merged_task_vector(method):
    fn, reference = METHODS[method]
    base, fts = designed_inputs(method, 3, (11, 7), seed=44)
    full = merged_delta(fn(base, fts), base)
    half = merged_delta(fn(base, fts, alpha=0.5), base)
    torch.testing.assert_close(half, 0.5 * full, rtol=0, atol=1e-6)
    assert torch.equal(fn(base, fts, alpha=0.0), base)
    assert_matches(fn(base, fts, alpha=-1.5), reference(base, fts, alpha=-1.5), base, RTOL_DESIGNED)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5, 7), (1, 1, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_other_ranks_get_the_mean(method, shape, dtype):
    fn, reference = METHODS[method]
    base, fts = make_inputs(3, shape, dtype, seed=45)
    out = fn(base, fts, alpha=0.8)
    assert out.dtype == dtype and out.shape == base.shape
    assert_matches(out, reference(base, fts, alpha=0.8), base, 1e-6)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", [(0, 5), (4, 0)])
def test_empty_matrices(method, shape):
    fn, _ = METHODS[method]
    base, fts = make_inputs(2, shape, seed=46)
    out = fn(base, fts)
    assert out.shape == shape and out.dtype == base.dtype
    out = BATCHED[method](base.unsqueeze(0), [x.unsqueeze(0) for x in fts])
    assert out.shape == (1, *shape)


# ----------------------------------------------------------------------------------------------
# Batching, layouts, dtypes.
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (17, 9), (9, 17)])
def test_batched_equals_per_tensor(method, shape):
    fn, reference = METHODS[method]
    layers = [designed_inputs(method, 3, shape, seed=50 + i) for i in range(4)]
    base = torch.stack([b for b, _ in layers])
    fts = [torch.stack([f[t] for _, f in layers]) for t in range(3)]
    out = BATCHED[method](base, fts, alpha=0.9)
    assert out.shape == (4, *shape)
    for i, (b, f) in enumerate(layers):
        # Per tensor is the batched code with L = 1, equal up to float32 SVD rounding: not bit for
        # bit, as LAPACK's last bits depend on where each matrix of a batch sits in memory.
        assert_matches(out[i], fn(b, f, alpha=0.9).to(F64), b, RTOL_SAME)
        assert_matches(out[i], reference(b, f, alpha=0.9), b, RTOL_DESIGNED)


@pytest.mark.parametrize("method", list(METHODS))
def test_non_contiguous_inputs(method):
    fn, reference = METHODS[method]
    base_t, fts_t = designed_inputs(method, 3, (9, 17), seed=60)
    # transposed views of (9, 17) matrices: (17, 9) tensors that are not contiguous
    base, fts = base_t.T, [x.T for x in fts_t]
    assert not base.is_contiguous()
    out = fn(base, fts)
    assert_matches(out, reference(base, fts), base, RTOL_DESIGNED)
    assert_matches(out, fn(base.contiguous(), [x.contiguous() for x in fts]).to(F64), base, RTOL_SAME)
    # and a strided batch for the batched function
    stack_b = torch.stack([base_t, base_t]).mT
    stack_f = [torch.stack([x, x]).mT for x in fts_t]
    out_b = BATCHED[method](stack_b, stack_f)
    assert_matches(out_b[1], out.to(F64), base, RTOL_SAME)


@pytest.mark.parametrize("method", list(METHODS))
def test_out_dtype_and_mixed_storage(method):
    fn, reference = METHODS[method]
    base, fts = designed_inputs(method, 2, (6, 10), torch.bfloat16, seed=61)
    out = fn(base, fts, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_matches(out, reference(base, fts), base, RTOL_DESIGNED)
    mixed = [fts[0], fts[1].float()]  # bf16 and fp32 fine-tuned tensors: result in base's dtype
    out = fn(base, mixed)
    assert out.dtype == torch.bfloat16
    assert_matches(out, reference(base, mixed), base, RTOL_DESIGNED)


# ----------------------------------------------------------------------------------------------
# Bad input.
@pytest.mark.parametrize("method", list(METHODS))
def test_input_errors(method):
    fn, _ = METHODS[method]
    batched = BATCHED[method]
    base, fts = make_inputs(2, (4, 5), seed=70)
    with pytest.raises(ValueError, match="finetuned is empty"):
        fn(base, [])
    with pytest.raises(ValueError, match=r"finetuned\[1\] has shape \(5, 4\) but base has \(4, 5\)"):
        fn(base, [fts[0], fts[1].reshape(5, 4)])
    with pytest.raises(TypeError, match="base has dtype torch.int64; merging needs floating-point"):
        fn(base.long(), [x.long() for x in fts])
    with pytest.raises(TypeError, match=r"finetuned\[0\] has dtype torch.int32"):
        fn(base, [fts[0].int(), fts[1]])
    with pytest.raises(ValueError, match=r"finetuned\[1\] is on meta"):
        fn(base, [fts[0], fts[1].to("meta")])
    with pytest.raises(TypeError, match="sequence of tensors"):
        fn(base, fts[0])
    with pytest.raises(ValueError, match="svd_dtype must be torch.float32 or torch.float64"):
        fn(base, fts, svd_dtype=torch.float16)
    with pytest.raises(TypeError, match="out_dtype must be a floating-point dtype"):
        fn(base, fts, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"base must be a \[L, m, n\] stack of matrices, got shape \(4, 5\)"):
        batched(base, fts)
    with pytest.raises(ValueError, match=rf"{method}: finetuned is empty"):
        batched(base.unsqueeze(0), [])


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), "0.8"])
def test_iso_cts_common_fraction_errors(fraction):
    base, fts = make_inputs(2, (4, 5), seed=71)
    with pytest.raises(ValueError, match=r"common_fraction must be in \[0, 1\]"):
        iso_cts(base, fts, common_fraction=fraction)
    with pytest.raises(ValueError, match=r"common_fraction must be in \[0, 1\]"):
        iso_cts(base.reshape(-1), [x.reshape(-1) for x in fts], common_fraction=fraction)
    with pytest.raises(ValueError, match=r"common_fraction must be in \[0, 1\]"):
        iso_cts_batched(base.unsqueeze(0), [x.unsqueeze(0) for x in fts], common_fraction=fraction)


# ----------------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference_and_cpu(method, dtype):
    fn, reference = METHODS[method]
    base, fts = designed_inputs(method, 3, (33, 20), dtype, seed=80)
    out = fn(base.cuda(), [x.cuda() for x in fts], alpha=0.6)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert_matches(out, reference(base, fts, alpha=0.6), base, RTOL_DESIGNED)
    assert_matches(out, fn(base, fts, alpha=0.6).to(F64), base, RTOL_DEVICES)
    # a batch of 5 copies (expanded, stride 0 over layers) gives 5 times the same merge
    stack = BATCHED[method](
        base.cuda().expand(5, -1, -1), [x.cuda().expand(5, -1, -1) for x in fts], alpha=0.6
    )
    for layer in stack:
        assert_matches(layer, out.cpu().to(F64), base, RTOL_SAME)
