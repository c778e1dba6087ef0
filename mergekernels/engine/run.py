"""The checkpoint merge: plan, optional statistics pass, streamed merge, atomic publish.

Three things overlap: a reader thread reads the next tensors (safetensors lazy reads), the calling
thread computes them (GPU kernels with pinned host buffers and non-blocking copies, or the CPU
kernels), and a writer thread writes each finished shard. Memory is bounded by a byte budget, not a
count: the reader holds at most the inputs of the largest tensor (or row chunk), K + 1 copies of it,
ahead of the compute thread, and at most two shards are in memory (the one being written and the
one being filled). Peak RSS is then about (K + 2) x the largest piece + 2 shards above the process's
own footprint, whatever the number of tensors (tests/test_engine.py measures it).

Work units follow the methods' needs (``mergekernels.methods.MethodSpec``):
- methods with ``chunks`` read tensors larger than ``chunk_bytes`` per input in row chunks, so a
  128k x 8k embedding never needs K full copies: element-wise ones (task arithmetic, DARE) in any
  row range, DELLA (per-row ranks) in blocks of whole rows. Those with a ``prepass`` (TIES' and
  Breadcrumbs' per-tensor thresholds, DARE's L1 rescale) first read the chunks once per pass to
  find what the whole tensor needs (exact: the radix select does not depend on chunking);
- ``threshold_scope: global`` adds a statistics pass over the whole model first;
- matrix methods (ACE, TSV-M, Iso, WUDI, RegMean) take groups of same-shape tensors, batched under
  the memory cap.
Shards are planned up front from the base's tensor sizes in processing order, so the layout, and
with it every output byte, is the same on every run, on resume and on any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import resource
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import yaml

from .. import __version__, devices
from ..config import MergeConfig, load_config, method_kwargs, parse_size
from ..merge import batch_layers, default_memory_cap, is_excluded, takes_matrix_path
from ..methods import METHODS
from ..methods.ties import ties_prepass
from .checkpoint import Checkpoint, CheckpointError
from .ranks import Ranks
from .staging import PinnedStaging
from .writer import CheckpointWriter, plan_shards

DEFAULT_SHARD_SIZE = 5 * 1024**3
DEFAULT_CHUNK_BYTES = 256 * 1024**2
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
MERGE_CONFIG_FILE = "merge_config.yml"


@dataclass
class MergeReport:
    """What a checkpoint merge did: time per phase, bytes, throughput, memory, per-tensor diagnostics."""

    out_dir: str
    method: str
    device: str
    tensors: int
    shards: int
    resumed_shards: int
    seconds: dict[str, float]
    bytes_read: int
    bytes_written: int
    peak_rss_bytes: int
    # peak RSS when the call began (the interpreter, torch and earlier work): the merge's own
    # working set is at most peak_rss_bytes - start_rss_bytes
    start_rss_bytes: int = 0
    diagnostics: dict[str, dict] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / max(self.seconds.get("total", 0.0), 1e-9) / 1e9

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items())
        return (
            f"merged {self.tensors} tensors with {self.method} on {self.device} into {self.out_dir} "
            f"({self.shards} shard(s), {self.resumed_shards} kept from an earlier run)\n"
            f"time: {phases}\n"
            f"read {self.bytes_read / 1e9:.3f} GB, wrote {self.bytes_written / 1e9:.3f} GB, "
            f"{self.gb_per_s:.2f} GB/s end to end; peak RSS {self.peak_rss_bytes / 1e6:.0f} MB "
            f"({self.start_rss_bytes / 1e6:.0f} MB before the merge began)"
        )

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["gb_per_s"] = self.gb_per_s
        return data


def _fingerprint(cfg: MergeConfig, checkpoints: list[Checkpoint], shard_size: int) -> dict:
    files = []
    for ckpt in checkpoints:
        for f in ckpt.files:
            st = f.stat()
            files.append([str(f), st.st_size, st.st_mtime_ns])
    return {
        "version": __version__,
        "config": hashlib.sha256(json.dumps(cfg.source, sort_keys=True, default=str).encode()).hexdigest(),
        "files": files,
        "shard_size": shard_size,
    }


@dataclass
class _Unit:
    """One piece of work: a tensor, a row range of one, or a group of same-shape tensors."""

    names: tuple[str, ...]
    kind: str  # "copy" | "tensor" | "rows" | "group"
    rows: tuple[int, int] | None = None
    inputs: tuple | None = None  # filled by the reader: (base, [experts]) per name
    params: dict | None = None  # filled by the reader: what a chunked tensor's pre-pass found
    nbytes: int = 0  # input bytes held while the unit is in flight (the prefetch budget)
    staging: object | None = None  # its region of the pinned staging buffer (GPU merges)


class _Plan:
    def __init__(
        self,
        cfg: MergeConfig,
        base: Checkpoint,
        experts: list[Checkpoint],
        kwargs: dict,
        memory_cap: int,
        chunk_bytes: int,
    ):
        self.cfg, self.base, self.experts, self.kwargs = cfg, base, experts, kwargs
        self.spec = METHODS[cfg.method]
        self.allow_missing = cfg.options.get("allow_missing") or "error"
        self._validate()
        self.mergeable = {
            n
            for n, info in base.tensors.items()
            if info.dtype.is_floating_point and not is_excluded(n, cfg.exclude)
        }
        matrix = {
            n for n in self.mergeable if takes_matrix_path(self.spec, n, len(base.tensors[n].shape), kwargs)
        }
        self.units: list[_Unit] = []
        scheduled: set[str] = set()
        groups: dict[tuple, list[str]] = defaultdict(list)
        for n in base.names():
            if n in matrix:
                groups[(base.tensors[n].shape, base.tensors[n].dtype)].append(n)
        for n in base.names():
            if n in scheduled:
                continue
            info = base.tensors[n]
            if n in matrix:
                group = groups[(info.shape, info.dtype)]
                size = batch_layers(self.spec, info.shape, len(experts), info.dtype, memory_cap)
                for start in range(0, len(group), size):
                    chunk = tuple(group[start : start + size])
                    self.units.append(_Unit(chunk, "group"))
                    scheduled.update(chunk)
                continue
            scheduled.add(n)
            if n not in self.mergeable:
                self.units.append(_Unit((n,), "copy"))
            elif info.nbytes > chunk_bytes and self._splits(info.shape):
                row_bytes = max(1, info.nbytes // info.shape[0])
                step = max(1, chunk_bytes // row_bytes)
                for r0 in range(0, info.shape[0], step):
                    self.units.append(_Unit((n,), "rows", (r0, min(info.shape[0], r0 + step))))
            else:
                self.units.append(_Unit((n,), "tensor"))
        self.order = list(dict.fromkeys(name for u in self.units for name in u.names))
        self.pieces: dict[str, list[tuple[int, int] | None]] = defaultdict(list)
        for u in self.units:
            for name in u.names:
                self.pieces[name].append(u.rows)
            u.nbytes = sum(self.read_bytes(name, u.rows) for name in u.names)
        # The prefetch budget: the inputs of the largest tensor (or row chunk). A unit larger than
        # the budget (a batched matrix group) is read only when nothing else is in flight.
        self.budget = max((self.read_bytes(n, r) for n in self.order for r in self.pieces[n]), default=0)

    def _splits(self, shape: tuple[int, ...]) -> bool:
        if self.spec.chunks == "elements":
            return len(shape) >= 1 and shape[0] > 1
        return self.spec.chunks == "rows" and len(shape) >= 2 and shape[0] > 1

    def read_bytes(self, name: str, rows: tuple[int, int] | None) -> int:
        """Bytes of the base's and the experts' copies of a tensor (or of a row range of it)."""
        info = self.base.tensors[name]
        nbytes = info.nbytes if rows is None else info.nbytes // info.shape[0] * (rows[1] - rows[0])
        return nbytes * (1 + sum(name in c for c in self.experts))

    def _validate(self) -> None:
        for ckpt in self.experts:
            for name, info in self.base.tensors.items():
                if name not in ckpt.tensors:
                    if self.allow_missing == "base":
                        continue
                    raise CheckpointError(
                        f"{ckpt.path}: lacks tensor {name!r} of the base {self.base.path} "
                        "(options: {allow_missing: base} takes the base's value for it)"
                    )
                other = ckpt.tensors[name]
                if other.shape != info.shape:
                    raise CheckpointError(
                        f"tensor {name!r}: shape {list(other.shape)} in {other.file} but "
                        f"{list(info.shape)} in the base's {info.file}"
                    )
                if other.dtype != info.dtype and self.cfg.dtype is None:
                    raise CheckpointError(
                        f"tensor {name!r}: dtype {other.dtype} in {other.file} but {info.dtype} in the "
                        f"base's {info.file}; set `dtype:` in the config to compute in one dtype"
                    )

    def out_dtype(self, name: str) -> torch.dtype:
        info = self.base.tensors[name]
        if name in self.mergeable and self.cfg.out_dtype is not None:
            return self.cfg.out_dtype
        return info.dtype

    def out_bytes(self, name: str) -> int:
        return self.base.tensors[name].numel * self.out_dtype(name).itemsize


def _finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in x: min and max propagate both, and one aminmax pass runs at memory speed
    (isfinite(x).all() is ~40x slower on CPU for bf16)."""
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return None


