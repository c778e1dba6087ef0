"""`mergekernels merge` under signals and beside other runs: SIGINT / SIGTERM at several points end
it within 2 s with 130 / 143 and a line saying where the work stands, leaving a resumable partial
directory (or, once the rename happened, the complete output); a second merge into the same OUT_DIR
is refused at once while the first goes on; a stale lock does not block --resume; an OUT_DIR in an
input model's directory is refused."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import mergekernels as mk
from mergekernels.cli import main as cli_main
from mergekernels.engine import merge_checkpoints
from mergekernels.engine import writer as writer_module

from .conftest import write_layer_models
from .test_engine import _config, _files, models  # noqa: F401  (fixture)

SHARD = 1500  # bytes: the test models' tensors make 4 shards

# `mergekernels merge` (through cli.entry, so with its os._exit) with one step made to wait: it
# touches the file REACHED there, then waits until the file GO appears. SIGINT is given Python's
# usual handler first, as in a terminal (a background job's ignored SIGINT stays ignored).
_WRAPPER = r"""
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)
where, reached, go = sys.argv[1:4]
sys.argv = ["mergekernels", *sys.argv[4:]]
from mergekernels.engine import run, writer

def wait():  # until GO appears (a signal interrupts the sleeps)
    Path(reached).touch()
    for _ in range(6000):
        if Path(go).exists():
            return
        time.sleep(0.01)

if where == "plan":
    run._plan = lambda *a, **k: wait()
elif where == "shard":  # the third shard's write takes "forever" (a huge shard)
    write = writer.CheckpointWriter.write_shard
    def slow(self, shard, tensors):
        if shard.index == 2:
            wait()
        write(self, shard, tensors)
    writer.CheckpointWriter.write_shard = slow
elif where == "index":  # publishing: the side files are written, the index not yet
    atomic = writer.CheckpointWriter._atomic_write
    def slow_index(self, path, data):
        if path.name == writer.INDEX_FILE:
            wait()
        atomic(self, path, data)
    writer.CheckpointWriter._atomic_write = slow_index
elif where == "rename":  # inside the section that defers signals: the plan file is gone
    fsync_dir = writer._fsync_dir
    def slow_fsync(path):
        if path.name.endswith(".partial") and not (path / writer.PLAN_FILE).exists():
            Path(reached).touch()
            while not Path(go).exists():  # signals wait for the end of this section
                time.sleep(0.01)
        fsync_dir(path)
    writer._fsync_dir = slow_fsync
from mergekernels.cli import entry
entry()
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(mk.__file__).parent.parent)}


def _start(tmp_path: Path, where: str, out: Path, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    reached, go = tmp_path / f"{out.name}.reached", tmp_path / f"{out.name}.go"
    command = [sys.executable, "-c", _WRAPPER, where, str(reached), str(go), "merge",
               str(tmp_path / "cfg.yml"), str(out), "--quiet", "--device", "cpu",
               "--shard-size", str(SHARD), *extra]  # fmt: skip
    proc = subprocess.Popen(command, env=_env(), stderr=subprocess.PIPE, text=True)
    return proc, reached, go


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the merge ended ({proc.returncode}) early: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} never appeared")
        time.sleep(0.005)


def _setup(models):  # noqa: F811
    tmp_path, _, _, paths = models
    cfg = _config(tmp_path, paths, "dare_ties", drop=0.5, seed=7)
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    config = str(tmp_path / "cfg.yml")  # as the command reads it (its merge_config.yml is the file's)
    merge_checkpoints(config, tmp_path / "clean", device="cpu", quiet=True, shard_size=SHARD)
    return tmp_path, config


# (name, where it waits, signal, shards written when it is sent, whether OUT_DIR is then published,
# whether an earlier OUT_DIR is being replaced: --overwrite)
POINTS = [
    ("plan", "plan", signal.SIGTERM, None, False, True),
    ("shard", "shard", signal.SIGINT, 2, False, False),
    ("index", "index", signal.SIGTERM, 4, False, False),
    ("rename", "rename", signal.SIGINT, None, True, False),
    ("replace", "rename", signal.SIGTERM, None, True, True),
]


