"""The checkpoint merge, a pipeline: plan, read, compute, write, then publish.

1. **plan** (:mod:`.work`): a tokenizer merge first builds the output vocabulary from the models'
   tokenizers (:mod:`mergekernels.vocab`); the planner (:mod:`mergekernels.planner`) resolves the
   configuration into one task per output tensor on the checkpoints' headers; the tasks are cut into
   work units (whole tensors, row chunks, batched matrix groups) and the output into shards.
2. **statistics**, when the method needs the whole model first: TIES' model-wide threshold
   (``threshold_scope: global``), AWD's Gram pass.
3. **read** (:mod:`.reader`): a thread reads the next units' inputs (lazy safetensors reads) under a
   byte budget, running chunked tensors' pre-passes, staging GPU inputs in pinned memory; the rows
   of vocabulary tensors are gathered into the output vocabulary's order (:mod:`.gather`).
4. **compute** (:mod:`.compute`): the calling thread merges each unit on the device.
5. **write** (:mod:`.output`, :mod:`.writer`): finished tensors fill their shards; a thread writes
   each full shard atomically; the index, ``config.json`` and side files (the tokenizer, written
   with transformers when the merge makes one) come last, and the
   partial directory is renamed to ``OUT_DIR`` only when everything is written.

Memory is bounded by a byte budget, not a count: the reader holds at most the inputs of the largest
tensor (or row chunk), K + 1 copies of it, ahead of the compute step, and at most two shards are in
memory (the one being written and the one being filled). Peak RSS is then about (K + 2) x the
largest piece + 2 shards above the process's own footprint, whatever the number of tensors
(tests/test_engine.py measures it). Shards are planned up front in processing order, so the layout,
and with it every output byte, is the same on every run, on resume and on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import resource
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .. import __version__, devices, hub
from ..config import MergeConfig, load_config, parse_size, read_documents
from ..merge import default_memory_cap
from ..methods.ties import ties_prepass
from ..planner import MergePlan, PlanError, plan_config
from ..vocab import Vocabulary, build_vocabulary, resolve_template
from ..vocab.build import chat_template_files
from .card import model_card
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    InputChangedError,
    check_unchanged,
    file_stamps,
    json_object,
)
from .compute import Computer
from .guard import check_output_path, local_inputs, output_lock
from .lora import LoraCheckpoint
from .multi import merge_documents
from .output import ShardOutput
from .ranks import Ranks
from .reader import Failed, InputReader, Prefetcher
from .signals import ends_process
from .work import WorkPlan, numel_of
from .writer import CheckpointWriter

DEFAULT_SHARD_SIZE = 5 * 1024**3
DEFAULT_CHUNK_BYTES = 256 * 1024**2
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
MERGE_CONFIG_FILE = "merge_config.yml"
# config.json keys of the layer count, by model family (the first present is rewritten)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


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
        read = list(ckpt.files)
        if cfg.tokenizer is not None:  # the vocabulary decides the vocabulary tensors' rows
            read += [ckpt.directory / n for n in TOKENIZER_FILES if (ckpt.directory / n).is_file()]
        files += [[str(f), size, mtime] for f, (size, mtime) in file_stamps(read).items()]
    return {
        "version": __version__,
        "config": hashlib.sha256(
            json.dumps([cfg.source, cfg.options], sort_keys=True, default=str).encode()
        ).hexdigest(),
        "files": files,
        "shard_size": shard_size,
    }


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
    strict: bool = False,
    seed: int | None = None,
    copy_tokenizer: bool = True,
    model_card: bool = True,
    allow_crimes: bool = False,
    hub_cache: str | os.PathLike | None = None,
) -> MergeReport:
    """Merge checkpoints on disk as a config describes and write the result to out_dir (HF layout).

    A YAML file with several documents (mergekit-multi) runs them in order: named intermediate merges
    end up in ``out_dir/<name>``, the final one in out_dir (see :mod:`mergekernels.engine.multi`).

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
        strict: refuse what mergekit ignores in a configuration (see ``load_config``).
        seed: the random methods' seed, instead of the config's ``options.seed``.
        copy_tokenizer: copy the base's tokenizer files (as ``mergekit-yaml --copy-tokenizer``).
        model_card: write ``README.md`` describing the merge (methods, models, configuration) and
            the configuration as ``mergekit_config.yml``, so the output is publishable as it is.
        allow_crimes: merge models whose ``config.json`` names different architectures.
        hub_cache: the Hugging Face cache directory for hub ids (default: huggingface_hub's).

    Under torch.distributed (``torchrun --nproc-per-node N -m mergekernels merge ...``, or a process
    group the caller initialised) rank r merges and writes shards r, r + N, ...; model-wide
    statistics are all-reduced; rank 0 writes the index and publishes out_dir. The files are the same
    as a single process writes.

    Returns:
        A :class:`MergeReport` (of this rank's share under torch.distributed).
    """
    if isinstance(config, (str, os.PathLike)):
        documents = read_documents(config)
        if len(documents) > 1:  # mergekit-multi: one merge per document, in order
            options = dict(
                device=device,
                resume=resume,
                overwrite=overwrite,
                quiet=quiet,
                allow_pickle=allow_pickle,
                shard_size=shard_size,
                chunk_bytes=chunk_bytes,
                strict=strict,
                seed=seed,
                copy_tokenizer=copy_tokenizer,
                model_card=model_card,
                allow_crimes=allow_crimes,
                hub_cache=hub_cache,
            )
            with output_lock(out_dir, take=_process_rank() == 0):  # the final merge takes it again
                return merge_documents(Path(config), documents, out_dir, merge_checkpoints, **options)
    t_start = time.perf_counter()
    start_rss = _rss_bytes()
    cfg = config if isinstance(config, MergeConfig) else load_config(config, strict=strict)
    if cfg.base_model is None:
        raise ValueError("merge_checkpoints: the config needs a base_model")
    if seed is not None:  # a fresh config: the tensors' parameters are resolved with this seed
        cfg = dataclasses.replace(cfg, options={**cfg.options, "seed": seed}, _cache={})
    inputs = InputOptions(allow_pickle, allow_crimes, hub_cache)
    outputs = OutputOptions(copy_tokenizer, model_card, Path(out_dir).name)
    check_output_path(out_dir, local_inputs(_references(cfg)))  # before anything is written
    ranks = Ranks.start(device)
    try:
        with output_lock(out_dir, take=ranks.rank == 0):  # rank 0 creates and publishes the output
            report = _merge_as_rank(
                cfg,
                out_dir,
                ranks,
                devices.resolve(device),
                resume=resume,
                overwrite=overwrite,
                quiet=quiet,
                inputs=inputs,
                outputs=outputs,
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


def _references(cfg: MergeConfig) -> list[str | None]:
    """Every model reference of a configuration: base, slice bases and sources, tokenizer source."""
    source = cfg.tokenizer.source_model if cfg.tokenizer is not None else None
    slices = [ref for sl in cfg.slices for ref in (sl.base_model, *(src.path for src in sl.sources))]
    return [cfg.base_model, *slices, source]


def _process_rank() -> int:
    """This process's rank under torch.distributed before a merge joins the group (torchrun's RANK)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _merge_as_rank(
    cfg: MergeConfig,
    out_dir: str | os.PathLike,
    ranks: Ranks,
    dev: torch.device,
    *,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    inputs: InputOptions,
    outputs: OutputOptions,
    shard_size: int | str | None,
    chunk_bytes: int,
    t_start: float,
    start_rss: int,
) -> MergeReport:
    """This rank's share of merge_checkpoints (the whole merge on a single process)."""
    rank, world = ranks.rank, ranks.world
    opts = {k: v for k, v in cfg.options.items() if v is not None}
    shard_bytes = parse_size(shard_size or opts.get("shard_size", DEFAULT_SHARD_SIZE), "shard_size")
    if "memory_cap" in opts:
        memory_cap, cap_source = parse_size(opts["memory_cap"], "memory_cap"), "options.memory_cap"
    else:
        memory_cap = default_memory_cap(dev)
        cap_source = (
            "70% of the GPU's free memory" if dev.type == "cuda" else "half the available host memory"
        )

    # 1. plan
    plan, checkpoints = _plan(cfg, inputs)
    inputs_at = [p for c in checkpoints for p in (c.path, getattr(c, "adapter", None)) if p]
    check_output_path(out_dir, inputs_at)  # again, with hub ids resolved
    work = WorkPlan(cfg, plan, memory_cap, chunk_bytes, cap_source)
    shards = work.shards(shard_bytes)
    # Ranks split the shards (shard i goes to rank i mod world); rank 0 prepares the output first.
    fingerprint = _fingerprint(cfg, checkpoints, shard_bytes)
    writer = None
    if rank == 0:
        writer = CheckpointWriter(out_dir, shards, fingerprint, overwrite=overwrite, resume=resume)
        writer.warn_if_short_of_space()
    ranks.sync()
    if rank != 0:
        writer = CheckpointWriter(out_dir, shards, fingerprint, overwrite=True, resume=resume, attach=True)
    pending = [s for s in shards if s.index % world == rank and not writer.done(s)]
    seconds = {"plan": time.perf_counter() - t_start}
    reader = InputReader(work, checkpoints, bool(opts.get("allow_nonfinite", False)))

    # 2. statistics over the whole model, when the method needs them
    t0 = time.perf_counter()
    stats = _statistics(work, reader, dev, ranks)
    per_tensor_params, diagnostics = stats if stats is not None else ({}, {})
    if stats is not None:
        seconds["stats"] = time.perf_counter() - t0

    # 3-5. read, compute, write
    t_merge = time.perf_counter()
    pending_names = {n for s in pending for n in s.names}
    units = [u for u in work.units if u.names[0] in pending_names]
    bar = None
    if not quiet:
        from tqdm import tqdm

        total = sum(work.read_bytes(work.tasks[n], None) + work.out_bytes(n) for n in pending_names)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge")
    try:
        bytes_written = _stream(
            work, units, reader, dev, writer, pending, ranks, per_tensor_params, diagnostics, bar
        )
        seconds["merge"] = time.perf_counter() - t_merge

        # publish, only if every input is still the file the plan opened
        t_finish = time.perf_counter()
        ranks.sync()  # every rank's shards are written
        if rank == 0:
            check_unchanged({Path(f): (size, mtime) for f, size, mtime in fingerprint["files"]})
            side = _side_files(cfg, plan, checkpoints, outputs)
            writer.finish(side, sum(work.out_bytes(n) for n in work.order))
    except InputChangedError:
        if rank == 0:  # its shards may mix two versions of an input: none of them may be resumed
            writer.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
    ranks.sync()
    seconds["finish"] = time.perf_counter() - t_finish
    seconds["total"] = time.perf_counter() - t_start
    return MergeReport(
        out_dir=str(out_dir),
        method=cfg.method,
        device=str(dev),
        tensors=len(work.order),
        shards=len(shards),
        resumed_shards=sum(1 for s in shards if s.index % world == rank) - len(pending),
        seconds=seconds,
        bytes_read=reader.bytes_read,
        bytes_written=bytes_written,
        peak_rss_bytes=_rss_bytes(),
        start_rss_bytes=start_rss,
        diagnostics=diagnostics,
    )


@dataclass(frozen=True)
class InputOptions:
    """How models are found and opened."""

    allow_pickle: bool = False
    allow_crimes: bool = False
    hub_cache: str | os.PathLike | None = None


@dataclass(frozen=True)
class OutputOptions:
    """What is written beside the merged tensors."""

    copy_tokenizer: bool = True
    model_card: bool = True
    name: str = "merged"


def _plan(cfg: MergeConfig, inputs: InputOptions) -> tuple[MergePlan, list[Checkpoint]]:
    """Opens every model the configuration names (headers only; hub ids fetched into the hub cache)
    and plans the merge on them."""
    opened: dict[str, Checkpoint] = {}
    paths = [cfg.base_model, *(src.path for sl in cfg.slices for src in sl.sources)]
    for path in dict.fromkeys(paths):
        opened[path] = _open(path, inputs)
    _check_architectures(opened, compare=not inputs.allow_crimes)
    vocabulary = _vocabulary(cfg, opened, inputs) if cfg.tokenizer is not None else None
    try:
        plan = plan_config(cfg, {path: ckpt.tensors for path, ckpt in opened.items()}, vocabulary)
    except PlanError as exc:
        raise CheckpointError(str(exc)) from None
    if vocabulary is not None:  # every configured token's row source is checked before any read
        for task in plan.tasks:
            if task.vocab == "permute":
                sources = [task.base, *task.inputs]
                vocabulary.layout(tuple(dict.fromkeys(plan.models[s.model] for s in sources)))
    return plan, [opened[path] for path in plan.models]


def _vocabulary(cfg: MergeConfig, opened: dict[str, Checkpoint], inputs: InputOptions) -> Vocabulary:
    """A tokenizer merge's vocabulary, from the merged models' tokenizers (and the source model's)."""
    source = cfg.tokenizer.source_model
    source_directory = None
    if source is not None and source not in opened:
        model = source.partition("+")[0] if not os.path.exists(source) else source
        local = hub.resolve(model, allow_pickle=inputs.allow_pickle, cache_dir=inputs.hub_cache)
        source_directory = local if local.is_dir() else local.parent
    directories = {path: ckpt.directory for path, ckpt in opened.items()}
    return build_vocabulary(cfg.tokenizer, cfg.base_model, directories, source_directory)


def _open(reference: str, inputs: InputOptions) -> Checkpoint | LoraCheckpoint:
    """A model by reference: a local path, a hub id, or ``model+lora`` (the adapter applied on read)."""
    model, plus, lora = reference.partition("+")
    if plus and os.path.exists(reference):
        model, lora = reference, ""
    local = hub.resolve(model, allow_pickle=inputs.allow_pickle, cache_dir=inputs.hub_cache)
    checkpoint = Checkpoint(local, allow_pickle=inputs.allow_pickle)
    if not lora:
        return checkpoint
    adapter = hub.resolve(lora, allow_pickle=inputs.allow_pickle, cache_dir=inputs.hub_cache)
    return LoraCheckpoint(checkpoint, adapter, allow_pickle=inputs.allow_pickle)


def _check_architectures(opened: dict[str, Checkpoint], compare: bool = True) -> None:
    """Every model's config.json must be a JSON object with a list of class names as ``architectures``;
    models whose architectures differ are refused (mergekit's "crimes") when ``compare``."""
    found: dict[Path, tuple] = {}
    for ckpt in opened.values():
        config = ckpt.directory / "config.json"
        if not (ckpt.path.is_dir() and config.is_file()):
            continue
        architectures = json_object(config).get("architectures")
        if architectures is None or architectures == []:
            continue
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise CheckpointError(
                f"{config}: architectures must be a list of class names, got {architectures!r:.80}"
            )
        found[config] = tuple(architectures)
    if compare and len(set(found.values())) > 1:
        listed = "; ".join(f"{config}: {', '.join(arch)}" for config, arch in found.items())
        raise CheckpointError(
            f"the models have different architectures ({listed}); --allow-crimes (allow_crimes=True) "
            "merges them anyway"
        )


def _statistics(
    work: WorkPlan, reader: InputReader, dev: torch.device, ranks: Ranks
) -> tuple[dict[str, dict], dict[str, dict]] | None:
    """Model-wide passes before the merge: TIES' global threshold, a needs_stats method's pass (AWD's
    Grams and coefficient solve, shared with mk.merge). Returns per-tensor parameters and
    diagnostics (None when the method needs no such pass); parameters for every tensor go into the
    tasks."""
    merged = [work.tasks[n] for n in work.order if work.tasks[n].merge]
    if not merged or not (work.cfg.options.get("threshold_scope") == "global" or work.spec.prepare_stats):
        return None
    params = dict(merged[0].params)
    per_tensor: dict[str, dict] = {}
    diagnostics: dict[str, dict] = {}
    if work.cfg.options.get("threshold_scope") == "global":
        numel = sum(numel_of(t.shape) for t in merged)
        all_reduce = ranks.all_reduce if ranks.world > 1 else None
        worker = ties_prepass(
            len(merged[0].inputs), numel, {"density": params.pop("density", 0.2)}, dev, all_reduce=all_reduce
        )
        for index in range(worker.passes):
            for task in merged[ranks.rank :: ranks.world]:  # each rank counts its share
                for rows in work.pieces[task.name]:
                    b, fts = reader.read_on(task, dev, rows)
                    worker.update(index, b, fts, 0)
            worker.end_pass(index)
        params.update(worker.params())
    elif work.spec.prepare_stats is not None:
        by_name = {t.name: t for t in merged}

        def read(name: str):
            return reader.read_on(by_name[name], dev)

        shared, per_tensor, found = work.spec.prepare_stats(read, [t.name for t in merged], params)
        params.update(shared)
        diagnostics.update(found)
    for task in merged:  # every merged tensor shares these (the configuration is uniform)
        task.params = params
    return per_tensor, diagnostics


def _stream(work, units, reader, dev, writer, pending, ranks, per_tensor_params, diagnostics, bar) -> int:
    """Steps 3-5: the reader thread feeds the compute step, which fills shards for the writer thread.
    Returns the bytes written."""
    stop = threading.Event()
    prefetch = Prefetcher(work, units, reader, dev, stop)
    output = ShardOutput(
        writer, pending, work.out_dtype, stop, progress=bar.update if bar is not None else None
    )
    slot = output.slot if dev.type == "cpu" else None  # CPU kernels write into the shard buffers
    compute = Computer(work, reader, dev, per_tensor_params, diagnostics, prefetch.staging, slot)
    prefetch.start()
    output.start()
    try:
        while True:
            unit = _next_unit(prefetch, output)
            if unit is None:
                break
            ranks.check()  # another rank's failure stops this one too
            output.raise_if_failed()
            held = unit.nbytes
            in_bytes = sum(b.numel() * b.element_size() * (1 + len(fts)) for b, fts in unit.inputs)
            for task, value in compute.run(unit):
                output.place(task.name, value)
            prefetch.budget.release(held)
            if bar is not None:
                bar.update(in_bytes)
    except BaseException as exc:
        stop.set()
        output.abandon(wait=not ends_process(exc))  # a signal to the command: exit within 2 s
        raise
    output.close()
    return output.bytes_written


def _next_unit(prefetch: Prefetcher, output: ShardOutput):
    """The next unit the reader has read (None at the end), raising the reader's or the writer's error."""
    while True:
        try:
            unit = prefetch.queue.get(timeout=0.1)
        except queue.Empty:  # the writer may have failed (and stopped the reader) meanwhile
            output.raise_if_failed()
            continue
        if isinstance(unit, Failed):
            raise unit.exc
        return unit


def _side_files(
    cfg: MergeConfig, plan: MergePlan, checkpoints: list[Checkpoint], outputs: OutputOptions
) -> dict[str, bytes]:
    """The base's config, tokenizer and generation files (config.json's layer count set to the
    output's when slices changed it), the merge config, and the model card."""
    side = {}
    base = checkpoints[0]
    tokenizer = _tokenizer_files(cfg, plan, checkpoints, outputs)
    for name in SIDE_FILES:
        src = base.directory / name
        if name in TOKENIZER_FILES and (not outputs.copy_tokenizer or tokenizer is not None):
            continue
        if base.path.is_dir() and src.exists():
            side[name] = src.read_bytes()
    side.update(tokenizer or {})
    if "config.json" in side:
        side["config.json"] = _with_sizes(side["config.json"], plan, base.directory)
    config_yaml = yaml.safe_dump(cfg.source, sort_keys=False)
    side[MERGE_CONFIG_FILE] = config_yaml.encode()
    if outputs.model_card:
        side["README.md"] = model_card(cfg, outputs.name, config_yaml).encode()
        side["mergekit_config.yml"] = config_yaml.encode()
    return side


def _tokenizer_files(
    cfg: MergeConfig, plan: MergePlan, checkpoints: list[Checkpoint], outputs: OutputOptions
) -> dict[str, bytes] | None:
    """The output tokenizer's files when the merge makes one: a tokenizer merge's, or the base's
    tokenizer with the configured ``chat_template``; None when the base's files are copied as they are."""
    if plan.vocabulary is not None:
        templates = [m.template for m in plan.vocabulary.models.values()]
        template = resolve_template(cfg.chat_template, templates) if cfg.chat_template else None
        return plan.vocabulary.files(template)
    if cfg.chat_template is None or not outputs.copy_tokenizer:
        if cfg.chat_template is not None:
            warnings.warn("chat_template is set but --no-copy-tokenizer writes no tokenizer", stacklevel=3)
        return None
    directories = {path: ckpt.directory for path, ckpt in zip(plan.models, checkpoints, strict=True)}
    return chat_template_files(cfg.chat_template, plan.models[0], directories)


def _with_sizes(data: bytes, plan: MergePlan, where) -> bytes:
    """config.json with the output's layer count (slices) and vocabulary rows, when they changed."""
    if plan.num_layers is None and plan.vocab_rows is None:
        return data
    config = json_object(where / "config.json", data)
    if plan.num_layers is not None:
        key = next((k for k in LAYER_COUNT_KEYS if k in config), "num_hidden_layers")
        config[key] = plan.num_layers
    if plan.vocab_rows is not None:
        text = config.get("text_config")
        holder = text if "vocab_size" not in config and isinstance(text, dict) else config
        holder["vocab_size"] = plan.vocab_rows
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


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
