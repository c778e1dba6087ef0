"""torch.library.opcheck for every op: schema, fake kernel and dispatcher registrations agree."""

import pytest
import torch

from mergekernels import _ops

from .conftest import DTYPES, make_inputs

OPS = torch.ops.mergekernels


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available() and _ops.has_cuda_kernels():
        devs.append("cuda")
    return devs


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_all_ops(device, dtype):
    base, fts = make_inputs(3, (5, 7), dtype, seed=1, device=device)
    k = len(fts)
    thr = torch.tensor([[0.0] * k, [float("inf")] * k], device=device)
    ranks = [torch.randperm(35, dtype=torch.int32).to(device) for _ in range(k)]
    row_keep = torch.full((k, 5), 0.5, device=device)
    ties = (  # the TIES arguments up to out_dtype
        base,
        fts,
        [1.0, 0.5, 2.0],
        0.9,
        1,
        True,
        False,
        1,
        thr,
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
    )
    cases = [
        (OPS.tv_stats, (base, fts, True)),
        (OPS.tv_stats, (base, fts, False)),
        (OPS.tv_stats, (None, fts, True)),  # the points themselves
        (OPS.element_variance, (base, fts)),
        (
            OPS.magnitude_histogram_,
            (torch.zeros(k, 1 << 16, dtype=torch.int64, device=device), base, fts, 0, None),
        ),
        (
            OPS.magnitude_histogram_,
            (
                torch.zeros(k, 1 << 15, dtype=torch.int64, device=device),
                base,
                fts,
                1,
                torch.zeros(k, dtype=torch.int64, device=device),
            ),
        ),
        (  # a combination of the points (base_scale), nearswap's clip, RAM's active mean
            OPS.fused_merge.default,
            (
                base,
                fts,
                [1.0, 0.5, 2.0],
                1.0,
                0,
                False,
                False,
                0,
                None,
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
                [],
                -0.5,
            ),
        ),
        (
            OPS.fused_merge.default,
            (base, fts, [], 1.0, 0, False, False, 4, thr, 0, [], [], [], True, None, [], 0, 0, 0, 1, None),
        ),
        (
            OPS.fused_merge.default,
            (
                base,
                fts,
                [1.2, 1.0, 1.1],
                1.0,
                3,
                False,
                False,
                1,
                thr,
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
                [0] * (2 * k),
            ),
        ),
        (OPS.fused_merge.default, (*ties, None)),  # TIES: trim, sign election, mean
        (
            OPS.fused_merge.default,
            (
                base,
                fts,
                [],
                1.0,
                0,
                False,
                False,
                3,
                None,
                0,
                [0.3, 0.5, 0.9],
                [],
                [],
                True,
                None,
                [],
                7,
                11,
                4,
                1,
                torch.float32,
            ),
        ),
        (
            OPS.fused_merge.default,
            (
                base,
                fts,
                [],
                1.0,
                2,
                True,
                True,
                3,
                None,
                1,
                [],
                [],
                [],
                True,
                row_keep,
                [],
                7,
                11,
                0,
                7,
                None,
            ),
        ),
        (
            OPS.fused_merge.default,
            (
                base,
                fts,
                [],
                1.0,
                1,
                True,
                False,
                3,
                None,
                2,
                [0.2] * k,
                [0.01] * k,
                [],
                True,
                None,
                ranks,
                7,
                11,
                0,
                7,
                None,
            ),
        ),
        (OPS.masked_drop, (base, fts[0], 2, 3, None, 0, 0.4, 0.0, 1.0, True, None, None, 1, 2, 0, 1)),
        (OPS.drop_l1, (base, fts, [0.5, 0.5, 0.5], 1, 2, 0)),
        (OPS.row_ranks, (base, fts[1], 7)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    # the NaN / Inf flags (mutated), and the out= overload the checkpoint engine writes shards with
    flags = torch.zeros(k + 1, dtype=torch.int32, device=device)
    torch.library.opcheck(OPS.fused_merge.default, (*ties, None, [], None, flags))
    out = torch.empty(base.shape, dtype=torch.float32, device=device)
    torch.library.opcheck(OPS.fused_merge.out, (*ties, torch.float32, [], None, flags), {"out": out})
    torch.library.opcheck(OPS.fused_merge.out, (*ties, None), {"out": torch.empty_like(base)})
