"""The counter-based generator: known-answer vectors, the kernel's masks against an independent
Python Philox, the statistics of the keep decisions and their invariance to chunking."""

import numpy as np
import pytest
import torch

import mergekernels as mk

from . import reference as ref
from .conftest import DTYPES, make_inputs


@pytest.mark.parametrize(
    ("ctr", "key", "expected"),
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_reference_philox_known_answers(ctr, key, expected):
    out = ref.philox4x32_10(*[np.array([c], dtype=np.uint64) for c in ctr], *key)
    assert tuple(int(w[0]) for w in out) == expected


@pytest.mark.parametrize("n", [1, 5, 1023, 4099])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_kernel_masks_match_independent_philox(n, keep):
    base, (ft,) = make_inputs(1, (n,), seed=n)
    for expert in (0, 3):
        out = mk.masked_drop(base, ft, expert=expert, keep=keep, seed=1234, key="layers.0.mlp.weight")
        u = ref.uniforms(1234, "layers.0.mlp.weight", expert, 0, n)
        expected = torch.from_numpy(u < np.float32(keep))
        assert torch.equal(out != 0, expected & ((ft.float() - base.float()) != 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kept_values_are_exactly_rescaled(dtype):
    base, (ft,) = make_inputs(1, (4097,), dtype=dtype, seed=3)
    drop = 0.7
    out = mk.masked_drop(base, ft, expert=0, keep=1 - drop, seed=5, key=9)
    tau = ft.float() - base.float()
    kept = out != 0
    assert kept.any()
    q = torch.tensor(1 - drop, dtype=torch.float32)
    assert torch.equal(out[kept], tau[kept] / q)


def test_kept_fraction_is_statistically_right():
    n = 200_000
    base, (ft,) = make_inputs(1, (n,), seed=4)
    for keep in (0.05, 0.3, 0.9):
        frac = (mk.masked_drop(base, ft, expert=2, keep=keep, seed=7, key="w") != 0).double().mean().item()
        sigma = (keep * (1 - keep) / n) ** 0.5
        assert abs(frac - keep) < 6 * sigma, (keep, frac)


def test_same_seed_same_mask_different_seed_or_expert_differs():
    base, (ft,) = make_inputs(1, (10_000,), seed=5)

    def mask(**kw):
        return mk.masked_drop(base, ft, keep=0.5, **{"expert": 0, "seed": 1, "key": "a", **kw}) != 0

    assert torch.equal(mask(), mask())
    assert not torch.equal(mask(), mask(seed=2))
    assert not torch.equal(mask(), mask(expert=1))
    assert not torch.equal(mask(), mask(key="b"))


@pytest.mark.parametrize("cuts", [[0, 1, 9_999], [0, 3, 4, 5, 4097, 9_999], [0, 1024, 2048, 7777]])
def test_chunked_equals_unchunked(cuts):
    n = 9_999
    base, fts = make_inputs(3, (n,), seed=6)
    whole = mk.dare(base, fts, drop=0.6, seed=11, key="t")
    edges = sorted({*cuts, n})
    spans = list(zip(edges[:-1], edges[1:], strict=True))
    pieces = {}
    for start, end in reversed(spans):  # any order: last chunk first
        pieces[start] = mk.dare(
            base[start:end], [x[start:end] for x in fts], drop=0.6, seed=11, key="t", element_offset=start
        )
    assert torch.equal(torch.cat([pieces[s] for s, _ in spans]), whole)


def test_tensor_key_is_stable_and_documented():
    assert mk.tensor_key("model.layers.0.self_attn.q_proj.weight") == mk.tensor_key(
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert mk.tensor_key("a") != mk.tensor_key("b")
    assert mk.tensor_key("a") % 2**64 == ref.name_key("a")


def _row_keep_merge(base, fts, row_keep, seed, key, r0=0):
    """fused_merge with per-row keep rates over rows r0.. of base (rows of base.shape[1] elements)."""
    from mergekernels import _ops

    cols = base.shape[1]
    return _ops.fused_merge(
        _ops.prepare(base[r0:], [x[r0:] for x in fts], "test"),
        weights=[1.0] * len(fts),
        sparsify="drop",
        keep_source="row",
        row_keep=row_keep,
        row_len=cols,
        seed=seed,
        key=key,
        element_offset=r0 * cols,
    )


def _row_keep_reference(base, fts, row_keep, seed, key):
    """float64 reference: theta_0 + sum_e (tau_e / q kept where the Philox uniform < q), q per row."""
    rows, cols = base.shape
    tau = ref.tau32(base, fts)
    expected = torch.zeros(rows * cols, dtype=torch.float64)
    for e in range(len(fts)):
        q = row_keep[e].repeat_interleave(cols)
        keep = torch.from_numpy(ref.uniforms(seed, key, e, 0, rows * cols)) < q
        expected += torch.where(keep, tau[e] / q, 0.0).double()
    return (base.double().reshape(-1) + expected).float().reshape(rows, cols)


def test_per_row_keep_rates_match_reference():
    """The APL mode: one keep probability per (expert, row), survivors divided by it."""
    from mergekernels import _ops

    rows, cols, k = 13, 37, 3
    base, fts = make_inputs(k, (rows, cols), seed=12)
    g = torch.Generator().manual_seed(0)
    row_keep = (0.05 + 0.9 * torch.rand(k, rows, generator=g)).float()
    out = _row_keep_merge(base, fts, row_keep, 21, "apl")
    torch.testing.assert_close(out, _row_keep_reference(base, fts, row_keep, 21, "apl"), rtol=2e-6, atol=1e-6)
    tau = ref.tau32(base, fts)
    # the same through the single-expert op, chunked by rows
    single = _ops.masked_drop(
        base[5:],
        fts[1][5:],
        expert=1,
        keep=0.0,
        keep_source="row",
        row_keep=row_keep[1:2].contiguous(),
        row_len=cols,
        seed=21,
        key="apl",
        element_offset=5 * cols,
    )
    q1 = row_keep[1].repeat_interleave(cols)
    keep1 = torch.from_numpy(ref.uniforms(21, "apl", 1, 0, rows * cols)) < q1
    assert torch.equal(single.reshape(-1), torch.where(keep1, tau[1] / q1, 0.0)[5 * cols :])


@pytest.mark.parametrize(("rows", "cols"), [(50, 77), (3, 2000), (700, 3)])
def test_per_row_keep_rates_across_blocks_and_chunks(rows, cols):
    """Rows that straddle the kernel's 1024-element blocks, rows longer than a block, many rows per
    block: the full tensor equals the reference, and a row chunk (element offset) equals its rows."""
    k = 2
    base, fts = make_inputs(k, (rows, cols), seed=rows)
    row_keep = (0.05 + 0.9 * torch.rand(k, rows, generator=torch.Generator().manual_seed(1))).float()
    full = _row_keep_merge(base, fts, row_keep, 5, "rows")
    torch.testing.assert_close(
        full, _row_keep_reference(base, fts, row_keep, 5, "rows"), rtol=2e-6, atol=1e-6
    )
    r0 = rows // 3 + 1
    assert torch.equal(_row_keep_merge(base, fts, row_keep, 5, "rows", r0), full[r0:])
