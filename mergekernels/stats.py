"""Task-vector statistics in one fused pass (``mk.task_vector_stats``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import _ops


@dataclass
class TaskVectorStats:
    """Statistics of tau_t = finetuned_t - base over one tensor (or, summed with ``+``, a model).

    gram: [K, K] float64, <tau_i, tau_j>; its diagonal holds the squared norms.
    absmax: [K] float32, max |tau_t|.
    nnz: [K] int64, non-zero count per task.
    sign_agree / sign_any: elements whose non-zero tau_t all share one sign / elements with at
        least one non-zero tau_t.
    histogram: [K, 256] int64 counts of the IEEE exponent of |tau_t| (bin 0: zero and subnormal;
        bin e: 2^(e-127) <= |tau| < 2^(e-126)), or None.
    numel: elements per task.
    """

    gram: torch.Tensor
    absmax: torch.Tensor
    nnz: torch.Tensor
    sign_agree: int
    sign_any: int
    histogram: torch.Tensor | None
    numel: int

    @property
    def sq_norms(self) -> torch.Tensor:
        return torch.diagonal(self.gram).clone()

    @property
    def norms(self) -> torch.Tensor:
        return self.sq_norms.sqrt()

    @property
    def cosine(self) -> torch.Tensor:
        """[K, K] cosine similarity of the task vectors (0 where a norm is 0)."""
        n = self.norms
        denom = torch.outer(n, n)
        return torch.where(denom > 0, self.gram / torch.where(denom > 0, denom, 1.0), 0.0)

    @property
    def sign_agreement(self) -> float:
        """Fraction of the elements with a non-zero tau whose non-zero signs all agree (NaN if none)."""
        return self.sign_agree / self.sign_any if self.sign_any else math.nan

    @property
    def density(self) -> torch.Tensor:
        return self.nnz.to(torch.float64) / max(self.numel, 1)

    def __add__(self, other: TaskVectorStats) -> TaskVectorStats:
        hist = None
        if self.histogram is not None and other.histogram is not None:
            hist = self.histogram + other.histogram
        return TaskVectorStats(
            self.gram + other.gram,
            torch.maximum(self.absmax, other.absmax),
            self.nnz + other.nnz,
            self.sign_agree + other.sign_agree,
            self.sign_any + other.sign_any,
            hist,
            self.numel + other.numel,
        )


def task_vector_stats(
    base: torch.Tensor | None, finetuned: Sequence[torch.Tensor], *, histogram: bool = False
) -> TaskVectorStats:
    """One pass over base and the fine-tuned tensors; no task vector is materialised. With
    ``base=None`` the statistics are those of the tensors themselves (the origin as the base).
    Results are returned on the CPU."""
    gram, absmax, nnz, signs, hist = _ops.tv_stats(base, finetuned, histogram)
    signs = signs.cpu().tolist()
    return TaskVectorStats(
        gram.cpu(),
        absmax.cpu(),
        nnz.cpu(),
        int(signs[0]),
        int(signs[1]),
        hist.cpu() if histogram else None,
        (base if base is not None else finetuned[0]).numel(),
    )


def gram_matrix(tensors: Sequence[torch.Tensor], chunk: int = 1 << 20) -> torch.Tensor:
    """[K, K] float64 inner products <x_i, x_j> of K same-size tensors (flattened), in the fused
    statistics pass (float32 values, float64 products and sums; no copy of the inputs). float64
    tensors keep every bit, and more tensors than one kernel call takes are summed too: torch ops
    over ``chunk`` elements at a time. The task-vector Gram relative to a base is
    :func:`task_vector_stats`."""
    if len(tensors) <= _ops.MAX_EXPERTS and not any(t.dtype == torch.float64 for t in tensors):
        return _ops.tv_stats(None, tensors)[0].cpu()
    flat = [t.reshape(-1) for t in tensors]
    gram = torch.zeros(len(flat), len(flat), dtype=torch.float64, device=flat[0].device)
    for start in range(0, flat[0].numel(), chunk):
        x = torch.stack([t[start : start + chunk].double() for t in flat])
        gram += x @ x.T
    return gram.cpu()


class SumPrepass:
    """The engine's one-pass pre-pass for a chunked tensor whose method needs a quantity summed over
    the whole tensor: ``measure(base, finetuned, element_offset)`` of every row chunk, added up and
    handed to the method's chunk calls as ``params()[key]`` (DARE's L1 norms, a Gram, RAM+'s counts)."""

    passes = 1

    def __init__(
        self, key: str, measure: Callable[[torch.Tensor, Sequence[torch.Tensor], int], torch.Tensor]
    ):
        self.key, self.measure = key, measure
        self.total: torch.Tensor | None = None

    def update(
        self, index: int, base: torch.Tensor, finetuned: Sequence[torch.Tensor], element_offset: int
    ) -> None:
        part = self.measure(base, finetuned, element_offset)
        self.total = part if self.total is None else self.total + part

    def end_pass(self, index: int) -> None:
        pass

    def params(self) -> dict:
        return {self.key: self.total}


def gram_prepass(points: bool) -> SumPrepass:
    """The pre-pass of the methods that combine whole tensors by coefficients taken from a Gram matrix
    (slerp, nuslerp, multislerp, karcher, model_stock): ``gram``, of the models themselves
    ([base, *finetuned]) with ``points``, else of the task vectors."""
    if points:
        return SumPrepass("gram", lambda base, finetuned, _: gram_matrix([base, *finetuned]))
    return SumPrepass("gram", lambda base, finetuned, _: task_vector_stats(base, finetuned).gram)
