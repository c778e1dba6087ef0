"""The CUDA kernels against the CPU kernels, on every kernel family and mode: through the host emulation
of the CUDA execution model (tests/cuda_emulation.py, csrc/cuda/emulation.h) on every run, and on a
real GPU as well when one is present (the ``cuda`` backend; skipped without one).

Both sides are called with identical arguments (the libraries share their op schemas). Merged values,
masks, histograms and counts must be equal bit for bit. Float64 sums that the GPU accumulates in a
different order (norms, Grams, energies) must agree within the rounding of a reordered sum on
random inputs, and bit for bit on "dyadic" inputs, whose sums are exact in any order. Emulated
launches run under a seeded random order of blocks and threads; grid sizing is varied through the
emulated multiprocessor count and a forced grid size.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import mergekernels as mk

from .conftest import DTYPES, make_inputs
from .cuda_emulation import load

CPU = torch.ops.mergekernels
U64 = 2.0**-53  # float64 unit roundoff

# (multiprocessors, grid_override): blocks sized to the work, few blocks walking a grid-stride loop,
# one block, and more blocks than there is work.
GRIDS = {"fit": (132, 0), "capped": (1, 0), "one_block": (132, 1), "surplus": (132, 61)}
SIZES = [1, 3, 4, 5, 255, 257, 4095, 4097]
OFFSETS = [0, 3, 4098]  # element_offset values, two of them not multiples of 4


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


class CudaOps:
    """torch.ops.mergekernels on the GPU, called with CPU tensors like the emulated library."""

    def __getattr__(self, op):
        kernel = getattr(CPU, op)

        def call(*args):
            moved = [_to(a, "cuda") for a in args]
            out = kernel(*moved)
            # arguments the schema marks as written (an in-place op's first, fused_merge's flags)
            for i, schema_arg in enumerate(kernel.default._schema.arguments[: len(moved)]):
                alias = schema_arg.alias_info
                if alias is not None and alias.is_write and isinstance(moved[i], torch.Tensor):
                    args[i].copy_(moved[i].cpu())
            return _to(out, "cpu")

        return call


HAS_GPU = torch.cuda.is_available() and mk.has_cuda_kernels()
# MK_EMULATION=0 (the GPU machine's script): the real kernels alone, without building the emulation.
EMULATION = os.environ.get("MK_EMULATION", "1") != "0"
BACKENDS = (["emulated"] if EMULATION else []) + (["cuda"] if HAS_GPU else [])


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return CudaOps() if request.param == "cuda" else load()


@pytest.fixture
def emu(request):
    """The emulated library: default device, a seeded random schedule (a seed per test), no forced grid."""
    if not EMULATION:
        pytest.skip("MK_EMULATION=0: the emulated build is not used")
    ops = load()
    ops.configure(132, "random", zlib.crc32(request.node.nodeid.encode()), 0)
    yield ops
    ops.configure(132, "random", 0, 0)


@pytest.fixture
def dev(request, backend):
    """The CUDA kernels under test: emulated (configured as ``emu``) or on the GPU."""
    if isinstance(backend, CudaOps):
        return backend
    return request.getfixturevalue("emu")


def use_grid(dev, grid: str, seed: int = 0) -> None:
    """Emulated grid sizing; on a real GPU the grid is the device's, so only "fit" runs there."""
    if isinstance(dev, CudaOps):
        if grid != "fit":
            pytest.skip("grid sizes other than the device's are emulation settings")
        return
    sms, forced = GRIDS[grid]
    dev.configure(sms, "random", seed, forced)


