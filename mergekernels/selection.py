"""Exact magnitude selection: the k-th largest |tau| per task, by two radix-histogram passes.

|tau| is a non-negative float32, so its IEEE bit pattern orders like its value. Pass 0 counts the
top 16 bits into 65,536 bins per task; the bin holding the k-th largest value is found from the
counts; pass 1 counts the low 15 bits of only the elements in that bin. The two digits give the
exact bit pattern a full sort would find: O(n) work, no sort, no index buffer, and the result does
not depend on chunking. The streaming form (:class:`MagnitudeThreshold`) accumulates both passes
over any number of tensors, which gives a model-wide threshold (FusionBench's TIES) for the cost
of two reads of the model.

Per-tensor selection on small CPU tensors (at most ``SMALL_SELECT`` elements) uses
``torch.kthvalue`` (quickselect) on the float32 |tau| instead: the same exact value, without the
fixed cost of zeroing and scanning 65,536 bins per task, which dominates below that size. On CUDA
the radix select always runs: it is cheap there, and CUDA's ``kthvalue`` is refused under
``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from . import _ops, devices

# Elements per task at or below which per-tensor selection uses quickselect (see module docstring).
SMALL_SELECT = 1 << 16


def rank_for_density(density: float, numel: int) -> int:
    """Number of entries kept at `density` out of `numel`: max(1, floor(density * numel)), the
    count mergekit keeps (it ranks with argsort and keeps the first int(density * n)); 0 for an
    empty tensor."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return min(numel, max(1, math.floor(density * numel)))