def test_signals_stop_the_merge_resumably(models):  # noqa: F811
    """The merges run at once (each waits at its point, so the signal finds it idle); each is
    signalled in turn and must be gone within 2 s."""
    tmp_path, cfg = _setup(models)
    runs = []
    for name, where, *_, overwrite in POINTS:
        if overwrite:  # an earlier output, which stays until the new one replaces it
            (tmp_path / f"out-{name}").mkdir()
            (tmp_path / f"out-{name}" / "old.txt").write_text("old")
        runs.append(_start(tmp_path, where, tmp_path / f"out-{name}", *["--overwrite"] * overwrite))
    try:
        for point, (proc, reached, go) in zip(POINTS, runs, strict=True):
            name, where, signum, shards, published, overwrite = point
            out = tmp_path / f"out-{name}"
            partial = out.with_name(out.name + ".partial")
            _wait_for(reached, proc)
            sent = time.monotonic()
            proc.send_signal(signum)
            if where == "rename":  # signals wait for the section's end: let it end
                go.touch()
            _, err = proc.communicate(timeout=30)
            took = time.monotonic() - sent
            assert took < 2.0, (name, took)
            assert proc.returncode == 128 + signum, (name, err)
            head = f"mergekernels merge: interrupted ({signal.Signals(signum).name})"
            assert err.count("\n") == 1, err  # one line
            assert not (tmp_path / f"{out.name}.partial.lock").exists()  # let go of the lock
            if published:
                assert err == f"{head} after the merge finished: {out} is complete\n"
                assert not partial.exists() and not out.with_name(out.name + ".old").exists()
            else:
                if overwrite:
                    assert os.listdir(out) == ["old.txt"]  # untouched
                else:
                    assert not out.exists()
                if shards is None:
                    assert err == f"{head} before any output was written; nothing to resume\n"
                else:
                    where_it_stands = f"{shards} of 4 shards written to {partial}"
                    assert err == f"{head}: {where_it_stands}; run again with --resume to finish\n"
                    assert (partial / writer_module.PLAN_FILE).exists()
                merge_checkpoints(
                    cfg, out, device="cpu", quiet=True, shard_size=SHARD, resume=True, overwrite=overwrite
                )
            assert _files(out) == _files(tmp_path / "clean"), name
            assert not partial.exists() and not (tmp_path / f"{out.name}.partial.lock").exists()
    finally:
        for proc, _, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_second_merge_into_the_same_output_is_refused(models, capsys):  # noqa: F811
    """While one merge waits in its third shard's write, others into the same OUT_DIR (fresh,
    --overwrite, --resume) are refused at once, naming the first's pid, and touch nothing; the
    first then finishes with the bytes of a clean run."""
    tmp_path, _ = _setup(models)
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    first, reached, go = _start(tmp_path, "shard", out)
    try:
        _wait_for(reached, first)
        held = sorted(p.name for p in partial.iterdir())
        for extra in ([], ["--overwrite"], ["--resume"]):
            began = time.monotonic()
            code = cli_main(
                ["merge", str(tmp_path / "cfg.yml"), str(out), "--quiet", "--device", "cpu", *extra]
            )
            assert time.monotonic() - began < 1.0
            assert code == 2
            err = capsys.readouterr().err
            assert err.startswith(
                f"mergekernels merge: error: {out}: another merge into it is running (pid {first.pid} holds "
            )
            assert sorted(p.name for p in partial.iterdir()) == held
            assert first.poll() is None
        go.touch()
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert _files(out) == _files(tmp_path / "clean")
    assert not partial.exists() and not (tmp_path / "out.partial.lock").exists()


class _Killed(Exception):
    pass


def test_a_stale_lock_does_not_block_resume(models, monkeypatch):  # noqa: F811
    """A lock file left by a run that died (its pid is gone, its flock went with it) is taken over."""
    tmp_path, config = _setup(models)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    write = writer_module.CheckpointWriter.write_shard

    def write_one_then_die(self, shard, tensors):
        if shard.index == 1:
            raise _Killed
        write(self, shard, tensors)

    monkeypatch.setattr(writer_module.CheckpointWriter, "write_shard", write_one_then_die)
    with pytest.raises(_Killed):
        merge_checkpoints(config, out, device="cpu", quiet=True, shard_size=SHARD)
    monkeypatch.setattr(writer_module.CheckpointWriter, "write_shard", write)
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / "out.partial.lock"
    lock.write_text(f"{dead.pid}\n")
    command = ["merge", config, str(out), "--quiet", "--device", "cpu", "--shard-size", str(SHARD)]
    assert cli_main([*command, "--resume"]) == 0
    assert _files(out) == _files(tmp_path / "clean")
    assert not partial.exists() and not lock.exists()


