"""Page-locked staging of inputs for host-to-GPU copies: one buffer, allocated once and reused.

The reader copies each unit's tensors into the buffer, the compute thread starts their asynchronous
copies to the GPU and hands the region back with an event that completes when the copies have.
Units are staged and handed back in the same order, so the buffer is a ring: a region is reused
once the copies out of it have finished. Host memory held for staging is the buffer's size, fixed;
pinning each tensor separately would leave a pinned copy of every unit in torch's pinned-memory
cache. A unit larger than the whole buffer is handed over unpinned (its copy is then synchronous).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch

ALIGN = 64  # bytes: every staged tensor starts on a cache line


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class _Region:
    start: int
    end: int
    event: object | None = None  # a torch.cuda.Event once handed back; None while in use
    returned: bool = False


class PinnedStaging:
    """A ring of `capacity` bytes of page-locked memory (plain memory with ``pin=False``, for tests)."""

    def __init__(self, capacity: int, *, pin: bool = True):
        self.capacity = _aligned(max(capacity, ALIGN))
        self.buffer = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=pin)
        self._regions: deque[_Region] = deque()
        self._cond = threading.Condition()
        self._head = 0  # where the next region starts

    def stage(self, tensors: list[torch.Tensor], stop: threading.Event | None = None):
        """(copies of `tensors` in the buffer, a token for :meth:`give_back`), waiting for room;
        ``(tensors, None)`` unchanged when they cannot fit the whole buffer; None if `stop` is set."""
        nbytes = max(ALIGN, sum(_aligned(t.numel() * t.element_size()) for t in tensors))
        if nbytes > self.capacity:
            return tensors, None
        region = self._allocate(nbytes, stop)
        if region is None:
            return None
        copies, offset = [], region.start
        for t in tensors:
            size = t.numel() * t.element_size()
            view = self.buffer[offset : offset + size].view(t.dtype).view(t.shape)
            view.copy_(t)
            copies.append(view)
            offset += _aligned(size)
        return copies, region

    def give_back(self, token, event=None) -> None:
        """The staged copies of `token` are no longer read once `event` (a CUDA event recorded after
        their copies were issued; None: at once) completes."""
        if token is None:
            return
        with self._cond:
            token.event, token.returned = event, True
            self._cond.notify_all()

    @property
    def used(self) -> int:
        """Bytes in regions not yet reusable."""
        with self._cond:
            return sum(r.end - r.start for r in self._regions)

    def _allocate(self, nbytes: int, stop: threading.Event | None) -> _Region | None:
        with self._cond:
            while True:
                self._reclaim()
                start = self._fit(nbytes)
                if start is not None:
                    region = _Region(start, start + nbytes)
                    self._regions.append(region)
                    self._head = region.end
                    return region
                if stop is not None and stop.is_set():
                    return None
                oldest = self._regions[0]
                if oldest.returned and oldest.event is not None:
                    oldest.event.synchronize()  # its copies are the only thing in the way
                    oldest.event = None
                else:
                    self._cond.wait(0.1)

    def _reclaim(self) -> None:
        """Drop the oldest regions that are handed back and whose copies have finished."""
        while self._regions:
            r = self._regions[0]
            if not r.returned or (r.event is not None and not r.event.query()):
                return
            self._regions.popleft()
        self._head = 0  # empty ring: start again at the front

    def _fit(self, nbytes: int) -> int | None:
        """Start of a free stretch of nbytes after the newest region, wrapping to the front."""
        if not self._regions:
            return 0
        oldest, head = self._regions[0].start, self._head
        if head > oldest:  # in use: [oldest, head); free: [head, capacity) and [0, oldest)
            if head + nbytes <= self.capacity:
                return head
            return 0 if nbytes <= oldest else None
        return head if head + nbytes <= oldest else None  # wrapped: free is [head, oldest)