def _locate(hist: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `hist` ([K, B] counts), the bin holding the rank-th largest entry (1-based) and
    the entry's rank inside that bin. Pure tensor ops: no host synchronisation."""
    bins = hist.shape[1]
    from_top = hist.flip(1).cumsum(1)
    idx = (from_top < rank[:, None]).sum(1)  # first position whose cumulative count reaches rank
    above = torch.where(idx > 0, from_top.gather(1, (idx - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    return (bins - 1 - idx), rank - above


def _bits_to_float(prefix: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    bits = (prefix << _ops.LEVEL1_BITS) | low
    return bits.to(torch.int32).view(torch.float32)


class MagnitudeThreshold:
    """Exact k-th largest |tau| per task over one or many tensors (streaming, two passes).

    Usage::

        sel = MagnitudeThreshold(num_tasks=len(finetuned), device=base.device)
        for base, finetuned in tensors:   # pass 0
            sel.count(base, finetuned)
        sel.set_density(0.2)              # or sel.set_rank(k)
        for base, finetuned in tensors:   # pass 1
            sel.refine(base, finetuned)
        thresholds = sel.thresholds()     # float32 [K]; keep |tau| >= thresholds[t]
    """

    def __init__(self, num_tasks: int, device: torch.device | str = "cpu"):
        self.num_tasks = num_tasks
        self.device = devices.concrete(device)
        self.numel = 0
        self._hist0 = torch.zeros(num_tasks, _ops.LEVEL0_BINS, dtype=torch.int64, device=self.device)
        self._hist1: torch.Tensor | None = None
        self._prefix: torch.Tensor | None = None
        self._rank_in_bin: torch.Tensor | None = None
        self._empty: torch.Tensor | None = None  # tasks asked for rank 0 (no entry selected)

    def _prepared(self, base, finetuned) -> _ops.Prepared:
        p = _ops.prepare(base, finetuned, "MagnitudeThreshold")
        if len(p.finetuned) != self.num_tasks:
            raise ValueError(
                f"MagnitudeThreshold: expected {self.num_tasks} fine-tuned tensors, got {len(p.finetuned)}"
            )
        if not devices.same(p.base.device, self.device):
            raise ValueError(
                f"MagnitudeThreshold: tensors are on {p.base.device}, the selector on {self.device}"
            )
        return p

    def count(self, base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> None:
        """Pass 0: add one tensor's |tau| to the coarse histogram."""
        if self._prefix is not None:
            raise RuntimeError("MagnitudeThreshold.count after set_rank: counting is pass 0")
        _ops.magnitude_histogram_(self._hist0, self._prepared(base, finetuned), 0, None)
        self.numel += base.numel()

    def set_density(self, density: float | Sequence[float]) -> None:
        densities = _ops.per_task(density, self.num_tasks, "density")
        self.set_rank([rank_for_density(d, self.numel) for d in densities])

    def set_rank(self, rank: int | Sequence[int]) -> None:
        """Select the rank-th largest |tau| (1-based; 0 selects nothing, threshold +inf)."""
        ranks = [int(rank)] * self.num_tasks if isinstance(rank, int) else [int(r) for r in rank]
        if len(ranks) != self.num_tasks or any(not 0 <= r <= self.numel for r in ranks):
            raise ValueError(f"ranks must be {self.num_tasks} values in [0, {self.numel}], got {ranks}")
        r = torch.tensor(ranks, dtype=torch.int64, device=self.device)
        self._empty = r == 0
        self._prefix, self._rank_in_bin = _locate(self._hist0, r.clamp(min=1))
        self._hist1 = torch.zeros(self.num_tasks, _ops.LEVEL1_BINS, dtype=torch.int64, device=self.device)

    def refine(self, base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> None:
        """Pass 1: count the low digits of the entries in each task's selected coarse bin."""
        if self._prefix is None:
            raise RuntimeError("MagnitudeThreshold.refine before set_rank/set_density")
        _ops.magnitude_histogram_(self._hist1, self._prepared(base, finetuned), 1, self._prefix)

    def all_reduce(self, reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Sum the current pass's counts over the torch.distributed ranks, each of which counted its
        own share of the tensors (call after each pass, before set_density / thresholds). ``reduce``
        sums one tensor in place over the ranks (default ``torch.distributed.all_reduce``)."""
        if reduce is None:
            import torch.distributed as dist

            reduce = dist.all_reduce
        if self._prefix is None:
            reduce(self._hist0)
            numel = torch.tensor([self.numel], dtype=torch.int64, device=self._hist0.device)
            reduce(numel)
            self.numel = int(numel.item())
        else:
            reduce(self._hist1)

    def thresholds(self) -> torch.Tensor:
        return self.thresholds_and_ties()[0]

    def thresholds_and_ties(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the rank-th largest |tau| per task, how many entries equal to it lie within the top rank,
        how many entries equal it in all): the last two say which ties an exact count keeps."""
        if self._hist1 is None:
            raise RuntimeError("MagnitudeThreshold.thresholds before refine")
        low, within = _locate(self._hist1, self._rank_in_bin)
        value = _bits_to_float(self._prefix, low)
        bins = self._hist1.shape[1]
        equal = self._hist1.gather(1, low.clamp(0, bins - 1)[:, None]).squeeze(1)
        equal = torch.where(low >= 0, equal, 0)  # an empty tensor has no bin
        zero = torch.zeros_like(equal)
        return (
            torch.where(self._empty, torch.full_like(value, math.inf), value),
            torch.where(self._empty, zero, within),
            torch.where(self._empty, zero, equal),
        )


def _kth_largest_small(p: _ops.Prepared, ranks: Iterable[Sequence[int]], ties: bool = False) -> list:
    n = p.base.numel()
    mags = torch.stack([(x.float() - p.base.float()).reshape(-1).abs() for x in p.finetuned])
    out = []
    for query in ranks:
        values = torch.stack(
            [
                mags[t].kthvalue(n - int(r) + 1).values if r > 0 else mags.new_tensor(math.inf)
                for t, r in enumerate(query)
            ]
        ).to(torch.float32)
        if not ties:
            out.append(values)
            continue
        equal = (mags == values[:, None]).sum(1)
        within = torch.tensor(query, dtype=torch.int64) - (mags > values[:, None]).sum(1)
        out.append((values, torch.where(values.isinf(), 0, within), torch.where(values.isinf(), 0, equal)))
    return out


def kth_largest_abs(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    ranks: Iterable[Sequence[int]],
    *,
    ties: bool = False,
) -> list:
    """For one tensor: the exact rank-th largest |tau| of every task, for several rank queries that
    share one coarse pass. `ranks` holds one per-task rank list per query (1-based, 0 = +inf). With
    ``ties``, each query gives (values, ties within the rank, ties in all) as
    :meth:`MagnitudeThreshold.thresholds_and_ties`."""
    p = _ops.prepare(base, finetuned, "kth_largest_abs")
    ranks = [list(q) for q in ranks]
    n = p.base.numel()
    for query in ranks:
        if len(query) != len(p.finetuned) or any(not 0 <= int(r) <= n for r in query):
            raise ValueError(f"ranks must be {len(p.finetuned)} values in [0, {n}], got {query}")
    if 0 < n <= SMALL_SELECT and p.base.device.type == "cpu":
        return _kth_largest_small(p, ranks, ties)
    sel = MagnitudeThreshold(len(p.finetuned), p.base.device)
    sel.count(p.base, p.finetuned)
    out = []
    for query in ranks:
        sel.set_rank(query)
        sel.refine(p.base, p.finetuned)
        out.append(sel.thresholds_and_ties() if ties else sel.thresholds())
    return out


def magnitude_threshold(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], density: float | Sequence[float]
) -> torch.Tensor:
    """Exact k-th largest |tau_t| per task with k = max(1, floor(density * numel)): keeping
    |tau| >= it keeps the top-density fraction (ties at the threshold kept)."""
    p = _ops.prepare(base, finetuned, "magnitude_threshold")
    densities = _ops.per_task(density, len(p.finetuned), "density")
    return kth_largest_abs(p.base, p.finetuned, [[rank_for_density(d, p.base.numel()) for d in densities]])[0]


class ThresholdPrepass:
    """Exact rank queries over a tensor read in chunks (or over a whole model read tensor by
    tensor), for the checkpoint engine.

    Pass 0 counts every chunk into the coarse histogram; pass i (i >= 1) refines query i - 1. The
    thresholds equal :func:`kth_largest_abs` on the whole tensor (the radix select does not depend on
    chunking), so a tensor too large for K full copies is merged in row chunks with the same result.
    ``assemble`` turns the list of per-query thresholds into the method's keyword arguments. With
    ``all_reduce`` (a function summing a tensor in place over the torch.distributed ranks), each rank
    counts its share and the counts are summed over the ranks at the end of every pass (a model-wide
    threshold).
    """

    def __init__(
        self,
        num_tasks: int,
        queries: Sequence[Sequence[int]],
        device: torch.device | str,
        assemble,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
        tie_requests: Callable[[list], list] | None = None,
    ):
        self.selector = MagnitudeThreshold(num_tasks, device)
        self.all_reduce = all_reduce
        self.queries = [list(q) for q in queries]
        # exact-k: one more pass locates the ties an exact count keeps (tie_requests turns the
        # queries' (values, within, equal) into TieLocator requests; assemble then gets the cuts)
        self.tie_requests = tie_requests
        self.passes = 1 + len(self.queries) + (tie_requests is not None)
        self.assemble = assemble
        self.results: list = []
        self.locator: TieLocator | None = None

    def update(
        self, index: int, base: torch.Tensor, finetuned: Sequence[torch.Tensor], element_offset: int
    ) -> None:
        if index == 0:
            self.selector.count(base, finetuned)
        elif index <= len(self.queries):
            self.selector.refine(base, finetuned)
        else:
            self.locator.update(base, finetuned, element_offset)

    def end_pass(self, index: int) -> None:
        if index > len(self.queries):
            return
        if self.all_reduce is not None:
            self.selector.all_reduce(self.all_reduce)
        if index > 0:
            found = self.selector.thresholds_and_ties()
            self.results.append(found if self.tie_requests is not None else found[0])
        if index < len(self.queries):
            self.selector.set_rank(self.queries[index])
        elif self.tie_requests is not None:
            self.locator = TieLocator(self.tie_requests(self.results))

    def params(self) -> dict:
        if self.tie_requests is None:
            return self.assemble(self.results)
        return self.assemble(self.results, self.locator.cuts())


NO_CUT = 2**63 - 1  # a tie cut that keeps every tie (trim)


class TieLocator:
    """Where the m-th entry equal to a value lies, by element index, over a tensor read in chunks
    in index order (or whole): for exact-k selection with ties broken by index.

    ``requests[t]`` lists (value, m) pairs for task t (m >= 1: the m-th tie, 1-based; m = 0: none).
    :meth:`cuts` gives, per request, the global index of that tie + 1 (0 for m = 0), so that the
    ties with index < cut are the first m.
    """

    STEP = 1 << 20

    def __init__(self, requests: Sequence[Sequence[tuple[float, int]]]):
        self.requests = [list(r) for r in requests]
        self.seen = [[0] * len(r) for r in self.requests]
        self.found: list[list[int | None]] = [[0 if m == 0 else None for _, m in r] for r in self.requests]

    def update(self, base: torch.Tensor, finetuned: Sequence[torch.Tensor], element_offset: int) -> None:
        # in pieces of STEP elements, stopping once every request of a task is found: the cut tie
        # usually lies well before the end, and the pieces keep the float32 |tau| temporaries small
        b = base.reshape(-1)
        for t, x in enumerate(finetuned):
            x = x.reshape(-1)
            for start in range(0, b.numel(), self.STEP):
                pending = [i for i, f in enumerate(self.found[t]) if f is None]
                if not pending:
                    break
                mags = (x[start : start + self.STEP].float() - b[start : start + self.STEP].float()).abs_()
                for i in pending:
                    value, m = self.requests[t][i]
                    equal = mags == value
                    count = int(equal.sum())
                    if self.seen[t][i] + count >= m:
                        position = equal.nonzero().squeeze(1)[m - self.seen[t][i] - 1]
                        self.found[t][i] = element_offset + start + int(position) + 1
                    self.seen[t][i] += count

    def cuts(self) -> list[list[int]]:
        missing = [(t, i) for t, f in enumerate(self.found) for i, c in enumerate(f) if c is None]
        if missing:
            raise RuntimeError(f"TieLocator: ties not found for (task, request) {missing[:3]}")
        return [[int(c) for c in f] for f in self.found]


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """float32 values -> int32 keys that order like the values (-0 below +0; NaN with a clear sign bit
    above +inf): the sign-magnitude bits made two's complement."""
    bits = values.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _high_digit(keys: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of the keys as bins 0 .. 65535 (the key offset by 2^31, made unsigned)."""
    return (keys >> 16) + (1 << 15)


def _key_to_float(key: int) -> float:
    signed = key - (1 << 31)  # the int32 key of _order_keys
    bits = signed ^ 0x7FFFFFFF if signed < 0 else signed
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32))


class ValueSelect:
    """Exact order statistics of float32 values that arrive in pieces (any sign; two passes of
    16-bit digits of their order-preserving keys): the selection for quantities the kernels do not
    form themselves (SCE's variances, Arcee Fusion's importances).

    Usage: ``count(piece)`` for every piece, ``set_ranks([r, ...])`` (1-based, from the largest),
    ``refine(piece)`` for every piece again, then ``results()``: per rank, the value and how many
    entries equal to it lie within the top r."""

    BITS = 16

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = devices.concrete(device)
        self.numel = 0
        self._hist0 = torch.zeros(1 << self.BITS, dtype=torch.int64, device=self.device)
        self._prefixes: list[int] | None = None
        self._within: list[int] = []
        self._hist1: torch.Tensor | None = None

    def count(self, values: torch.Tensor) -> None:
        high = _high_digit(_order_keys(values.reshape(-1)))
        self._hist0 += torch.bincount(high, minlength=1 << self.BITS)
        self.numel += values.numel()

    def set_ranks(self, ranks: Sequence[int]) -> None:
        if any(not 1 <= r <= self.numel for r in ranks):
            raise ValueError(f"ranks must lie in [1, {self.numel}], got {list(ranks)}")
        r = torch.tensor(list(ranks), dtype=torch.int64, device=self.device)
        prefix, within = _locate(self._hist0.expand(len(ranks), -1), r)
        self._prefixes, self._within = prefix.tolist(), within.tolist()
        self._hist1 = torch.zeros(len(ranks), 1 << self.BITS, dtype=torch.int64, device=self.device)

    def refine(self, values: torch.Tensor) -> None:
        keys = _order_keys(values.reshape(-1))
        high = _high_digit(keys)
        counted: dict[int, torch.Tensor] = {}  # ranks in one coarse bin share its low digits' counts
        for i, prefix in enumerate(self._prefixes):
            if prefix not in counted:
                low = keys[high == prefix] & 0xFFFF
                counted[prefix] = torch.bincount(low, minlength=1 << self.BITS)
            self._hist1[i] += counted[prefix]

    def results(self) -> list[tuple[float, int, int]]:
        """Per rank: (the value, how many entries equal to it lie within the top rank, how many entries
        equal it in all)."""
        rank = torch.tensor(self._within, dtype=torch.int64, device=self.device)
        low, within = _locate(self._hist1, rank)
        equal = self._hist1.gather(1, low[:, None]).squeeze(1)
        return [
            (_key_to_float((p << self.BITS) | int(lo)), int(w), int(e))
            for p, lo, w, e in zip(self._prefixes, low.tolist(), within.tolist(), equal.tolist(), strict=True)
        ]