def test_an_output_in_an_input_models_directory_is_refused(models, capsys):  # noqa: F811
    """OUT_DIR equal to or inside an input's directory (base, models, through a symlink, a LoRA
    adapter, the tokenizer's source), holding an input (a single-file model's directory), or with
    OUT_DIR.partial an input, is refused before anything is written; beside a single-file model
    it is not."""
    tmp_path, _, _, paths = models
    base, e1, e3 = tmp_path / "base", Path(paths[0]), Path(paths[2]).parent
    (tmp_path / "adapter").mkdir()  # never read: the refusal comes first
    (tmp_path / "tok").mkdir()
    (tmp_path / "link").symlink_to(e1, target_is_directory=True)
    (tmp_path / "x.partial").symlink_to(e1, target_is_directory=True)
    plain = _config(tmp_path, paths, "task_arithmetic")
    with_lora = _config(tmp_path, [f"{paths[0]}+{tmp_path / 'adapter'}", *paths[1:]], "task_arithmetic")
    with_x = _config(tmp_path, [str(tmp_path / "x.partial"), *paths[1:]], "task_arithmetic")
    tokenizer = {**plain, "tokenizer_source": str(tmp_path / "tok")}
    is_input = "is the directory of an input model"
    inside = "is inside the directory of an input model"
    holds = "holds an input model"
    cases = [
        (plain, base, is_input, base),
        (plain, base / "merged", inside, base),
        (plain, e3, holds, Path(paths[2])),  # a single-file model: its directory holds it
        (plain, tmp_path / "link" / "merged", inside, e1),
        (plain, tmp_path, holds, None),  # (with --overwrite it would be replaced)
        (with_lora, tmp_path / "adapter" / "out", inside, tmp_path / "adapter"),
        (with_x, tmp_path / "x", "its partial directory", e1),
        (tokenizer, tmp_path / "tok" / "out", inside, tmp_path / "tok"),
    ]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for i, (cfg, out, message, directory) in enumerate(cases):
        config = tmp_path / f"cfg{i}.yml"
        config.write_text(yaml.safe_dump(cfg))
        code = cli_main(["merge", str(config), str(out), "--quiet", "--device", "cpu", "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2, (out, err)
        assert err.startswith(f"mergekernels merge: error: {out}: {message}"), err
        if directory is not None:
            assert f"({directory.resolve()})" in err
        config.unlink()
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written
    # a directory beside a single-file model harms nothing
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(plain))
    assert (
        cli_main(["merge", str(tmp_path / "cfg.yml"), str(e3 / "merged"), "--quiet", "--device", "cpu"]) == 0
    )


def test_sigterm_at_a_random_moment_of_a_real_merge(tmp_path):
    """No step made to wait: SIGTERM once the first shard is written finds the reader, the kernels
    and the writer at work; the merge still ends within 2 s, and --resume gives the clean bytes."""
    write_layer_models(tmp_path, 24, (256, 1024))
    cfg = _config(tmp_path, [str(tmp_path / "e1"), str(tmp_path / "e2")], "ties", density=0.3)
    config = tmp_path / "cfg.yml"
    config.write_text(yaml.safe_dump(cfg))
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    command = [sys.executable, "-m", "mergekernels", "merge", str(config), str(out), "--quiet",
               "--device", "cpu", "--shard-size", "1MB"]  # fmt: skip
    proc = subprocess.Popen(command, env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (partial.is_dir() and any(partial.glob("model-*.safetensors"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.002)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - sent < 2.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    where = re.escape(str(partial))
    message = rf"mergekernels merge: interrupted \(SIGTERM\): \d+ of 24 shards written to {where}; run again"
    assert re.fullmatch(message + r" with --resume to finish\n", err), err
    assert not out.exists()
    merge_checkpoints(str(config), out, device="cpu", quiet=True, shard_size="1MB", resume=True)
    merge_checkpoints(str(config), tmp_path / "clean", device="cpu", quiet=True, shard_size="1MB")
    assert _files(out) == _files(tmp_path / "clean")
