"""Bad input gets a clear error that names the problem, never a crash inside a kernel."""

import pytest
import torch

import mergekernels as mk

from .conftest import make_inputs


@pytest.mark.parametrize(
    "fn",
    [
        mk.task_arithmetic,
        mk.ties,
        mk.dare,
        mk.breadcrumbs,
        mk.della,
        mk.task_vector_stats,
        lambda b, f: mk.magnitude_threshold(b, f, 0.5),
    ],
)
def test_common_input_errors(fn):
    base, fts = make_inputs(2, (4, 5), seed=1)
    with pytest.raises(ValueError, match="empty"):
        fn(base, [])
    with pytest.raises(ValueError, match=r"finetuned\[1\] has shape \(5, 4\)"):
        fn(base, [fts[0], fts[1].reshape(5, 4)])
    with pytest.raises(TypeError, match="floating-point"):
        fn(base.long(), [x.long() for x in fts])
    with pytest.raises(TypeError, match=r"finetuned\[0\] has dtype torch.int32"):
        fn(base, [fts[0].int(), fts[1]])
    with pytest.raises(ValueError, match=r"finetuned\[1\] is on meta"):
        fn(base, [fts[0], fts[1].to("meta")])
    with pytest.raises(TypeError, match="sequence of tensors"):
        fn(base, fts[0])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval(density):
    base, fts = make_inputs(2, (10,), seed=2)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        mk.ties(base, fts, density=density)


def test_method_parameter_errors():
    base, fts = make_inputs(2, (10,), seed=3)
    with pytest.raises(ValueError, match=r"drop must be in \[0, 1\)"):
        mk.dare(base, fts, drop=1.0)
    with pytest.raises(ValueError, match="merge must be one of"):
        mk.ties(base, fts, merge="median")
    with pytest.raises(ValueError, match="rescale must be"):
        mk.dare(base, fts, rescale="l2")
    with pytest.raises(ValueError, match="weights has 3 entries for 2"):
        mk.task_arithmetic(base, fts, weights=[1, 2, 3])
    with pytest.raises(ValueError, match=r"density \+- epsilon"):
        mk.della(base, fts, density=0.1, epsilon=0.15)
    with pytest.raises(ValueError, match="density \\+ gamma <= 1"):
        mk.breadcrumbs(base, fts, density=0.995, gamma=0.01)
    with pytest.raises(ValueError, match="consensus must be"):
        mk.dare(base, fts, consensus="mean")
    with pytest.raises(ValueError, match="at most 64"):
        mk.task_arithmetic(base, [fts[0]] * 65)


def test_op_level_checks_name_the_argument():
    base, fts = make_inputs(2, (10,), seed=4)
    with pytest.raises(RuntimeError, match=r"finetuned\[1\] has shape"):
        torch.ops.mergekernels.tv_stats(base, [fts[0], fts[1][:5]], False)
    with pytest.raises(RuntimeError, match="hist must be a contiguous int64 tensor"):
        torch.ops.mergekernels.magnitude_histogram_(torch.zeros(2, 5, dtype=torch.int64), base, fts, 0, None)
    with pytest.raises(RuntimeError, match="thresholds must have shape"):
        torch.ops.mergekernels.fused_merge(
            base,
            fts,
            [],
            1.0,
            0,
            True,
            False,
            1,
            torch.zeros(3),
            0,
            [],
            [],
            [],
            True,
            None,
            [],
            0,
            0,
            0,
            1,
            None,
        )