def dyadic_inputs(k, shape, dtype=torch.float32, seed=0):
    """Values on a grid of 2^-6 with |x| < 2, exact in bf16/fp16/fp32: every float64 sum of their
    differences and products is exact, whatever the order; many exact ties and zero deltas."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-88, 89, shape, generator=g).float() / 64
    fts = [base + torch.randint(-16, 17, shape, generator=g).float() / 64 for _ in range(k)]
    return base.to(dtype), [x.to(dtype) for x in fts]


def inputs(kind, k, n, dtype, seed):
    make = dyadic_inputs if kind == "dyadic" else make_inputs
    return make(k, (n,), dtype, seed=seed)


def assert_same(got, cpu, what=""):
    """Equal bit for bit (NaNs and signed zeros included)."""
    assert got.dtype == cpu.dtype and got.shape == cpu.shape, what
    if not torch.equal(
        got.contiguous().view(-1).view(torch.uint8), cpu.contiguous().view(-1).view(torch.uint8)
    ):
        diff = (got.double() - cpu.double()).abs()
        bad = int((got != cpu).sum())
        raise AssertionError(f"{what}: {bad} of {cpu.numel()} differ (max |diff| {diff.max().item():.3g})")


def assert_reordered_sum(got, cpu, terms, magnitude, what=""):
    """|a - b| <= 2 n u sum|x_i|: the bound on two orders of summing n float64 terms."""
    tol = 2 * max(terms, 1) * U64 * magnitude + 1e-300
    err = (got - cpu).abs()
    assert bool((err <= tol).all()), f"{what}: max error {err.max().item():.3g} over tolerance"


# ---------------------------------------------------------------------------------------------------
# Fused merges
def thresholds(base, fts, lower_rank, upper_rank=None):
    """[2, K] float32: per task, the |tau| at a rank (an actual value, so ties with it are tested)."""
    rows = []
    for x in fts:
        mags = (x.float() - base.float()).abs().flatten().sort().values
        lo = mags[min(int(lower_rank * (mags.numel() - 1)), mags.numel() - 1)]
        hi = mags[min(int(upper_rank * (mags.numel() - 1)), mags.numel() - 1)] if upper_rank else float("inf")
        rows.append((float(lo), float(hi)))
    return torch.tensor(rows, dtype=torch.float32).T.contiguous()


def fused_args(base, fts, **kw):
    """The fused_merge argument tuple, with the schema's defaults."""
    k = len(fts)
    return (
        base,
        list(fts),
        kw.get("weights", [1.0] * k),
        kw.get("scale", 1.0),
        kw.get("reduce", 0),
        kw.get("ties", False),
        kw.get("weighted_election", False),
        kw.get("sparsify", 0),
        kw.get("thresholds"),
        kw.get("keep_source", 0),
        kw.get("keep", []),
        kw.get("step", []),
        kw.get("post", []),
        kw.get("rescale_inverse", True),
        kw.get("row_keep"),
        kw.get("ranks", []),
        kw.get("seed", 11),
        kw.get("key", -123456789),
        kw.get("element_offset", 0),
        kw.get("row_len", 1),
        kw.get("out_dtype"),
        kw.get("tie_cuts", []),
        kw.get("base_scale"),
        kw.get("nonfinite"),
    )


def per_task(k, lo, hi):
    return [lo + (hi - lo) * t / max(k - 1, 1) for t in range(k)]


SUM, MEAN, WEIGHTED, ACTIVE = 0, 1, 2, 3
TRIM, BAND, DROP, CLIP = 1, 2, 3, 4
CONSTANT, ROW, RANK = 0, 1, 2


