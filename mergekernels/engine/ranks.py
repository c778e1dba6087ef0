"""The ranks of a distributed merge (``torchrun``, or a process group the caller initialised): which
rank this process is, which GPU it drives, and synchronisation points that carry failures.

Every point where ranks wait for each other (and every collective, which is preceded by one) is a
rendezvous through the process group's key-value store rather than a collective: a rank that fails
publishes its error in the store, and every other rank, waiting at a rendezvous or checking between
units of work, raises :class:`RankFailed` naming the failed rank and its error. So no rank is ever
left waiting in a collective that a failed rank will never join, whatever the backend (NCCL does
not notice a dead peer).
"""

from __future__ import annotations

import inspect
import itertools
import os
import time
from dataclasses import dataclass, field

import torch

from .. import devices

POLL_SECONDS = 0.05  # longest sleep between two looks at the store while waiting
CHECK_SECONDS = 0.5  # least time between two failure checks from a work loop
_runs = itertools.count()  # distinct store keys for each merge a process runs


class RankFailed(RuntimeError):
    """Another rank of a distributed merge failed; this one stopped."""


def bind_gpu(device: str, backend: str) -> dict:
    """Select this rank's GPU before the process group starts (NCCL would otherwise put every rank's
    barrier on GPU 0) and return the process-group arguments that bind it (``device_id`` where this
    torch accepts it)."""
    if backend != "nccl":
        return {}
    gpu = devices.resolve(device if str(device).startswith("cuda") else "cuda")
    torch.cuda.set_device(gpu)
    import torch.distributed as dist

    if "device_id" in inspect.signature(dist.init_process_group).parameters:
        return {"device_id": gpu}
    return {}


def _default_store():
    """The key-value store of the default process group, or None where torch does not expose it."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


@dataclass
class Ranks:
    """This process's place in a distributed merge (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False
    store: object | None = None
    prefix: str = ""
    _points: int = 0
    _last_check: float = field(default=0.0, repr=False)

    @classmethod
    def start(cls, device: str) -> Ranks:
        """Join the process group the caller initialised, or, under ``torchrun`` (WORLD_SIZE > 1),
        start one: NCCL for GPU merges (each rank bound to its local GPU first), gloo otherwise."""
        import torch.distributed as dist

        if not dist.is_available():
            return cls()
        owns = False
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                return cls()
            gpu = device != "cpu" and torch.cuda.is_available()
            backend = "nccl" if gpu else "gloo"
            dist.init_process_group(backend, **bind_gpu(device, backend))
            owns = True
        if dist.get_world_size() == 1:
            return cls(owns_group=owns)
        prefix = f"mergekernels/{next(_runs)}/"
        return cls(dist.get_rank(), dist.get_world_size(), owns, _default_store(), prefix)

    # ---- failures ------------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> None:
        """Publish this rank's failure for the others (the first failure of the merge is the one named)."""
        if self.world == 1 or self.store is None or isinstance(exc, RankFailed):
            return
        try:
            if self.store.add(self.prefix + "failures", 1) == 1:
                message = f"rank {self.rank} failed: {type(exc).__name__}: {exc}"
                self.store.set(self.prefix + "failure", message)
        except Exception:  # noqa: BLE001 - the store itself is gone: nothing more to tell
            pass

    def _count(self, key: str, increment: int) -> int:
        """store.add, with a lost store (its host process gone) reported as a failed rank."""
        try:
            return self.store.add(self.prefix + key, increment)
        except Exception as exc:  # noqa: BLE001 - the store's own errors name no rank
            raise RankFailed(
                f"rank {self.rank} stopped: lost contact with the other ranks ({exc}); another rank has "
                "probably failed, see its output"
            ) from exc

    def _raise_if_failed(self) -> None:
        if self._count("failures", 0) == 0:
            return
        key = self.prefix + "failure"
        try:
            self.store.wait([key], _seconds(5))  # its writer adds the count first, then the message
            message = self.store.get(key).decode()
        except Exception:  # noqa: BLE001 - report the failure even without its message
            message = "another rank failed"
        raise RankFailed(f"rank {self.rank} stopped: {message}")

    def check(self) -> None:
        """From a work loop: raise RankFailed if another rank has failed (looks at most every
        CHECK_SECONDS)."""
        if self.world == 1 or self.store is None:
            return
        now = time.monotonic()
        if now - self._last_check >= CHECK_SECONDS:
            self._last_check = now
            self._raise_if_failed()

    # ---- synchronisation ---------------------------------------------------------------------------
    def sync(self) -> None:
        """Wait until every rank has reached this point (each rank's n-th sync meets the others' n-th);
        raise RankFailed as soon as any rank has failed."""
        if self.world == 1:
            return
        if self.store is None:
            import torch.distributed as dist

            dist.barrier()
            return
        key = f"sync{self._points}"
        self._points += 1
        self._count(key, 1)
        delay = 0.001
        while True:
            self._raise_if_failed()
            if self._count(key, 0) >= self.world:
                return
            time.sleep(delay)
            delay = min(2 * delay, POLL_SECONDS)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` in place over the ranks, once every rank is ready for it."""
        import torch.distributed as dist

        self.sync()
        dist.all_reduce(tensor)

    def close(self) -> None:
        """End the process group if this merge started it."""
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _seconds(value: float):
    import datetime

    return datetime.timedelta(seconds=value)
