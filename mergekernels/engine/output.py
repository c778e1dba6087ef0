"""Step 4 of the pipeline, write: finished tensors gathered into their shards, written on a thread.

Each merged tensor goes, in its output dtype and on the host, into the shard the plan gave it. A
full shard is handed to the writer thread (atomic shard files, see
:class:`mergekernels.engine.writer.CheckpointWriter`); the compute step waits for the previous
shard's write first, so at most two shards are in memory: the one being written and the one being
filled. A write error stops the merge and is raised on the compute step.

Shards are filled in two buffers allocated once and reused (:meth:`ShardOutput.slot` gives a
tensor's place in its shard's buffer): the fused kernels write merged tensors straight into them,
and results from elsewhere (the GPU, other dtypes) are copied in. A fresh tensor-sized allocation
costs its page faults on every tensor (64 MB: 21 ms to fault in, against 2.5 ms to fill memory
already mapped, on the 2-core build machine); a reused buffer pays them once per merge.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Callable

import torch

from .writer import CheckpointWriter, Shard

ALIGN = 64  # bytes: every tensor in a shard buffer starts on a cache line


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return None


_LIBC = _libc()


def return_freed_memory() -> None:
    """Give the pages of freed buffers back to the OS (glibc's malloc_trim; no-op elsewhere).

    Tensor-sized buffers freed by the compute thread stay in glibc's heap arenas (its mmap threshold
    rises to 32 MB after the first large free), where the reader and compute threads fragment them:
    without a trim, peak RSS creeps up with the number of tensors merged. Trimming once per written
    shard keeps the growth to a few MB (measured, 2 experts of 4 MB tensors: +5 MB from 6 to 72
    tensors for task arithmetic and TIES) at no measurable cost; a fixed 128 KB mmap threshold did
    about as well but made every buffer fault in fresh pages (1.5-2x slower end to end on the 2-core
    build machine)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class ShardOutput:
    """Collects finished tensors per shard and writes full shards on a writer thread."""

    def __init__(
        self,
        writer: CheckpointWriter,
        shards: list[Shard],
        out_dtype: Callable[[str], torch.dtype],
        stop: threading.Event,
        progress: Callable[[int], None] | None = None,
    ):
        self.writer, self.out_dtype, self.stop, self.progress = writer, out_dtype, stop, progress
        self.shard_of = {n: s for s in shards for n in s.names}
        self.buffers: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        self._layouts = {s.index: _layout(s) for s in shards}
        self._storage: dict[int, torch.Tensor] = {}  # shard index -> its buffer while filled / written
        self._free: queue.Queue = queue.Queue()  # buffers whose shard is written, for reuse
        self._buffers_made = 0
        self.bytes_written = 0
        self.error: BaseException | None = None
        self._abandoned = False
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._write_loop, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def slot(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The place of tensor ``name`` (of this shape, in its output dtype) in its shard's buffer:
        a kernel that writes its result there spares :meth:`place` a copy and a fresh allocation."""
        shard = self.shard_of[name]
        if shard.index not in self._storage:
            self._storage[shard.index] = self._buffer(self._layouts[shard.index][1])
        offset, nbytes = self._layouts[shard.index][0][name]
        view = self._storage[shard.index][offset : offset + nbytes]
        return view.view(self.out_dtype(name)).view(shape)

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A shard buffer of at least nbytes: a written shard's, else a new one. Shards fill in order,
        so two buffers serve a whole merge (the one written and the one filled); a batched matrix
        group whose tensors span more shards gets more."""
        if self._free.empty() and self._buffers_made >= 2:
            self._queue.join()  # the shard being written gives its buffer back when done
            self.raise_if_failed()
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            buffer = None
        if buffer is not None and buffer.numel() >= nbytes:
            return buffer
        self._buffers_made += 1
        return torch.empty(nbytes, dtype=torch.uint8)

    def place(self, name: str, value: torch.Tensor) -> None:
        """Put a finished tensor into its shard; hand the shard over when it is full."""
        shard = self.shard_of[name]
        dtype = self.out_dtype(name)
        if value.device.type != "cpu" or value.dtype != dtype:  # into the shard buffer, converted
            value = self.slot(name, tuple(value.shape)).copy_(value)
        self.buffers[shard.index][name] = value
        if len(self.buffers[shard.index]) == len(shard.names):
            self._queue.join()  # at most two shards in memory
            self.raise_if_failed()
            self._queue.put((shard, self.buffers.pop(shard.index), self._storage.pop(shard.index, None)))

    def close(self) -> None:
        """Wait for the last write; raise its error if it failed."""
        self._queue.put(None)
        self.thread.join()
        self.raise_if_failed()

    def abandon(self, wait: bool = True) -> None:
        """Stop after the write in progress (the merge failed elsewhere). ``wait=False`` (an interrupt)
        returns at once: the shard being written is finished, or left as a temporary file that resume
        removes if the process ends first; a shard waiting for the thread is not written."""
        if wait:
            self._queue.put(None)
            self.thread.join()
            return
        self._abandoned = True
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # the thread takes the shard waiting there, sees _abandoned and leaves
            pass

    def _write_loop(self) -> None:
        # After a failure keep draining the queue, so the compute step never blocks on it.
        while True:
            item = self._queue.get()
            try:
                if item is None or self._abandoned:
                    return
                if self.error is not None:
                    continue
                shard, tensors, storage = item
                del item
                self.writer.write_shard(shard, tensors)
                tensors = None
                if storage is not None and self._free.qsize() < 2:
                    self._free.put(storage)
                return_freed_memory()
                self.bytes_written += shard.nbytes
                if self.progress is not None:
                    self.progress(shard.nbytes)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the compute step
                self.error = exc
                self.stop.set()
            finally:
                tensors = storage = None
                self._queue.task_done()


def _layout(shard: Shard) -> tuple[dict[str, tuple[int, int]], int]:
    """Where each tensor of a shard sits in its buffer: {name: (offset, bytes)} and the buffer's size
    (the tensors in shard order, each on a cache line)."""
    places, offset = {}, 0
    for name, nbytes in zip(shard.names, shard.sizes, strict=True):
        places[name] = (offset, nbytes)
        offset += (nbytes + ALIGN - 1) // ALIGN * ALIGN
    return places, offset
