"""TIES and Breadcrumbs keeping exactly k entries (mergekit's count), ties at a threshold broken by
element index as a stable sort in mergekit's direction would: the same in one piece, in row chunks,
on the CPU and (emulated) CUDA."""

from __future__ import annotations

import pytest
import torch

import mergekernels as mk

from . import reference as ref


def tied(shape, k=3, seed=0, levels=5, dtype=torch.float32):
    """Task vectors taking a few distinct values (like bf16 layer norms): many ties everywhere. Dyadic
    values, so that task vectors and election sums are exact in float32 as in the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    base = (0.5 * torch.randint(-8, 9, shape, generator=g).float()).to(dtype)
    fts = [
        (base.float() + 0.25 * torch.randint(-levels, levels + 1, shape, generator=g).float()).to(dtype)
        for _ in range(k)
    ]
    return base, fts


@pytest.mark.parametrize("shape", [(1,), (7,), (37, 11), (64, 33)])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("merge", ["mean", "weighted"])
def test_ties_keeps_exactly_k(shape, density, merge):
    base, fts = tied(shape, seed=len(shape) + int(density * 10))
    weights = [1.0, 0.5, 2.0]
    out = mk.ties(
        base, fts, density=density, weights=weights, merge=merge, weighted_election=True, exact_k=True
    )
    want = ref.ties_exact(base, fts, density, weights, merge=merge, weighted_election=True)
    torch.testing.assert_close(out.double(), want.double(), rtol=1e-6, atol=1e-6)
    if density < 1 and base.numel() >= 100:  # the default keeps every tie: more than k here
        loose = mk.ties(base, fts, density=density, weights=weights, merge=merge, weighted_election=True)
        assert not torch.equal(loose, out)


@pytest.mark.parametrize("shape", [(9,), (40, 13)])
@pytest.mark.parametrize(("density", "gamma"), [(0.3, 0.1), (0.5, 0.0), (0.2, 0.3), (0.9, 0.05)])
@pytest.mark.parametrize("consensus", [None, "ties"])
def test_breadcrumbs_keeps_exactly_the_band(shape, density, gamma, consensus):
    base, fts = tied(shape, seed=3, levels=3)
    out = mk.breadcrumbs(base, fts, density=density, gamma=gamma, consensus=consensus, exact_k=True)
    want = ref.breadcrumbs_exact(base, fts, density, gamma, consensus=consensus)
    torch.testing.assert_close(out.double(), want.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_row_chunks_cut_the_same_ties(tmp_path, method):
    from safetensors.torch import load_file, save_file

    from mergekernels.engine import merge_checkpoints

    base, fts = tied((96, 40), seed=5, dtype=torch.bfloat16)
    for name, t in (("base", base), *((f"m{i}", x) for i, x in enumerate(fts))):
        (tmp_path / name).mkdir()
        save_file({"w": t, "v": t[0].clone()}, str(tmp_path / name / "model.safetensors"))
    params = {"density": 0.3} | ({"gamma": 0.1} if method != "ties" else {})
    cfg = {
        "merge_method": method,
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / f"m{i}"), "parameters": {"weight": 1.0}} for i in range(3)],
        "parameters": params,
        "dtype": "float32",
    }
    merge_checkpoints(cfg, tmp_path / "whole", device="cpu", quiet=True)
    merge_checkpoints(cfg, tmp_path / "chunks", device="cpu", quiet=True, chunk_bytes=1000)
    whole = load_file(str(tmp_path / "whole" / "model-00001-of-00001.safetensors"))
    chunks = load_file(str(tmp_path / "chunks" / "model-00001-of-00001.safetensors"))
    for name in whole:
        assert torch.equal(whole[name], chunks[name]), name


def test_tie_cut_is_found_in_any_piece_size(monkeypatch):
    from mergekernels import selection

    base, fts = tied((300, 41), seed=1)
    whole = mk.ties(base, fts, density=0.3, exact_k=True)
    monkeypatch.setattr(selection.TieLocator, "STEP", 97)  # pieces that split the ties anywhere
    assert torch.equal(mk.ties(base, fts, density=0.3, exact_k=True), whole)
    assert torch.equal(mk.breadcrumbs(base, fts, density=0.3, gamma=0.2, exact_k=True), ref_band(base, fts))


def ref_band(base, fts):
    return ref.breadcrumbs_exact(base, fts, 0.3, 0.2).to(base.dtype)