def mode_kwargs(mode, base, fts, offset):
    """Op arguments of one merge mode for these inputs (thresholds, ranks, row rates derived from them)."""
    k, n = len(fts), base.numel()
    w = per_task(k, 0.5, 2.0)
    keep = per_task(k, 0.2, 0.9)
    post = per_task(k, 1.3, 0.7)
    if mode.startswith("ta_"):
        reduce = {"ta_sum": SUM, "ta_mean": MEAN, "ta_weighted": WEIGHTED}[mode]
        return dict(weights=w, scale=0.7, reduce=reduce)
    if mode == "points":  # slerp / karcher: a combination of the inputs themselves
        return dict(weights=w, base_scale=-0.4)
    if mode == "clip":  # nearswap: each tau moved at most the task's threshold
        return dict(weights=w, sparsify=CLIP, thresholds=thresholds(base, fts, 0.5))
    if mode in ("active", "active_weighted"):  # RAM / RAM+: strict trim, mean of the active entries
        kw = dict(sparsify=TRIM, thresholds=thresholds(base, fts, 0.4), tie_cuts=[0] * (2 * k), reduce=ACTIVE)
        kw["weights"] = w if mode == "active_weighted" else [1.0] * k
        return kw
    if mode in ("ties_exact", "breadcrumbs_exact"):  # exact-k tie cuts by global element index
        trim = mode == "ties_exact"
        cuts = [offset + (n * (t + 1)) // (k + 2) for t in range(k)]
        return dict(
            weights=w,
            reduce=WEIGHTED,
            ties=True,
            weighted_election=True,
            sparsify=TRIM if trim else BAND,
            thresholds=thresholds(base, fts, 0.6) if trim else thresholds(base, fts, 0.3, 0.9),
            tie_cuts=cuts + ([0] * k if trim else [offset + n - c for c in cuts]),
        )
    if mode.startswith("ties_"):
        _, reduce, election = mode.split("_")
        return dict(
            weights=w,
            reduce={"sum": SUM, "mean": MEAN, "weighted": WEIGHTED}[reduce],
            ties=True,
            weighted_election=election == "welect",
            sparsify=TRIM,
            thresholds=thresholds(base, fts, 0.6),
        )
    if mode.startswith("dare_"):
        rescale = mode.split("_")[1]
        kw = dict(sparsify=DROP, keep=keep, rescale_inverse=rescale == "inverse", weights=w)
        if rescale == "l1":
            kw["post"] = post
        if mode.endswith("_ties"):
            kw.update(ties=True, reduce=WEIGHTED)
        return kw
    if mode.startswith("breadcrumbs"):
        kw = dict(sparsify=BAND, thresholds=thresholds(base, fts, 0.3, 0.9), weights=w)
        if mode.endswith("_ties"):
            kw.update(ties=True, reduce=MEAN)
        return kw
    if mode.startswith("della"):
        ranks = [CPU.row_ranks(base, x, n) for x in fts]
        kw = dict(
            sparsify=DROP, keep_source=RANK, keep=keep, step=[0.5 / n] * k, ranks=ranks, post=post, weights=w
        )
        if mode.endswith("_ties"):
            kw.update(ties=True, reduce=SUM)
        return kw
    if mode.startswith("rows"):
        row_len = 7
        rows = (offset + n + row_len - 1) // row_len + 2
        g = torch.Generator().manual_seed(n + offset)
        row_keep = torch.rand(k, rows, generator=g) * 0.9 + 0.05
        kw = dict(sparsify=DROP, keep_source=ROW, row_keep=row_keep, row_len=row_len, weights=w)
        if mode.endswith("_ties"):
            kw.update(ties=True, reduce=MEAN, weighted_election=True)
        return kw
    raise KeyError(mode)


MODES = [
    "ta_sum",
    "ta_mean",
    "ta_weighted",
    *[f"ties_{r}_{e}" for r in ("sum", "mean", "weighted") for e in ("elect", "welect")],
    "dare_inverse",
    "dare_plain",
    "dare_l1",
    "dare_inverse_ties",
    "dare_l1_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "ties_exact",
    "breadcrumbs_exact",
    "della",
    "della_ties",
    "rows",
    "rows_ties",
    "points",
    "clip",
    "active",
    "active_weighted",
]


def check_merge(dev, mode, kind, k, dtype, sizes, offsets, out_dtype=None, seed=0):
    for i, n in enumerate(sizes):
        base, fts = inputs(kind, k, n, dtype, seed + i)
        for offset in offsets:
            args = fused_args(
                base, fts, element_offset=offset, out_dtype=out_dtype, **mode_kwargs(mode, base, fts, offset)
            )
            assert_same(dev.fused_merge(*args), CPU.fused_merge(*args), f"{mode} n={n} offset={offset}")


@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_fused_merge_every_mode(dev, mode, dtype, k):
    kind = "dyadic" if k == 2 else "randn"
    check_merge(dev, mode, kind, k, dtype, SIZES, OFFSETS, seed=k)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["ta_weighted", "ties_mean_welect", "dare_l1_ties", "della"])
def test_fused_merge_output_dtypes(dev, mode, in_dtype, out_dtype):
    check_merge(dev, mode, "randn", 3, in_dtype, [5, 257, 4097], [3], out_dtype=out_dtype)


@pytest.mark.parametrize(
    "mode", ["ta_mean", "ties_weighted_welect", "dare_inverse_ties", "breadcrumbs", "rows"]
)
def test_fused_merge_64_experts(dev, mode):
    check_merge(dev, mode, "randn", 64, torch.bfloat16, [5, 257, 4097], [0, 3])


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("mode", ["ties_sum_elect", "dare_l1", "della_ties", "rows_ties"])
def test_fused_merge_grids(dev, mode, grid):
    use_grid(dev, grid, seed=7)
    check_merge(dev, mode, "randn", 3, torch.float16, [1, 255, 8191, 8193], [0, 4098])


