"""CUDA kernels against the CPU kernels: masks and merges bit for bit, statistics within float64
rounding. Skipped without a GPU."""

import pytest
import torch

import mergekernels as mk

from .conftest import DTYPES, cuda, make_inputs

pytestmark = cuda

METHODS = {
    "ta": lambda b, f: mk.task_arithmetic(b, f, weights=[0.5, 1.0, 2.0], scale=0.7),
    "ties": lambda b, f: mk.ties(b, f, density=0.3, merge="mean"),
    "ties_weighted": lambda b, f: mk.ties(
        b, f, density=0.3, merge="weighted", weighted_election=True, weights=[1.0, 0.5, 2.0]
    ),
    "dare": lambda b, f: mk.dare(b, f, drop=0.7, seed=3, key="w"),
    "dare_ties_l1": lambda b, f: mk.dare(b, f, drop=0.5, seed=3, key="w", consensus="ties", rescale="l1"),
    "breadcrumbs": lambda b, f: mk.breadcrumbs(b, f, density=0.5, gamma=0.05),
    "della": lambda b, f: mk.della(b, f, seed=2, key="d"),
    "nearswap": lambda b, f: mk.nearswap(b, f[:1], t=0.01),
    "ram": lambda b, f: mk.ram(b, f, epsilon=0.005),
    "ramplus_tl": lambda b, f: mk.ramplus_tl(b, f, epsilon=0.005),
}

# Coefficients from float64 sums (Grams, energies, quantiles of torch ops) that the GPU adds in
# another order: equal within a rounding of the output.
CLOSE_METHODS = {
    "slerp": lambda b, f: mk.slerp(b, f[:1], t=0.3),
    "karcher": lambda b, f: mk.karcher(b, f),
    "multislerp": lambda b, f: mk.multislerp(b, f, weights=[1.0, 2.0, 0.5]),
    "nuslerp_rows": lambda b, f: mk.nuslerp(b, f[:2], flatten=False),
    "model_stock": lambda b, f: mk.model_stock(b, f),
    "sce": lambda b, f: mk.sce(b, f, select_topk=0.5),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1027,), (33, 65), (300, 1001)])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_equals_cpu_bitwise(dtype, shape, method):
    base, fts = make_inputs(3, shape, dtype, seed=1)
    cpu = METHODS[method](base, fts)
    gpu = METHODS[method](base.cuda(), [x.cuda() for x in fts])
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1027,), (33, 65), (300, 1001)])
@pytest.mark.parametrize("method", sorted(CLOSE_METHODS))
def test_cuda_close_to_cpu(dtype, shape, method):
    base, fts = make_inputs(3, shape, dtype, seed=2)
    cpu = CLOSE_METHODS[method](base, fts)
    gpu = CLOSE_METHODS[method](base.cuda(), [x.cuda() for x in fts])
    assert gpu.device.type == "cuda" and gpu.dtype == cpu.dtype
    ulp = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=ulp, atol=ulp * 1e-2)


def test_cuda_element_variance_equals_cpu():
    base, fts = make_inputs(5, (4099,), torch.bfloat16, seed=4, delta=0.1)
    cpu = mk._ops.element_variance(base, fts)
    assert torch.equal(mk._ops.element_variance(base.cuda(), [x.cuda() for x in fts]).cpu(), cpu)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_cuda_masks_equal_cpu(keep):
    base, (ft,) = make_inputs(1, (100_003,), seed=2)
    for offset in (0, 3, 4096):
        cpu = mk.masked_drop(base, ft, expert=5, keep=keep, seed=1, key="x", element_offset=offset)
        gpu = mk.masked_drop(
            base.cuda(), ft.cuda(), expert=5, keep=keep, seed=1, key="x", element_offset=offset
        )
        assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("k", [1, 8, 23, 64])
def test_cuda_stats_and_threshold(k):
    base, fts = make_inputs(k, (257, 129), torch.bfloat16, seed=3)
    cpu = mk.task_vector_stats(base, fts, histogram=True)
    gpu = mk.task_vector_stats(base.cuda(), [x.cuda() for x in fts], histogram=True)
    torch.testing.assert_close(gpu.gram, cpu.gram, rtol=1e-12, atol=1e-12)
    assert torch.equal(gpu.absmax, cpu.absmax) and torch.equal(gpu.nnz, cpu.nnz)
    assert (gpu.sign_agree, gpu.sign_any) == (cpu.sign_agree, cpu.sign_any)
    assert torch.equal(gpu.histogram, cpu.histogram)
    assert torch.equal(
        mk.magnitude_threshold(base.cuda(), [x.cuda() for x in fts], 0.2).cpu(),
        mk.magnitude_threshold(base, fts, 0.2),
    )


def test_cuda_row_ranks_equal_cpu():
    from mergekernels import _ops

    base, (ft,) = make_inputs(1, (33, 1001), torch.bfloat16, seed=4)
    assert torch.equal(_ops.row_ranks(base.cuda(), ft.cuda(), 1001).cpu(), _ops.row_ranks(base, ft, 1001))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1027,), (33, 65), (300, 1001)])
def test_cuda_arcee_fusion_differs_only_at_its_threshold(dtype, shape):
    """Arcee Fusion's float32 KL divergence (mergekit's arithmetic) cancels: on random rows it is
    good to about 0.5%, in another order on the GPU, so entries whose importance lies that close to
    the threshold may be taken from the other model on one device and not the other. Every other
    entry is equal, and the entries that differ are such near-ties in float64."""
    base, fts = make_inputs(3, shape, dtype, seed=2)
    cpu = mk.arcee_fusion(base, fts[:1])
    gpu = mk.arcee_fusion(base.cuda(), [fts[0].cuda()]).cpu()
    assert gpu.dtype == cpu.dtype
    differ = gpu != cpu
    assert int(differ.sum()) <= max(1, cpu.numel() // 1000)
    if differ.any():
        a, b = base.double(), fts[0].double()
        p, q = torch.softmax(b, -1) + 1e-8, torch.softmax(a, -1) + 1e-8
        importance = (b - a).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
        ordered = importance.reshape(-1).sort().values
        q1, median, q3 = (ordered[int(q * (ordered.numel() - 1))] for q in (0.25, 0.5, 0.75))
        threshold = median + 1.5 * (q3 - q1)
        near = (importance - threshold).abs() <= 0.02 * threshold
        assert bool(near[differ].all()), "an entry far from the threshold differs"
        assert bool(((cpu == base) ^ (gpu == base))[differ].all())  # one device kept the base
