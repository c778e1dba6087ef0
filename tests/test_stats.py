"""Fused task-vector statistics against the float64 reference."""

import pytest
import torch

import mergekernels as mk

from . import reference as ref
from .conftest import DTYPES, SHAPES, make_inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_stats_match_reference(dtype, shape, k):
    base, fts = make_inputs(k, shape, dtype, seed=hash((shape, k)) % 1000)
    # some exact zeros and a sign-agreeing column
    fts[0].view(-1)[::3] = base.view(-1)[::3]
    s = mk.task_vector_stats(base, fts, histogram=True)
    r = ref.stats(base, fts)
    torch.testing.assert_close(s.gram, r["gram"], rtol=1e-10, atol=1e-12)
    assert torch.equal(s.absmax, r["absmax"])
    assert torch.equal(s.nnz, r["nnz"])
    assert (s.sign_agree, s.sign_any) == (r["agree"], r["any"])
    assert torch.equal(s.histogram, r["hist"])
    assert s.numel == base.numel()
    assert 0.0 <= s.sign_agreement <= 1.0 or s.sign_any == 0


def test_stats_many_experts_and_non_contiguous():
    base, fts = make_inputs(19, (40, 30), seed=3)
    base_t, fts_t = base.t(), [x.t() for x in fts]  # non-contiguous views
    s = mk.task_vector_stats(base_t, fts_t)
    r = ref.stats(base_t.contiguous(), [x.contiguous() for x in fts_t])
    torch.testing.assert_close(s.gram, r["gram"], rtol=1e-10, atol=1e-12)
    assert s.histogram is None


def test_stats_add_over_tensors_equals_whole():
    base, fts = make_inputs(4, (1000,), seed=4)
    a = mk.task_vector_stats(base[:300], [x[:300] for x in fts], histogram=True)
    b = mk.task_vector_stats(base[300:], [x[300:] for x in fts], histogram=True)
    whole = mk.task_vector_stats(base, fts, histogram=True)
    torch.testing.assert_close((a + b).gram, whole.gram, rtol=1e-12, atol=1e-14)
    assert torch.equal((a + b).histogram, whole.histogram)
    assert (a + b).sign_agree == whole.sign_agree
    cos = whole.cosine
    assert torch.allclose(torch.diagonal(cos), torch.ones(4, dtype=torch.float64))


def test_identical_models_have_zero_stats():
    base, _ = make_inputs(1, (64,), seed=5)
    s = mk.task_vector_stats(base, [base.clone(), base.clone()])
    assert s.gram.abs().sum() == 0 and s.nnz.sum() == 0 and s.sign_any == 0
    assert torch.equal(s.cosine, torch.zeros(2, 2, dtype=torch.float64))