_LIBC = _libc()


def _return_freed_memory() -> None:
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


def _rss_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux (ru_maxrss there also counts the parent's
    RSS at fork, which would hide a small process's own peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Budget:
    """Bytes of input the reader may hold ahead of the compute thread."""

    def __init__(self, limit: int, stop: threading.Event):
        self.limit, self.used, self.stop = limit, 0, stop
        self.cond = threading.Condition()

    def acquire(self, nbytes: int) -> bool:
        """Wait until nbytes fit (always, when nothing is held); False if the merge is stopping."""
        with self.cond:
            while self.used and self.used + nbytes > self.limit:
                if self.stop.is_set():
                    return False
                self.cond.wait(0.1)
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def merge_checkpoints(
    config: MergeConfig | str | os.PathLike | dict,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    allow_pickle: bool = False,
    shard_size: int | str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> MergeReport:
    """Merge checkpoints on disk as a config describes and write the result to out_dir (HF layout).

    Args:
        config: a :class:`mergekernels.config.MergeConfig`, a YAML file or its parsed dict
            (mergekit-compatible; see :func:`mergekernels.config.load_config`).
        out_dir: the output directory: ``model-0000i-of-0000N.safetensors``, the index JSON, the base's
            ``config.json`` / tokenizer / generation files and the merge config (``merge_config.yml``).
        device: ``"cpu"``, ``"cuda"`` (``"cuda:1"``...) or ``"auto"`` (default: CUDA if available).
        resume: keep the shards an interrupted run of the same inputs and config finished.
        overwrite: replace an existing out_dir (it is replaced only when the merge has finished).
        quiet: no progress bar.
        allow_pickle: accept pickle ``.bin`` checkpoints (loaded with ``weights_only=True``).
        shard_size: bytes per output shard (default: the config's ``options.shard_size`` or 5 GB);
            strings such as ``"500MB"`` are accepted.
        chunk_bytes: element-wise methods read tensors larger than this in row chunks.

    Under torch.distributed (``torchrun --nproc-per-node N -m mergekernels merge ...``, or a process
    group the caller initialised) rank r merges and writes shards r, r + N, ...; model-wide
    statistics are all-reduced; rank 0 writes the index and publishes out_dir. The files are the same
    as a single process writes.

    Returns:
        A :class:`MergeReport` (of this rank's share under torch.distributed).
    """
    t_start = time.perf_counter()
    start_rss = _rss_bytes()
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if cfg.base_model is None:
        raise ValueError("merge_checkpoints: the config needs a base_model")
    ranks = Ranks.start(device)
    try:
        report = _merge_as_rank(
            cfg,
            out_dir,
            ranks,
            devices.resolve(device),
            resume=resume,
            overwrite=overwrite,
            quiet=quiet,
            allow_pickle=allow_pickle,
            shard_size=shard_size,
            chunk_bytes=chunk_bytes,
            t_start=t_start,
            start_rss=start_rss,
        )
    except BaseException as exc:
        # The other ranks stop at their next rendezvous or check, with this error in theirs.
        ranks.fail(exc)
        ranks.close()
        raise
    ranks.close()
    return report


def _merge_as_rank(
    cfg: MergeConfig,
    out_dir: str | os.PathLike,
    ranks: Ranks,
    dev: torch.device,
    *,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    allow_pickle: bool,
    shard_size: int | str | None,
    chunk_bytes: int,
    t_start: float,
    start_rss: int,
) -> MergeReport:
    """This rank's share of merge_checkpoints (the whole merge on a single process)."""
    rank, world = ranks.rank, ranks.world
    opts = {k: v for k, v in cfg.options.items() if v is not None}
    shard_bytes = parse_size(shard_size or opts.get("shard_size", DEFAULT_SHARD_SIZE), "shard_size")
    memory_cap = (
        parse_size(opts["memory_cap"], "memory_cap") if "memory_cap" in opts else default_memory_cap(dev)
    )
    allow_nonfinite = bool(opts.get("allow_nonfinite", False))

    base = Checkpoint(cfg.base_model, allow_pickle=allow_pickle)
    experts = [Checkpoint(m.path, allow_pickle=allow_pickle) for m in cfg.models]
    kwargs = {**METHODS[cfg.method].implied, **method_kwargs(cfg)}
    plan = _Plan(cfg, base, experts, kwargs, memory_cap, chunk_bytes)
    shards = plan_shards([(n, plan.out_bytes(n)) for n in plan.order], shard_bytes)
    # Ranks split the shards (shard i goes to rank i mod world); rank 0 prepares the output first.
    fingerprint = _fingerprint(cfg, [base, *experts], shard_bytes)
    writer = None
    if rank == 0:
        writer = CheckpointWriter(out_dir, shards, fingerprint, overwrite=overwrite, resume=resume)
    ranks.sync()
    if rank != 0:
        writer = CheckpointWriter(out_dir, shards, fingerprint, overwrite=True, resume=resume, attach=True)
    pending = [s for s in shards if s.index % world == rank and not writer.done(s)]
    seconds = {"plan": time.perf_counter() - t_start}
    bytes_read = 0
    diagnostics: dict[str, dict] = {}

    def read_inputs(name: str, rows=None):
        nonlocal bytes_read
        b = base.read(name, rows)
        fts = [ckpt.read(name, rows) if name in ckpt else b for ckpt in experts]
        if cfg.dtype is not None and name in plan.mergeable:
            b, fts = b.to(cfg.dtype), [x.to(cfg.dtype) for x in fts]
        bytes_read += b.numel() * b.element_size() * (1 + sum(name in c for c in experts))
        if not allow_nonfinite and name in plan.mergeable:
            for ckpt, x in zip([base, *experts], [b, *fts], strict=True):
                if x.numel() and not _finite(x):
                    raise CheckpointError(
                        f"{ckpt.info(name).file if name in ckpt else base.info(name).file}: tensor {name!r} "
                        "holds NaN or Inf (options: {allow_nonfinite: true} merges it anyway)"
                    )
        return b, fts

    # Statistics pass: the model-wide magnitude threshold of TIES with threshold_scope: global.
    if opts.get("threshold_scope", "tensor") == "global":
        if plan.spec.function.__name__ != "ties":
            raise ValueError(f"threshold_scope: global applies to ties, not {cfg.method!r}")
        t0 = time.perf_counter()
        mergeable = [n for n in plan.order if n in plan.mergeable]
        numel = sum(base.tensors[n].numel for n in mergeable)
        worker = ties_prepass(
            len(experts),
            numel,
            {"density": kwargs.pop("density", 0.2)},
            dev,
            all_reduce=ranks.all_reduce if world > 1 else None,
        )
        for index in range(worker.passes):
            for n in mergeable[rank::world]:  # each rank counts its share
                for rows in plan.pieces[n]:
                    b, fts = read_inputs(n, rows)
                    worker.update(index, b.to(dev), [x.to(dev) for x in fts], 0)
            worker.end_pass(index)
        kwargs.update(worker.params())
        seconds["stats"] = time.perf_counter() - t0

    # Statistics pass of needs_stats methods (AWD's Grams and coefficient solve), shared with mk.merge.
    per_tensor_params: dict[str, dict] = {}
    if plan.spec.prepare_stats is not None:
        t0 = time.perf_counter()

        def read_on_device(name: str):
            b, fts = read_inputs(name)
            return b.to(dev), [x.to(dev) for x in fts]

        names = [n for n in plan.order if n in plan.mergeable]
        shared, per_tensor_params, found = plan.spec.prepare_stats(read_on_device, names, kwargs)
        kwargs.update(shared)
        diagnostics.update(found)
        seconds["stats"] = time.perf_counter() - t0

    pending_names = {n for s in pending for n in s.names}
    units = [u for u in plan.units if u.names[0] in pending_names]
    progress_total = sum(
        base.tensors[n].nbytes * (1 + len(experts)) + plan.out_bytes(n) for n in pending_names
    )
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=progress_total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge")

    t_merge = time.perf_counter()
    spec = plan.spec
    tensor_kwargs = {k: v for k, v in kwargs.items() if k not in spec.matrix_params}

    def tensor_call(name: str) -> dict:
        call = dict(tensor_kwargs)
        if spec.uses_rng:
            call.setdefault("key", name)
        return call

    # The read queue is unbounded: the byte budget bounds what it holds.
    read_q: queue.Queue = queue.Queue()
    write_q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    budget = _Budget(plan.budget, stop)
    # GPU merges copy inputs through one reused pinned buffer as large as the budget.
    staging = PinnedStaging(plan.budget + 256 * (len(experts) + 1)) if dev.type == "cuda" else None

    def hand_over(item) -> bool:
        """Put on the read queue unless the merge is being stopped (then give up)."""
        while not stop.is_set():
            try:
                read_q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    found: dict[str, dict] = {}  # name -> what its pre-pass found

    def prepass(name: str) -> dict:
        """Run a chunked tensor's pre-pass (reading every chunk once per pass) before its merge."""
        info = base.tensors[name]
        worker = spec.prepass(len(experts), info.numel, tensor_call(name), dev)
        if worker is None:
            return {}
        row_len = info.numel // info.shape[0]
        for index in range(worker.passes):
            for rows in plan.pieces[name]:
                nbytes = plan.read_bytes(name, rows)
                if not budget.acquire(nbytes):
                    return {}
                try:
                    b, fts = read_inputs(name, rows)
                    worker.update(index, b.to(dev), [x.to(dev) for x in fts], rows[0] * row_len)
                    del b, fts
                finally:
                    budget.release(nbytes)
            worker.end_pass(index)
        return worker.params()

    def reader() -> None:
        try:
            for unit in units:
                if stop.is_set():
                    return
                if unit.kind == "rows" and spec.prepass is not None:
                    name = unit.names[0]
                    if unit.rows[0] == 0:
                        found[name] = prepass(name)
                    unit.params = found[name]
                    if unit.rows[1] == base.tensors[name].shape[0]:
                        del found[name]
                if not budget.acquire(unit.nbytes):
                    return
                unit.inputs = tuple(read_inputs(n, unit.rows) for n in unit.names)
                if staging is not None:
                    staged = staging.stage([t for b, fts in unit.inputs for t in (b, *fts)], stop)
                    if staged is None:
                        return
                    copies, unit.staging = iter(staged[0]), staged[1]
                    unit.inputs = tuple((next(copies), [next(copies) for _ in fts]) for _, fts in unit.inputs)
                if not hand_over(unit):
                    return
            hand_over(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            hand_over(_Failed(exc))

    written = {"bytes": 0}

    def write_loop() -> None:
        # After a failure keep draining the queue, so the compute thread never blocks on it.
        while True:
            item = write_q.get()
            try:
                if item is None:
                    return
                if "error" in written:
                    continue
                shard, tensors = item
                del item
                writer.write_shard(shard, tensors)
                tensors = None
                _return_freed_memory()
                written["bytes"] += shard.nbytes
                if bar is not None:
                    bar.update(shard.nbytes)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the compute thread
                written["error"] = exc
                stop.set()
            finally:
                tensors = None
                write_q.task_done()

    shard_of = {n: s for s in pending for n in s.names}
    buffers: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    partial_rows: dict[str, torch.Tensor] = {}
    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=write_loop, daemon=True)]
    for t in threads:
        t.start()

    def place(name: str, value: torch.Tensor) -> None:
        shard = shard_of[name]
        buffers[shard.index][name] = value.to("cpu", plan.out_dtype(name))
        if len(buffers[shard.index]) == len(shard.names):
            # At most two shards in memory: the one being written and this one.
            write_q.join()
            if "error" in written:
                raise written["error"]
            write_q.put((shard, buffers.pop(shard.index)))

    try:
        while True:
            try:
                unit = read_q.get(timeout=0.1)
            except queue.Empty:  # the writer may have failed (and stopped the reader) meanwhile
                if "error" in written:
                    raise written["error"] from None
                continue
            if unit is None:
                break
            if isinstance(unit, _Failed):
                raise unit.exc
            ranks.check()  # another rank's failure stops this one too
            if "error" in written:
                raise written["error"]
            inputs = [
                (b.to(dev, non_blocking=True), [x.to(dev, non_blocking=True) for x in fts])
                for b, fts in unit.inputs
            ]
            unit.inputs = None
            if unit.staging is not None:  # reusable once these copies have finished
                copied = torch.cuda.Event()
                copied.record()
                staging.give_back(unit.staging, copied)
            held = unit.nbytes
            in_bytes = sum(b.numel() * b.element_size() * (1 + len(fts)) for b, fts in inputs)
            try:
                if unit.kind == "copy":
                    place(unit.names[0], inputs[0][0])
                elif unit.kind == "group":
                    b = torch.stack([i[0] for i in inputs])
                    fts = [torch.stack([i[1][t] for i in inputs]) for t in range(len(experts))]
                    out, diag = spec.batched(b, fts, list(unit.names), **kwargs)
                    for i, name in enumerate(unit.names):
                        place(name, out[i])
                        if diag is not None:
                            diagnostics[name] = diag[i]
                    del b, fts, out  # the stacked copies count against the budget until here
                else:
                    name = unit.names[0]
                    call = {**tensor_call(name), **per_tensor_params.get(name, {}), **(unit.params or {})}
                    if unit.kind == "rows":
                        info = base.tensors[name]
                        row_len = info.numel // info.shape[0]
                        if spec.uses_rng:
                            call["element_offset"] = unit.rows[0] * row_len
                        piece = spec.function(inputs[0][0], inputs[0][1], **call)
                        full = partial_rows.setdefault(
                            name, torch.empty(info.shape, dtype=plan.out_dtype(name))
                        )
                        full[unit.rows[0] : unit.rows[1]] = piece.to("cpu", full.dtype)
                        del piece
                        if unit.rows[1] == info.shape[0]:
                            place(name, partial_rows.pop(name))
                    else:
                        place(name, spec.function(inputs[0][0], inputs[0][1], **call))
            except (ValueError, TypeError, RuntimeError) as exc:
                if isinstance(exc, CheckpointError):
                    raise
                raise type(exc)(f"merge: tensor(s) {', '.join(unit.names[:3])}: {exc}") from exc
            del inputs
            budget.release(held)
            if bar is not None:
                bar.update(in_bytes)
    except BaseException:
        stop.set()
        write_q.put(None)
        threads[1].join()
        if bar is not None:
            bar.close()
        raise
    write_q.put(None)
    threads[1].join()
    if "error" in written:
        raise written["error"]
    if bar is not None:
        bar.close()
    seconds["merge"] = time.perf_counter() - t_merge

    t_finish = time.perf_counter()
    ranks.sync()  # every rank's shards are written
    if rank == 0:
        side = {}
        for name in SIDE_FILES:
            src = base.directory / name
            if base.path.is_dir() and src.exists():
                side[name] = src.read_bytes()
        side[MERGE_CONFIG_FILE] = yaml.safe_dump(cfg.source, sort_keys=False).encode()
        total_size = sum(plan.out_bytes(n) for n in plan.order)
        writer.finish(side, total_size)
    ranks.sync()
    seconds["finish"] = time.perf_counter() - t_finish
    seconds["total"] = time.perf_counter() - t_start
    return MergeReport(
        out_dir=str(out_dir),
        method=cfg.method,
        device=str(dev),
        tensors=len(plan.order),
        shards=len(shards),
        resumed_shards=sum(1 for s in shards if s.index % world == rank) - len(pending),
        seconds=seconds,
        bytes_read=bytes_read,
        bytes_written=written["bytes"],
        peak_rss_bytes=_rss_bytes(),
        start_rss_bytes=start_rss,
        diagnostics=diagnostics,
    )
