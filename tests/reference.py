"""Float64 references written from ../shared/specs/baselines.md, independent of the kernels.

Decisions that depend on exact float32 values (which entries a threshold keeps, which a random
mask keeps) are made on tau computed in float32 exactly as the spec's accumulation rule implies
(tau = float32(theta_t) - float32(theta_0)); all arithmetic after them is float64.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Counter-based RNG, re-implemented from the Philox-4x32-10 definition (Salmon et al. 2011).
def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Vectorised over numpy uint64 arrays holding 32-bit values."""
    c = [np.asarray(v, dtype=np.uint64) & MASK32 for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k0,
            p1 & np.uint64(MASK32),
            (p0 >> np.uint64(32)) ^ c[3] ^ k1,
            p0 & np.uint64(MASK32),
        ]
        k0 = (k0 + np.uint64(0x9E3779B9)) & np.uint64(MASK32)
        k1 = (k1 + np.uint64(0xBB67AE85)) & np.uint64(MASK32)
    return c


def name_key(name: str | int) -> int:
    """Unsigned 64-bit tensor key: first 8 bytes (little endian) of BLAKE2b(name)."""
    if isinstance(name, int):
        return name & MASK64
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def uniforms(seed: int, key: str | int, expert: int, start: int, n: int) -> np.ndarray:
    """The float32 uniforms of elements start..start+n-1 of one expert."""
    k = splitmix64(splitmix64(seed & MASK64) ^ name_key(key))
    idx = np.arange(start, start + n, dtype=np.uint64)
    quad = idx >> np.uint64(2)
    words = philox4x32_10(
        quad & np.uint64(MASK32),
        quad >> np.uint64(32),
        np.full_like(quad, expert),
        np.zeros_like(quad),
        k & MASK32,
        k >> 32,
    )
    lane = (idx & np.uint64(3)).astype(np.int64)
    w = np.stack(words)[lane, np.arange(n)]
    return ((w >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
def tau32(base: torch.Tensor, finetuned) -> torch.Tensor:
    """[K, N] float32 task vectors, as the kernels form them."""
    b = base.detach().cpu().float().reshape(-1)
    return torch.stack([x.detach().cpu().float().reshape(-1) - b for x in finetuned])


def kth_largest(values: torch.Tensor, k: int) -> float:
    """k-th largest entry (1-based) of a 1-D tensor by a full sort; +inf for k = 0."""
    if k == 0:
        return math.inf
    return torch.sort(values, descending=True).values[k - 1].item()


def keep_count(density: float, n: int) -> int:
    return max(1, min(n, math.floor(density * n)))


def _weights(weights, k):
    if weights is None:
        return torch.ones(k, dtype=torch.float64)
    if isinstance(weights, (int, float)):
        return torch.full((k,), float(weights), dtype=torch.float64)
    return torch.tensor([float(w) for w in weights], dtype=torch.float64)


def _finish(base, merged, scale, out_dtype=None):
    out = base.detach().cpu().double().reshape(-1) + scale * merged
    return out.reshape(base.shape).to(out_dtype or base.dtype)


def reduce_plain(vals: torch.Tensor, w: torch.Tensor, merge: str) -> torch.Tensor:
    s = (w[:, None] * vals).sum(0)
    if merge == "sum":
        return s
    if merge == "mean":
        return s / vals.shape[0]
    ws = w.sum()
    return s if abs(ws) < 1e-8 else s / ws


def reduce_ties(vals: torch.Tensor, w: torch.Tensor, merge: str, weighted_election: bool) -> torch.Tensor:
    """Sign election (sum exactly 0 elects +) and disjoint merge, in float64."""
    elect_terms = w[:, None] * vals if weighted_election else vals
    sign = torch.where(elect_terms.sum(0) >= 0, 1.0, -1.0).double()
    agree = (vals != 0) & (torch.sign(vals) == sign)
    contrib = torch.where(agree, w[:, None] * vals, 0.0)
    s = contrib.sum(0)
    if merge == "sum":
        return s
    if merge == "mean":
        cnt = agree.sum(0).double()
        return torch.where(cnt > 0, s / cnt.clamp(min=1), 0.0)
    ws = torch.where(agree, w[:, None], 0.0).sum(0)
    return torch.where(ws.abs() < 1e-8, s, s / torch.where(ws.abs() < 1e-8, 1.0, ws))


def task_arithmetic(base, finetuned, weights=None, scale=1.0, normalize=False, out_dtype=None):
    t = tau32(base, finetuned).double()
    merged = reduce_plain(t, _weights(weights, len(finetuned)), "weighted" if normalize else "sum")
    return _finish(base, merged, scale, out_dtype)


def ties_thresholds(base, finetuned, density) -> list[float]:
    t = tau32(base, finetuned).abs()
    dens = [density] * len(finetuned) if isinstance(density, (int, float)) else density
    return [kth_largest(t[i], keep_count(d, t.shape[1])) for i, d in enumerate(dens)]


def ties(
    base,
    finetuned,
    density=0.2,
    weights=None,
    scale=1.0,
    merge="mean",
    weighted_election=False,
    thresholds=None,
    out_dtype=None,
):
    t = tau32(base, finetuned)
    thr = thresholds if thresholds is not None else ties_thresholds(base, finetuned, density)
    trimmed = torch.stack([torch.where(t[i].abs() >= thr[i], t[i], 0.0) for i in range(t.shape[0])]).double()
    merged = reduce_ties(trimmed, _weights(weights, len(finetuned)), merge, weighted_election)
    return _finish(base, merged, scale, out_dtype)


def exact_trim_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The first k of a stable descending sort of |tau| (ties: lowest indices first)."""
    keep = torch.zeros_like(magnitudes, dtype=torch.bool)
    keep[torch.sort(magnitudes, descending=True, stable=True).indices[:k]] = True
    return keep


def exact_band_mask(magnitudes: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's band made stable: positions [n_bot, n_bot + target) of a stable ascending sort."""
    n = magnitudes.numel()
    target, top = math.floor(density * n), math.floor(gamma * n)
    bottom = max(0, n - target - top)
    keep = torch.zeros_like(magnitudes, dtype=torch.bool)
    keep[torch.sort(magnitudes, stable=True).indices[bottom : bottom + target]] = True
    return keep


def ties_exact(base, finetuned, density=0.2, weights=None, scale=1.0, merge="mean", weighted_election=False):
    """TIES keeping exactly k = max(1, floor(density n)) entries per task (stable tie-breaking)."""
    t = tau32(base, finetuned)
    dens = [density] * len(finetuned) if isinstance(density, (int, float)) else density
    trimmed = torch.stack(
        [
            torch.where(exact_trim_mask(t[i].abs(), keep_count(d, t.shape[1])), t[i], 0.0)
            for i, d in enumerate(dens)
        ]
    ).double()
    merged = reduce_ties(trimmed, _weights(weights, len(finetuned)), merge, weighted_election)
    return _finish(base, merged, scale)


def breadcrumbs_exact(
    base, finetuned, density=0.9, gamma=0.01, weights=None, scale=1.0, consensus=None, merge=None
):
    """Breadcrumbs keeping exactly the band's count (mergekit's ascending sort, made stable)."""
    t = tau32(base, finetuned)
    vals = torch.stack(
        [torch.where(exact_band_mask(t[e].abs(), density, gamma), t[e], 0.0) for e in range(len(t))]
    )
    w = _weights(weights, len(finetuned))
    merge = merge or ("mean" if consensus else "sum")
    vals = vals.double()
    merged = reduce_ties(vals, w, merge, False) if consensus else reduce_plain(vals, w, merge)
    return _finish(base, merged, scale)


def dare_masks(n: int, k: int, drop, seed: int, key) -> torch.Tensor:
    drops = [drop] * k if isinstance(drop, (int, float)) else drop
    return torch.stack(
        [torch.from_numpy(uniforms(seed, key, e, 0, n) < np.float32(1.0 - drops[e])) for e in range(k)]
    )


def dare(
    base,
    finetuned,
    drop=0.9,
    weights=None,
    scale=1.0,
    seed=0,
    key=0,
    rescale=True,
    consensus=None,
    merge=None,
    weighted_election=False,
):
    t = tau32(base, finetuned)
    k, n = t.shape
    drops = [drop] * k if isinstance(drop, (int, float)) else drop
    masks = dare_masks(n, k, drops, seed, key)
    rows = []
    for e in range(k):
        q = torch.tensor(1.0 - drops[e], dtype=torch.float32)
        if rescale is True or rescale == "inverse":
            kept = torch.where(masks[e], t[e] / q, 0.0)  # float32 division, as specified
        else:
            kept = torch.where(masks[e], t[e], 0.0)
        kept = kept.double()
        if rescale == "l1":
            full, part = t[e].double().abs().sum(), kept.abs().sum()
            if full >= 1e-8 and part >= 1e-8:
                kept = kept * (full / part)
        rows.append(kept)
    vals = torch.stack(rows)
    w = _weights(weights, k)
    merge = merge or ("mean" if consensus else "sum")
    merged = reduce_ties(vals, w, merge, weighted_election) if consensus else reduce_plain(vals, w, merge)
    return _finish(base, merged, scale)


def breadcrumbs(
    base, finetuned, density=0.9, gamma=0.01, weights=None, scale=1.0, consensus=None, merge=None
):
    t = tau32(base, finetuned)
    k, n = t.shape
    rows = []
    for e in range(k):
        top = math.floor(gamma * n)
        lo = kth_largest(t[e].abs(), min(n, top + math.floor(density * n)))
        hi = kth_largest(t[e].abs(), top)
        m = t[e].abs()
        rows.append(torch.where((m >= lo) & (m < hi), t[e], 0.0))
    vals = torch.stack(rows).double()
    w = _weights(weights, k)
    merge = merge or ("mean" if consensus else "sum")
    merged = reduce_ties(vals, w, merge, False) if consensus else reduce_plain(vals, w, merge)
    return _finish(base, merged, scale)


def della(
    base,
    finetuned,
    density=0.5,
    epsilon=0.15,
    weights=None,
    scale=1.0,
    seed=0,
    key=0,
    consensus="ties",
    merge="mean",
):
    t = tau32(base, finetuned)
    k, n = t.shape
    shape = base.shape
    rows = shape[0] if len(shape) >= 2 and shape[0] > 0 else 1
    m = n // rows
    out = []
    for e in range(k):
        mags = t[e].abs().reshape(rows, m)
        # ascending magnitude rank, ties broken by position
        ranks = torch.empty(rows, m, dtype=torch.int64)
        for r in range(rows):
            order = sorted(range(m), key=lambda j, r=r: (mags[r, j].item(), j))
            for pos, j in enumerate(order):
                ranks[r, j] = pos
        lo = np.float32(density - epsilon if m > 1 else density)
        step = np.float32(2.0 * epsilon / (m - 1) if m > 1 else 0.0)
        q = (lo + step * ranks.reshape(-1).numpy().astype(np.float32)).astype(np.float32)
        u = uniforms(seed, key, e, 0, n)
        keep = torch.from_numpy(u < q)
        qt = torch.from_numpy(q)
        out.append(torch.where(keep, t[e] / qt, 0.0).double())
    vals = torch.stack(out)
    w = _weights(weights, k)
    merged = reduce_ties(vals, w, merge, False) if consensus else reduce_plain(vals, w, merge)
    return _finish(base, merged, scale)


def stats(base, finetuned):
    t = tau32(base, finetuned)
    td = t.double()
    gram = td @ td.T
    pos = (t > 0).any(0)
    neg = (t < 0).any(0)
    exps = (t.abs().view(torch.int32) >> 23).long()
    hist = torch.stack([torch.bincount(exps[i], minlength=256) for i in range(t.shape[0])])
    return {
        "gram": gram,
        "absmax": t.abs().amax(1),
        "nnz": (t != 0).sum(1),
        "agree": int((pos ^ neg).sum()),
        "any": int((pos | neg).sum()),
        "hist": hist,
    }