# ---------------------------------------------------------------------------------------------------
# Masked drop and L1 norms of the drop
def drop_args(base, x, expert, source, n, offset, rescale):
    row_len = 5
    rows = (offset + n + row_len - 1) // row_len
    g = torch.Generator().manual_seed(n)
    return (
        base,
        x,
        expert,
        DROP,
        None,
        {"constant": CONSTANT, "row": ROW, "rank": RANK}[source],
        0.35,
        0.4 / n,
        1.25,
        rescale,
        torch.rand(1, rows, generator=g) if source == "row" else None,
        CPU.row_ranks(base, x, n) if source == "rank" else None,
        5,
        77,
        offset,
        row_len,
    )


def drop_args_for(base, x):
    return drop_args(base, x, 2, "constant", base.numel(), 0, True)


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("source", ["constant", "row", "rank"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_drop(dev, dtype, source, rescale, grid):
    use_grid(dev, grid, seed=3)
    for n in SIZES:
        base, (x,) = make_inputs(1, (n,), dtype, seed=n)
        for offset in OFFSETS:
            args = drop_args(base, x, 9, source, n, offset, rescale)
            assert_same(dev.masked_drop(*args), CPU.masked_drop(*args), f"{source} n={n} offset={offset}")


# 64 experts in 61 mostly idle blocks is slow to emulate; K = 7 covers the surplus grid.
@pytest.mark.parametrize(
    "k, grid", [(k, g) for k in (1, 2, 7, 64) for g in sorted(GRIDS) if (k, g) != (64, "surplus")]
)
@pytest.mark.parametrize("kind", ["randn", "dyadic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_drop_l1(dev, dtype, kind, k, grid):
    use_grid(dev, grid, seed=k)
    for n in [1, 5, 257, 4097] if k < 64 else [5, 4097]:
        base, fts = inputs(kind, k, n, dtype, seed=n)
        for offset in (0, 3):
            args = (base, fts, per_task(k, 0.1, 0.9), 3, 99, offset)
            got, want = dev.drop_l1(*args), CPU.drop_l1(*args)
            if kind == "dyadic":
                assert_same(got, want, f"n={n} offset={offset}")
            else:
                assert_reordered_sum(got, want, n, want, f"n={n} offset={offset}")


# ---------------------------------------------------------------------------------------------------
# Task-vector statistics and radix histograms
@pytest.mark.parametrize("grid", ["fit", "capped", "surplus"])
@pytest.mark.parametrize("histogram", [False, True])
@pytest.mark.parametrize("with_base", [True, False], ids=["tau", "points"])
@pytest.mark.parametrize("k", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tv_stats(dev, dtype, k, with_base, histogram, grid):
    use_grid(dev, grid, seed=k)
    for kind in ("randn", "dyadic"):
        for n in [1, 3, 257, 4095] if k < 64 else [3, 4097]:
            base, fts = inputs(kind, k, n, dtype, seed=n + k)
            base = base if with_base else None  # without a base: the statistics of the points
            got, want = dev.tv_stats(base, fts, histogram), CPU.tv_stats(base, fts, histogram)
            what = f"{kind} n={n}"
            for name, g, w in zip(["absmax", "nnz", "signs", "histogram"], got[1:], want[1:], strict=True):
                assert_same(g, w, f"{name} {what}")
            if kind == "dyadic":
                assert_same(got[0], want[0], f"gram {what}")
            else:
                norms = want[0].diagonal().sqrt()
                assert_reordered_sum(got[0], want[0], n, norms[:, None] * norms[None, :], f"gram {what}")


@pytest.mark.parametrize("grid", ["fit", "capped", "surplus"])
@pytest.mark.parametrize("k", [1, 3, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_element_variance(dev, dtype, k, grid):
    use_grid(dev, grid, seed=k)
    for n in [1, 3, 257, 4097]:
        base, fts = inputs("randn", k, n, dtype, seed=n + k)
        assert_same(dev.element_variance(base, fts), CPU.element_variance(base, fts), f"n={n}")


@pytest.mark.parametrize("grid", ["fit", "capped", "one_block", "surplus"])
@pytest.mark.parametrize("k", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_magnitude_histogram(dev, dtype, k, grid):
    use_grid(dev, grid, seed=k)
    for n in [1, 5, 4097] if k < 64 else [5, 257]:
        base, fts = make_inputs(k, (n,), dtype, seed=n)
        # Level 0 accumulates into counts already there.
        start = torch.randint(0, 5, (k, 1 << 16), generator=torch.Generator().manual_seed(n))
        h_emu, h_cpu = start.clone(), start.clone()
        dev.magnitude_histogram_(h_emu, base, fts, 0, None)
        CPU.magnitude_histogram_(h_cpu, base, fts, 0, None)
        assert_same(h_emu, h_cpu, f"level 0 n={n}")
        # Level 1 under the fullest level-0 bin of each task.
        prefix = (h_cpu - start).argmax(dim=1)
        l1_emu, l1_cpu = torch.zeros(k, 1 << 15, dtype=torch.long), torch.zeros(k, 1 << 15, dtype=torch.long)
        dev.magnitude_histogram_(l1_emu, base, fts, 1, prefix)
        CPU.magnitude_histogram_(l1_cpu, base, fts, 1, prefix)
        assert_same(l1_emu, l1_cpu, f"level 1 n={n}")
        assert int(l1_cpu.sum()) == int((h_cpu - start).max(dim=1).values.sum())


# ---------------------------------------------------------------------------------------------------
# Covariance moments and system assembly
@pytest.mark.parametrize("kind", ["randn", "dyadic"])
@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_covariance_moments(dev, dtype, k, kind):
    # Dyadic inputs with a power-of-two row count keep the column means, the centred values and
    # every energy exact, so they must match bit for bit.
    shapes = [(1, 1, 1), (2, 4, 5), (1, 32, 65), (3, 8, 31), (1, 4, 257)]
    if kind == "randn":
        shapes = [(1, 1, 1), (2, 3, 5), (1, 33, 65), (3, 9, 31), (1, 5, 257)]
    for layers, m, n in shapes:
        base, fts = inputs(kind, k, layers * m * n, dtype, seed=layers + m + n)
        base, fts = base.view(layers, m, n), [x.view(layers, m, n) for x in fts]
        got, want = dev.covariance_moments(base, fts), CPU.covariance_moments(base, fts)
        what = f"{kind} shape={(layers, m, n)}"
        if kind == "dyadic":
            for name, g, w in zip(["centred", "colmean", "energy", "centred_energy"], got, want, strict=True):
                assert_same(g, w, f"{name} {what}")
        else:
            # Column means are float64 sums in another order, rounded to float32: one ulp apart at most;
            # a centred value then moves by that ulp plus its own rounding.
            torch.testing.assert_close(got[1], want[1], rtol=2**-23, atol=1e-12)
            ulps = 2**-22 * (float(want[1].abs().max()) + float(want[0].abs().max()))
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=ulps + 1e-12)
            assert_reordered_sum(got[2], want[2], m * n, want[2], f"energy {what}")
            assert_reordered_sum(got[3], want[3], m * n, want[3], f"centred energy {what}")


@pytest.mark.parametrize("kind", ["randn", "dyadic"])
def test_covariance_assemble(dev, kind):
    g = torch.Generator().manual_seed(5)
    for layers, n in [(1, 1), (2, 3), (1, 255), (3, 257), (1, 300)]:
        x = torch.randn(layers, n + 2, n, generator=g)
        if kind == "dyadic":
            x = (x * 8).round() / 8
        gram = (x.transpose(1, 2) @ x).float()
        gram = (gram + gram.transpose(1, 2)) / 2  # exactly symmetric
        ridge = torch.rand(layers, generator=g, dtype=torch.float64)
        scale = torch.rand(layers, generator=g, dtype=torch.float64) + 0.5
        (sys_e, prior_e), (sys_c, prior_c) = (
            dev.covariance_assemble(gram, ridge, scale),
            CPU.covariance_assemble(gram, ridge, scale),
        )
        assert_same(sys_e, sys_c, f"system n={n}")
        if kind == "dyadic":
            assert_same(prior_e, prior_c, f"prior n={n}")
        else:
            magnitude = gram.double().abs().sum(2) / n / scale[:, None]
            assert_reordered_sum(prior_e, prior_c, n, magnitude, f"prior n={n}")


# ---------------------------------------------------------------------------------------------------
# Launch limits and run-to-run determinism
@pytest.mark.parametrize("histogram", [False, True])
def test_tv_stats_shared_memory_for_every_expert_count(dev, histogram):
    """K = 1..64: the kernel's whole shared memory is planned on the host and opted in to beyond the
    default 48 KiB (K = 24 with the histogram and K = 48 without sit exactly at the edge)."""
    for k in range(1, 65):
        base, fts = make_inputs(k, (3,), torch.bfloat16, seed=k)
        got, want = dev.tv_stats(base, fts, histogram), CPU.tv_stats(base, fts, histogram)
        for name, g, w in zip(["absmax", "nnz", "signs", "histogram"], got[1:], want[1:], strict=True):
            assert_same(g, w, f"{name} k={k}")
        norms = want[0].diagonal().sqrt()
        assert_reordered_sum(got[0], want[0], 3, norms[:, None] * norms[None, :], f"gram k={k}")


def test_tv_stats_beyond_the_device_shared_memory_is_a_clear_error(emu):
    emu.configure(132, "random", 0, 0, 65535, 64 * 1024)
    base, fts = make_inputs(64, (5,), seed=1)
    with pytest.raises(ValueError, match=r"64 fine-tuned tensors with the histogram need 131136 bytes"):
        emu.tv_stats(base, fts, True)
    assert emu.tv_stats(base, fts[:31], True)[1].shape == (31,)  # 31 * 2 KiB + 64 B fits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_covariance_moments_64_experts(dev, dtype):
    base, fts = dyadic_inputs(64, (2 * 4 * 37,), dtype, seed=6)
    base, fts = base.view(2, 4, 37), [x.view(2, 4, 37) for x in fts]
    got, want = dev.covariance_moments(base, fts), CPU.covariance_moments(base, fts)
    for name, g, w in zip(["centred", "colmean", "energy", "centred_energy"], got, want, strict=True):
        assert_same(g, w, name)


def test_covariance_moments_with_more_strips_than_grid_rows(emu):
    """Column strips beyond the device's gridDim.y limit (65535 on a GPU; 3 here) loop in the kernel."""
    emu.configure(132, "random", 0, 0, 3, 232448)
    base, fts = make_inputs(2, (2, 5, 32 * 7 + 5), seed=3)
    got, want = emu.covariance_moments(base, fts), CPU.covariance_moments(base, fts)
    assert_same(got[1], want[1], "colmean")
    assert_same(got[0], want[0], "centred")
    for g, w in zip(got[2:], want[2:], strict=True):
        assert_reordered_sum(g, w, 5 * 32 * 8, w, "energy")


def test_float64_sums_do_not_depend_on_the_block_order(dev):
    """drop_l1's L1 norms and tv_stats' Gram leave the blocks as partials summed in a fixed order: the
    same bits under every block order (emulated), and on every run (GPU)."""
    base, fts = make_inputs(5, (100_001,), torch.float32, seed=8)  # full mantissas: inexact sums
    drop_args = (base, fts, per_task(5, 0.1, 0.9), 3, 99, 7)
    runs = []
    for schedule in ("forward", "reverse", "random", "random"):
        if not isinstance(dev, CudaOps):
            dev.configure(132, schedule, len(runs), 0)  # about 100 blocks each
        runs.append((dev.drop_l1(*drop_args), dev.tv_stats(base, fts, False)[0]))
    for l1, gram in runs[1:]:
        assert_same(l1, runs[0][0], "drop_l1")
        assert_same(gram, runs[0][1], "gram")


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
def test_nan_outputs_are_canonical(dev, in_dtype, out_dtype):
    """Inputs with NaN and Inf (allow_nonfinite): merged and dropped values hold the same NaN bits on
    CPU and GPU (the canonical quiet NaN in every dtype)."""
    base, fts = make_inputs(3, (1031,), torch.float32, seed=4)
    base[::7] = float("nan")
    fts[0][1::11] = float("inf")
    fts[1][2::13] = -float("inf")
    fts[2][3::17] = float("nan")
    base, fts = base.to(in_dtype), [x.to(in_dtype) for x in fts]
    for mode in ("ta_mean", "ties_weighted_welect", "dare_l1", "breadcrumbs"):
        args = fused_args(base, fts, out_dtype=out_dtype, **mode_kwargs(mode, base, fts, 0))
        got, want = dev.fused_merge(*args), CPU.fused_merge(*args)
        assert bool(torch.isnan(want).any()), mode
        assert_same(got, want, mode)
    args = drop_args_for(base, fts[2])
    assert_same(dev.masked_drop(*args), CPU.masked_drop(*args), "masked_drop")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "mode", ["ta_sum", "ties_weighted_welect", "dare_inverse_ties", "breadcrumbs", "della"]
)
def test_fused_merge_reports_nonfinite_inputs(dev, mode, dtype):
    """The merge pass flags each input (base first) holding NaN or +-Inf, wherever it sits (in a
    block's tail, a dropped entry, past an element offset), equal on CPU and GPU and to a torch
    reference; the merged values are the same bits with and without the flags."""
    k = 3
    for n, offset in ((1, 0), (5, 3), (1031, 4098), (4097, 0)):
        for index, bad in [(None, None), (0, "nan"), (1, "inf"), (3, "-inf"), (2, "nan")]:
            base, fts = make_inputs(k, (n,), torch.float32, seed=n + (index or 0))
            inputs = [base, *fts]
            if index is not None:
                inputs[index][(n * 5) // 7] = float(bad)
            base, fts = inputs[0].to(dtype), [x.to(dtype) for x in inputs[1:]]
            want = torch.tensor(
                [int(not bool(torch.isfinite(x).all())) for x in (base, *fts)], dtype=torch.int32
            )
            kw = mode_kwargs(mode, base, fts, offset)
            plain = CPU.fused_merge(*fused_args(base, fts, element_offset=offset, **kw))
            for ops in (CPU, dev):
                flags = torch.zeros(k + 1, dtype=torch.int32)
                got = ops.fused_merge(*fused_args(base, fts, element_offset=offset, nonfinite=flags, **kw))
                assert torch.equal(flags, want), (mode, n, index, bad, flags)
                assert_same(got, plain, f"{mode} n={n} with flags")
    flags = torch.zeros(k, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"nonfinite must have shape \[4\]"):
        CPU.fused_merge(*fused_args(base, fts, nonfinite=flags))


def test_fused_merge_out_overload_writes_the_same_bits(emu):
    """``fused_merge.out`` (the engine's shard buffers) writes what ``fused_merge`` returns, inside
    the staged output's bounds, on CPU and through the CUDA kernels."""
    base, fts = make_inputs(3, (1031,), torch.bfloat16, seed=2)
    for out_dtype in (None, torch.float32):
        args = fused_args(base, fts, out_dtype=out_dtype, **mode_kwargs("ties_mean_welect", base, fts, 0))
        want = CPU.fused_merge(*args)
        for ops in (CPU, emu):
            out = torch.full_like(want, float("nan"))
            assert ops.fused_merge.out(*args, out=out) is None
            assert_same(out, want, f"{ops} {out_dtype}")
    with pytest.raises(RuntimeError, match="out is Float but out_dtype is BFloat16"):
        CPU.fused_merge.out(*fused_args(base, fts, out_dtype=torch.bfloat16), out=torch.empty(1031))


# ---------------------------------------------------------------------------------------------------
# The emulation itself
def test_every_schedule_gives_the_same_bits(emu):
    base, fts = dyadic_inputs(5, (3001,), torch.bfloat16, seed=1)
    args = fused_args(base, fts, **mode_kwargs("ties_mean_elect", base, fts, 0))
    results = []
    for schedule in ("forward", "reverse", "random"):
        emu.configure(1, schedule, 5, 0)
        results.append((emu.fused_merge(*args), emu.tv_stats(base, fts, True)))
    for merged, stats in results[1:]:
        assert_same(merged, results[0][0], "merge")
        for a, b in zip(stats, results[0][1], strict=True):
            assert_same(a, b, "stats")


def test_grid_sizing_is_exercised(emu):
    base, fts = make_inputs(2, (100_001,), seed=2)
    args = fused_args(base, fts)
    expected_blocks = {"fit": 98, "capped": 8, "one_block": 1, "surplus": 61}
    for grid, blocks in expected_blocks.items():
        use_grid(emu, grid)
        emu.take_counters()
        assert_same(emu.fused_merge(*args), CPU.fused_merge(*args), grid)
        launches, launched_blocks, threads, *_ = emu.take_counters()
        assert (launches, launched_blocks, threads) == (1, blocks, 256 * blocks), grid
    # tv_stats: K(K+1)/2 Gram slots over 256 threads, barriers per tile and shuffles in the block sums.
    use_grid(emu, "capped")
    emu.tv_stats(base, fts, True)
    launches, blocks, threads, barriers, shuffles = emu.take_counters()
    assert (launches, blocks) == (1, 2) and barriers > 2 * threads and shuffles == threads * 10


def test_races_show_and_barriers_prevent_them(emu):
    expected = (torch.arange(128) + 1) % 128
    emu.configure(132, "forward", 0, 0)
    assert torch.equal(emu.selftest("neighbour_barrier")[:256], torch.cat([expected, expected]).int())
    raced = emu.selftest("neighbour_race")[:256]
    assert int((raced == -1).sum()) >= 200, "threads read their neighbour's shared slot before it was written"


def test_shared_memory_starts_poisoned_in_every_block(emu):
    out = emu.selftest("static_shared")
    assert torch.equal(out[: 3 * 128], torch.full((3 * 128,), -1, dtype=torch.int32))


def test_static_and_dynamic_shared_memory_share_the_limit(emu):
    out = emu.selftest("static_plus_dynamic_under_48k")
    assert torch.equal(out[:256], torch.arange(256, dtype=torch.int32))


def test_warp_shuffles(emu):
    out = emu.selftest("shuffles").view(128, 4)
    v = torch.arange(128) + 1
    warps = v.view(4, 32)
    assert torch.equal(out[::32, 0], warps.sum(1).int())
    assert torch.equal(out[:, 1], warps.sum(1).repeat_interleave(32).int())
    assert torch.equal(out[:, 2], (warps[:, 5]).repeat_interleave(32).int())
    assert torch.equal(out[:, 3], warps.cumsum(1).flatten().int())


@pytest.mark.parametrize(
    "case, message",
    [
        ("exited_lane", "exited"),
        ("deadlock", "deadlock"),
        ("overrun", "dynamic shared memory written outside"),
        ("too_much_shared", "too much dynamic shared memory"),
        ("static_plus_dynamic_over_48k", "at least 1024 bytes static"),
        ("block_too_large", "invalid block"),
        ("grid_y_too_large", "invalid grid"),
    ],
)
def test_misuse_fails_the_launch(emu, case, message):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(case)
    # The error was consumed: the next launch succeeds.
    assert torch.equal(emu.selftest("opted_in_shared")[:128], torch.zeros(128, dtype=torch.int32))


def test_half_and_bfloat16_conversions_match_cuda(emu):
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for bf16, dtype in ((False, torch.float16), (True, torch.bfloat16)):
        # Widening: exact for all 65536 patterns; a NaN stays a NaN.
        widened = emu.widen_bits(every, bf16)
        reference = every.view(dtype).float()
        is_nan = torch.isnan(reference)
        assert torch.equal(widened[~is_nan].view(torch.int32), reference[~is_nan].view(torch.int32))
        assert bool(torch.isnan(widened[is_nan]).all())
        # Narrowing: every representable value, every midpoint between neighbours (ties to even)
        # and one float ulp either side of it, the overflow and underflow edges, random bit patterns.
        finite = widened[torch.isfinite(widened)].unique()
        mids = (finite[:-1].double() + finite[1:].double()) / 2
        mids = mids.float()
        near = torch.cat(
            [mids, mids.nextafter(torch.tensor(float("inf"))), mids.nextafter(torch.tensor(-float("inf")))]
        )
        g = torch.Generator().manual_seed(0)
        random_bits = torch.randint(-(2**31), 2**31, (1 << 20,), generator=g).to(torch.int32)
        # Zeros, infinities, half's largest value and overflow edge, its subnormal and underflow
        # edges, float's largest and smallest values.
        edge_list = [
            0.0,
            -0.0,
            float("inf"),
            65504.0,
            65519.996,
            65520.0,
            2.0**-24,
            2.0**-25,
            2.0**-25 * 1.0000001,
        ]
        edges = torch.tensor(edge_list + [3.4028235e38, 1e-45])
        values = torch.cat([finite, near, random_bits.view(torch.float32), edges, -edges])
        got = emu.narrow_bits(values, bf16)
        nan = torch.isnan(values)
        want = values.to(dtype).view(torch.int16)
        assert torch.equal(got[~nan], want[~nan]), "finite values round like CUDA's __float2*_rn"
        assert bool((got[nan] == 0x7FFF).all()), "NaN becomes CUDA's canonical 0x7fff"
