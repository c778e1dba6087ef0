"""``run()``: ceilings first, then every case against its references, as :class:`BenchResults`."""

from __future__ import annotations

import copy
import datetime
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import devices
from . import ceilings as ceil
from .cases import (
    ACE_PARAMS,
    ALIASES,
    OPS,
    PRESETS,
    REGISTERED_OPS,
    Case,
    Impl,
    ace_flops,
    agreement,
    bytes_moved,
    elementwise_cases,
    make_ace_group,
)
from .checkpoints import ModelSize, io_floor, write_models
from .inputs import (
    DEFAULT_SHAPES,
    DTYPES,
    QUICK_SHAPE,
    InputSets,
    Rotating,
    device_name,
    elementwise_sets,
    llc_bytes,
    parse_shape,
    rotation_sets,
)
from .results import CEILING_TOLERANCE, BenchResults, CaseResult, Measurement
from .timing import WIN_MARGIN, Comparison, Timing, compare, time_fn

QUICK_ACE_SCALE_DOWN = 8
STREAM_MODEL = {"quick": ModelSize(1, 128, 352, 1024), "full": ModelSize(2, 1024, 2816, 8192)}
STREAM_SHARD_BYTES = {"quick": 256 << 10, "full": 32 << 20}
STREAM_METHOD = "task_arithmetic"

Progress = Callable[[str], None] | None


# ---- settings ------------------------------------------------------------------------------------
def available_ops() -> tuple[str, ...]:
    """The cases this build can run: OPS, less the registered-only methods mk.METHODS lacks."""
    from ..methods import METHODS

    return tuple(op for op in OPS if op not in REGISTERED_OPS or op in METHODS)


def resolve_ops(ops: str | Sequence[str] | None) -> list[str]:
    """Validated case names in report order (aliases and comma-separated lists accepted)."""
    from ..methods import METHODS

    known = available_ops()
    if ops is None:
        return list(known)
    if isinstance(ops, str):
        ops = [ops]
    wanted = []
    for item in ops:
        for part in str(item).split(","):
            name = part.strip().lower()
            if not name:
                continue
            name = ALIASES.get(name, name)
            if name in REGISTERED_OPS and name not in METHODS:
                raise ValueError(
                    f"op {part.strip()!r} is not available: method {name!r} is not registered in "
                    f"mergekernels.METHODS in this version"
                )
            if name not in known:
                raise ValueError(f"unknown op {part.strip()!r}; choose from: {', '.join(known)}")
            wanted.append(name)
    if not wanted:
        raise ValueError(f"no ops given; choose from: {', '.join(known)}")
    return [op for op in known if op in wanted]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is not None and torch.device(device).type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return devices.resolve("auto" if device is None else device)


def _resolve_dtype(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, dt in DTYPES.items():
            if dt == dtype:
                return name
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def _resolve_size(size, preset: str | None, device: torch.device, quick: bool) -> tuple[int, ...]:
    if size is not None and preset is not None:
        raise ValueError("give either a size or a preset, not both")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
        return PRESETS[preset].shape
    if size is None:
        return QUICK_SHAPE if quick else DEFAULT_SHAPES[device.type]
    if isinstance(size, str):
        return parse_shape(size)
    try:
        shape = tuple(int(s) for s in size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad size {size!r}: expected a shape such as (2048, 4096) or '2048x4096'") from exc
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"bad size {size!r}: sizes must be positive")
    return shape


def _ace_groups(preset: str | None, device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """The ACE block: the preset's, else gpt2's on a CPU and llama-7b-block's on CUDA; --quick
    divides every dimension by 8 unless a preset was named."""
    name = preset or ("llama-7b-block" if device.type == "cuda" else "gpt2")
    groups = list(PRESETS[name].ace_groups)
    if quick and preset is None:
        d = QUICK_ACE_SCALE_DOWN
        groups = [(layers, max(1, m // d), max(1, n // d)) for layers, m, n in groups]
    return groups


# ---- measuring -----------------------------------------------------------------------------------
def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) < 300 else text[:297] + "..."


def _shrunk(inputs: tuple) -> tuple:
    """An element-wise input set cut to its first 4096 elements (flattened)."""
    base, finetuned = inputs
    return base.reshape(-1)[:4096], [x.reshape(-1)[:4096] for x in finetuned]


def _bench_impl(
    impl: Impl, sets: Sequence[tuple], device: torch.device, repeats: int, budget: float
) -> tuple[Timing, object, int]:
    """Time `impl` on the rotating sets after one warm-up call; a slow implementation (a full sort)
    warms up on a 4096-element cut of the inputs instead, and may stop at 2 repeats."""
    call = Rotating(impl.fn, sets)
    if impl.slow:
        impl.fn(*_shrunk(sets[0]))
    timing = time_fn(
        call,
        repeats=repeats,
        warmup=0 if impl.slow else 1,
        device=device,
        budget_s=budget,
        min_repeats=2 if impl.slow else 3,
    )
    return timing, call.first, 1


def _measurement(
    impl: Impl,
    timing: Timing,
    warmup: int,
    kind: str,
    *,
    nbytes: int | None,
    flops: dict[str, float] | None = None,
    input_sets: int = 1,
) -> Measurement:
    total_flops = sum(flops.values()) if flops else None
    if kind == "flops":
        rate, unit = total_flops / timing.median / 1e9, "GFLOP/s"
    else:
        rate, unit = nbytes / timing.median / 1e9, "GB/s"
    return Measurement.from_timing(
        impl.name,
        impl.impl,
        timing,
        warmup,
        bytes=nbytes,
        flops=total_flops,
        flops_by_dtype=flops,
        rate=rate,
        rate_unit=unit,
        ceiling="copy" if kind == "bandwidth" else "host copy" if kind == "io" else "matmul",
        ceiling_rate=math.nan,
        ceiling_fraction=math.nan,
        input_sets=input_sets,
    )


def _say(progress: Progress, text: str) -> None:
    if progress is not None:
        progress(text)


def _compare(
    case: CaseResult, ours_out: object, outputs: dict, base: torch.Tensor | None, modes: dict
) -> None:
    if case.ours is None:
        return
    for m in case.references:
        speedup, verdict = compare(case.ours.timing, m.timing)
        agree = None
        if base is not None and m.name in outputs:
            try:
                agree = agreement(ours_out, outputs[m.name], base, modes.get(m.name))
            except Exception as exc:  # the agreement is a courtesy: never fail the run on it
                agree = f"not compared ({_error(exc)})"
        case.comparisons.append(Comparison(m.name, speedup, verdict, agree))


def _run_elementwise(
    case: Case,
    sets: InputSets,
    device: torch.device,
    k: int,
    repeats: int,
    budget: float,
    ours_ok: bool,
    progress: Progress,
) -> CaseResult:
    base0 = sets.sets[0][0]
    numel, itemsize = base0.numel(), base0.element_size()
    nbytes = bytes_moved(case.method, k, numel, itemsize)
    result = CaseResult(case.name, case.kind, case.note)
    outputs: dict[str, object] = {}
    ours_out = None
    if ours_ok:
        try:
            timing, ours_out, warmup = _bench_impl(case.ours, sets.sets, device, repeats, budget)
            result.ours = _measurement(
                case.ours, timing, warmup, case.kind, nbytes=nbytes, input_sets=len(sets)
            )
            _say(progress, f"  {case.name:<12} {case.ours.name:<22} {timing.median * 1e3:10.3f} ms")
        except Exception as exc:
            result.error = _error(exc)
            _say(progress, f"  {case.name:<12} error: {result.error}")
            return result
    else:
        result.note = (result.note + "; " if result.note else "") + "ours: no CUDA kernels in this build"
    for impl in case.references:
        try:
            timing, outputs[impl.name], warmup = _bench_impl(impl, sets.sets, device, repeats, budget)
        except Exception as exc:
            result.note = (result.note + "; " if result.note else "") + f"{impl.name} failed: {_error(exc)}"
            continue
        result.references.append(
            _measurement(impl, timing, warmup, case.kind, nbytes=nbytes, input_sets=len(sets))
        )
        _say(progress, f"  {case.name:<12} {impl.name:<22} {timing.median * 1e3:10.3f} ms")
    _compare(result, ours_out, outputs, base0, {r.name: r.agreement for r in case.references})
    return result


def _run_ace(
    groups: list[tuple[int, int, int]],
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    repeats: int,
    budget: float,
    ours_ok: bool,
    llc: int,
    progress: Progress,
) -> tuple[CaseResult, dict]:
    from ..methods.ace import ace_batched
    from .references import ace_reference_style

    itemsize = torch.empty((), dtype=dtype).element_size()
    set_bytes = sum(layers * m * n for layers, m, n in groups) * (k + 1) * itemsize
    count = rotation_sets(set_bytes, device, llc)
    sets = [
        ([make_ace_group(*g, k, device, seed=seed + 100 * s + i, dtype=dtype) for i, g in enumerate(groups)],)
        for s in range(count)
    ]
    params = dict(ACE_PARAMS, gate="auto")

    def ours(group_list):
        return [ace_batched(b, f, **params) for b, f in group_list]

    def reference(group_list):
        return [
            torch.stack(ace_reference_style(list(b.unbind(0)), [list(x.unbind(0)) for x in f], **params))
            for b, f in group_list
        ]

    ours_impl = Impl("ace_batched", "mergekernels", ours)
    ref_impl = Impl("ace_reference_style", "torch", reference)
    result = CaseResult(
        "ace",
        "flops",
        "ACE-Merging of one block, gate auto; reference: per-tensor loop, explicit inverse, full SVD; "
        "FLOPs: the package's work (cases.ace_flops), for both",
    )
    nbytes = sum(layers * m * n for layers, m, n in groups) * (k + 2) * itemsize
    het: list[bool] | None = None
    timing_ours = ours_out = None
    if ours_ok:
        try:
            timing_ours, ours_out, warmup_ours = _bench_impl(ours_impl, sets, device, repeats, budget)
            het = [bool(h) for _, info in ours_out for h in torch.as_tensor(info.het).reshape(-1).tolist()]
        except Exception as exc:
            result.error = _error(exc)
            _say(progress, f"  ace          error: {result.error}")
            return result, {"input_sets": count, "input_bytes": set_bytes * count}
    layer_shapes = [(m, n) for layers, m, n in groups for _ in range(layers)]
    if het is None:
        het = [k >= 2] * len(layer_shapes)
    result.note += f"; heterogeneous branch on {sum(het)} of {len(het)} layers"
    flops = {"fp32": 0.0, "fp64": 0.0}
    for (m, n), h in zip(layer_shapes, het, strict=True):
        f32, f64 = ace_flops(m, n, k, h)
        flops["fp32"] += f32
        flops["fp64"] += f64
    if timing_ours is not None:
        result.ours = _measurement(
            ours_impl, timing_ours, warmup_ours, "flops", nbytes=nbytes, flops=flops, input_sets=count
        )
        _say(progress, f"  ace          {'ace_batched':<22} {timing_ours.median * 1e3:10.3f} ms")
    outputs = {}
    try:
        timing_ref, ref_out, warmup_ref = _bench_impl(ref_impl, sets, device, repeats, budget)
        outputs[ref_impl.name] = ref_out
        result.references.append(
            _measurement(
                ref_impl, timing_ref, warmup_ref, "flops", nbytes=nbytes, flops=flops, input_sets=count
            )
        )
        _say(progress, f"  ace          {'ace_reference_style':<22} {timing_ref.median * 1e3:10.3f} ms")
    except Exception as exc:
        result.note += f"; reference failed: {_error(exc)}"
    if result.ours is not None:
        for m in result.references:
            speedup, verdict = compare(result.ours.timing, m.timing)
            agree = None
            if m.name in outputs:
                a = torch.cat([merged.float().reshape(-1) for merged, _ in ours_out])
                r = torch.cat([x.float().reshape(-1) for x in outputs[m.name]])
                agree = f"relative difference {((a - r).norm() / r.norm()).item():.1e}"
            result.comparisons.append(Comparison(m.name, speedup, verdict, agree))
    return result, {"input_sets": count, "input_bytes": set_bytes * count}


def _time_wall(call: Callable[[], float], repeats: int, warmup: int, budget: float) -> Timing:
    """Timing of `call`, which returns the seconds it measured itself."""
    estimate = 0.0
    for _ in range(warmup):
        estimate = max(estimate, call())
    samples = []
    while len(samples) < repeats:
        samples.append(call())
        if len(samples) == 1:
            per_call = max(estimate, samples[0])
            repeats = max(min(3, repeats), min(repeats, int(budget / per_call) if per_call > 0 else repeats))
    return Timing.of(samples)


def _run_stream(
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
    repeats: int,
    budget: float,
    progress: Progress,
) -> tuple[CaseResult, dict]:
    from ..engine import merge_checkpoints

    key = "quick" if quick else "full"
    size, shard = STREAM_MODEL[key], STREAM_SHARD_BYTES[key]
    itemsize = torch.empty((), dtype=dtype).element_size()
    model_bytes = size.numel() * itemsize
    nbytes = (k + 1) * model_bytes + model_bytes
    info = {
        "model": {"layers": size.layers, "hidden": size.hidden, "inter": size.inter, "vocab": size.vocab},
        "model_bytes": model_bytes,
        "shard_bytes": shard,
        "method": STREAM_METHOD,
    }
    result = CaseResult(
        "stream",
        "io",
        f"{STREAM_METHOD} of {k + 1} generated {model_bytes / 1e6:.1f} MB checkpoints through "
        "merge_checkpoints (inputs in the page cache); reference: the I/O floor, reading and "
        "writing the same bytes with safetensors",
    )
    root = Path(tempfile.mkdtemp(prefix="mk-bench-stream-"))
    try:
        models = write_models(root / "models", size, k, dtype=dtype, shard_bytes=shard)
        config = {
            "merge_method": STREAM_METHOD,
            "dialect": "mergekernels",
            "base_model": str(models[0]),
            "models": [{"model": str(m)} for m in models[1:]],
            "options": {"shard_size": shard},
        }
        out = root / "merged"
        report = {}

        def merge() -> float:
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            report["last"] = merge_checkpoints(config, out, device=str(device), quiet=True, overwrite=True)
            return time.perf_counter() - t0

        def floor() -> float:
            return io_floor(models, root / "floor", shard)

        ours_impl = Impl("merge_checkpoints", "mergekernels", merge)
        floor_impl = Impl("io_floor", "safetensors", floor)
        try:
            timing = _time_wall(merge, repeats, 1, budget)
        except Exception as exc:
            result.error = _error(exc)
            _say(progress, f"  stream       error: {result.error}")
            return result, info
        result.ours = _measurement(ours_impl, timing, 1, "io", nbytes=nbytes)
        rep = report["last"]
        info["engine_bytes_read"], info["engine_bytes_written"] = rep.bytes_read, rep.bytes_written
        _say(progress, f"  stream       {'merge_checkpoints':<22} {timing.median * 1e3:10.3f} ms")
        floor_timing = _time_wall(floor, repeats, 1, budget)
        result.references.append(_measurement(floor_impl, floor_timing, 1, "io", nbytes=nbytes))
        _say(progress, f"  stream       {'io_floor':<22} {floor_timing.median * 1e3:10.3f} ms")
        speedup, verdict = compare(timing, floor_timing)
        result.comparisons.append(Comparison("io_floor", speedup, verdict, None))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result, info


# ---- ceilings ------------------------------------------------------------------------------------
def _ceiling_rate(m: Measurement, c: ceil.Ceilings) -> float:
    if m.ceiling == "copy":
        return c.copy.gbps
    if m.ceiling == "host copy":
        return c.host_copy.gbps
    # FLOP-rated: the rate at which these FLOPs would run if each dtype's share ran at its matmul ceiling.
    ideal = sum(f / (c.matmul[d].gflops * 1e9) for d, f in (m.flops_by_dtype or {}).items() if f)
    return m.flops / ideal / 1e9 if ideal > 0 else math.nan


def _settle_ceilings(results: BenchResults, device: torch.device, progress: Progress) -> None:
    """Fractions of the ceilings; a ceiling some rate exceeds by more than CEILING_TOLERANCE is
    measured again (larger, longer), then fractions still above it are clamped to 1 and flagged."""
    c = results.ceilings
    measured = [m for m in results.measurements()]

    def over(m: Measurement) -> bool:
        rate = _ceiling_rate(m, c)
        return not math.isnan(rate) and m.rate > CEILING_TOLERANCE * rate

    same = c.host_copy is c.copy  # on a CPU
    if any(over(m) for m in measured if m.ceiling == "copy" or (same and m.ceiling == "host copy")):
        _say(progress, "  a rate exceeds the copy bandwidth: measuring the copy bandwidth again")
        old = c.copy
        c.copy = ceil.remeasure_copy(c.copy, device)
        if same:
            c.host_copy = c.copy
        results.notes.append(f"copy bandwidth measured twice (a kernel exceeded {old.gbps:.1f} GB/s)")
    if not same and any(over(m) for m in measured if m.ceiling == "host copy"):
        c.host_copy = ceil.remeasure_copy(c.host_copy, "cpu")
        results.notes.append("host copy bandwidth measured twice")
    flops_over = [m for m in measured if m.ceiling == "matmul" and over(m)]
    if flops_over:
        _say(progress, "  a rate exceeds the matmul ceiling: measuring the matmul rates again")
        for d in {d for m in flops_over for d in (m.flops_by_dtype or {})}:
            if d in c.matmul:
                c.matmul[d] = ceil.remeasure_matmul(c.matmul[d], device)
        results.notes.append("matmul ceilings measured twice (a case exceeded them)")
    for m in measured:
        m.ceiling_rate = _ceiling_rate(m, c)
        fraction = m.rate / m.ceiling_rate if m.ceiling_rate > 0 else math.nan
        if fraction > CEILING_TOLERANCE:
            m.ceiling_flag = (
                f"measured {fraction:.2f}x the {m.ceiling} ceiling even after measuring it again; "
                "fraction clamped to 1 (the inputs may have been served from a cache)"
            )
            fraction = 1.0
        m.ceiling_fraction = fraction
    if c.matmul and any(m.ceiling == "matmul" for m in measured):
        results.notes.append(
            "FLOP-rated fractions: the time these FLOPs would take at the fp32 and fp64 matmul ceilings "
            "over the median time"
        )


# ---- run -----------------------------------------------------------------------------------------
def run(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "bf16",
    experts: int = 8,
    size: str | Sequence[int] | None = None,
    preset: str | None = None,
    ops: str | Sequence[str] | None = None,
    quick: bool = False,
    *,
    repeats: int | None = None,
    seed: int = 0,
    slow_references: bool = True,
    progress: Progress = None,
    ceilings: ceil.Ceilings | None = None,
) -> BenchResults:
    """Measure the machine's ceilings, then every case in `ops` against its torch references.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (default: CUDA when available).
        dtype: storage dtype of the inputs, ``"bf16"`` (default), ``"fp16"`` or ``"fp32"``.
        experts: K, fine-tuned tensors per merge (default 8).
        size: the element-wise cases' tensor shape, ``(2048, 4096)`` or ``"2048x4096"`` (default:
            2048x4096 on a CPU, 4096x11008 on CUDA; 512x1024 with `quick`).
        preset: instead of `size`: ``"llama-7b-block"`` or ``"gpt2"``; also sets ACE's block.
        ops: cases to run (default all, :func:`available_ops`); aliases such as
            ``"task_arithmetic"`` and comma-separated strings are accepted.
        quick: small sizes (unless given), fewer repeats, a tiny streaming checkpoint: under a
            minute on 2 CPU cores.
        repeats: timed calls per implementation (default 5 on a CPU, 20 on CUDA; quick 5 / 10);
            slow calls are cut to fit a time budget per measurement, never below 3 (2 for a
            reference run without warm-up).
        seed: seed of the random inputs.
        slow_references: also time the argsort TIES reference.
        progress: called with one line per measurement (the CLI prints them).
        ceilings: reuse the ceilings of an earlier run on the same device (e.g.
            ``previous.ceilings``) instead of measuring them again; they may still be re-measured
            if a case exceeds them.

    Returns:
        :class:`BenchResults` (``.table()``, ``.to_json()``, ``.plot(path)``).

    Raises:
        ValueError: for a bad device, dtype, size, preset, op or expert count.
    """
    import mergekernels as mk

    dev = _resolve_device(device)
    dtype_name = _resolve_dtype(dtype)
    if isinstance(experts, bool) or not isinstance(experts, int) or not 1 <= experts <= 64:
        raise ValueError(f"experts must be an integer from 1 to 64, got {experts!r}")
    shape = _resolve_size(size, preset, dev, quick)
    names = resolve_ops(ops)
    if repeats is None:
        repeats = (10 if quick else 20) if dev.type == "cuda" else 5
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    budget = (1.0 if quick else 10.0) if dev.type == "cpu" else (1.0 if quick else 5.0)
    torch_dtype = DTYPES[dtype_name]
    ours_ok = dev.type == "cpu" or mk.has_cuda_kernels()
    llc = llc_bytes(dev)

    environment = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        "mergekernels": mk.__version__,
        "cuda": torch.version.cuda,
        "cuda_kernels": mk.has_cuda_kernels(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    t0 = time.perf_counter()
    if ceilings is None:
        _say(progress, f"measuring the ceilings on {environment['device']} ...")
        ceilings = ceil.measure_ceilings(dev, dtype_name, quick=quick)
    else:
        if not devices.same(ceilings.device, dev):
            raise ValueError(f"ceilings were measured on {ceilings.device}, not on {dev}")
        ceilings = copy.deepcopy(ceilings)
    _say(
        progress,
        f"  copy {ceilings.copy.gbps:.1f} GB/s; matmul "
        + ", ".join(f"{k} {v.gflops:.0f} GFLOP/s" for k, v in ceilings.matmul.items()),
    )
    ace_groups = _ace_groups(preset, dev, quick)
    settings: dict = {
        "device": dev.type,
        "dtype": dtype_name,
        "experts": experts,
        "size": list(shape),
        "preset": preset,
        "ops": names,
        "quick": quick,
        "repeats": repeats,
        "warmup": 1,
        "budget_s": budget,
        "seed": seed,
        "slow_references": slow_references,
        "llc_bytes": llc,
        "input_sets": 0,
        "input_bytes": 0,
        "ace_groups": [list(g) for g in ace_groups],
        "ace_experts": experts,
        "ace_params": dict(ACE_PARAMS, gate="auto"),
        "ace_input_sets": None,
        "stream": None,
        "win_margin": WIN_MARGIN,
        "ceiling_tolerance": CEILING_TOLERANCE,
    }
    cases: list[CaseResult] = []
    elementwise = elementwise_cases(names, mk.METHODS, slow_references)
    if elementwise:
        set_bytes = (experts + 1) * math.prod(shape) * torch.empty((), dtype=torch_dtype).element_size()
        count = rotation_sets(set_bytes, dev, llc)
        _say(progress, f"generating {count} input sets of {set_bytes / 1e6:.0f} MB ...")
        sets = elementwise_sets(experts, shape, torch_dtype, dev, seed, count)
        settings["input_sets"], settings["input_bytes"] = len(sets), sets.total_bytes
        for case in elementwise:
            cases.append(_run_elementwise(case, sets, dev, experts, repeats, budget, ours_ok, progress))
        del sets
    if "ace" in names:
        ace_repeats = min(repeats, 3 if dev.type == "cpu" and not quick else repeats)
        result, info = _run_ace(
            ace_groups, experts, torch_dtype, dev, seed, ace_repeats, budget, ours_ok, llc, progress
        )
        settings["ace_input_sets"] = info["input_sets"]
        cases.append(result)
    if "stream" in names:
        result, info = _run_stream(experts, torch_dtype, dev, quick, min(repeats, 5), budget, progress)
        settings["stream"] = info
        cases.append(result)
    order = {name: i for i, name in enumerate(names)}
    cases.sort(key=lambda c: order.get(c.name, len(order)))
    results = BenchResults(environment, settings, ceilings, cases)
    _settle_ceilings(results, dev, progress)
    settings["seconds"] = time.perf_counter() - t0
    return results
