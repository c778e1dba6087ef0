"""The merge command at the machine's limits: memory that cannot fit, a disk that fills, inputs that
change while they are read. Each ends in a clear error naming what and where, and no output that
looks complete; a full disk's partial output completes with --resume once space is freed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import mergekernels as mk
from mergekernels.cli import main as cli_main
from mergekernels.engine import CheckpointError, merge_checkpoints
from mergekernels.engine import checkpoint as checkpoint_module
from mergekernels.engine import run as run_module
from mergekernels.engine import writer as writer_module

from .conftest import write_layer_models
from .test_engine import _config, _files, models  # noqa: F401  (the fixture)


def _run(tmp_path: Path, cfg: dict, out: Path, *extra: str) -> int:
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    return cli_main(["merge", str(tmp_path / "cfg.yml"), str(out), "--quiet", "--device", "cpu", *extra])


@pytest.mark.parametrize("method", ["tsv_m", "ace"])
def test_a_matrix_layer_over_the_memory_cap_is_refused_before_any_read(models, capsys, method):  # noqa: F811
    tmp_path, _, _, paths = models
    cfg = _config(tmp_path, paths, method)
    cfg["options"] = {"memory_cap": "4KB"}
    out = tmp_path / "out"
    assert _run(tmp_path, cfg, out) == 2
    err = capsys.readouterr().err
    assert f"{method} merges it whole" in err and "over the memory cap of 0.00 GiB (4000 bytes)" in err
    assert "options.memory_cap" in err and "'embed.weight' (64 x 24, 3 models)" in err
    assert not out.exists() and not out.with_name("out.partial").exists()
    # with room for one layer at a time it merges
    cfg["options"] = {"memory_cap": "64MB"}
    assert _run(tmp_path, cfg, out) == 0 and (out / "model.safetensors.index.json").exists()


def _square_models(tmp_path: Path, experts: int = 2) -> list[Path]:
    """A base and experts of a few 256 x 256 bf16 tensors (128 KiB each: many pages per tensor)."""
    return write_layer_models(tmp_path, 4, (256, 256), experts)


def _ta_config(paths: list[Path]) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(paths[0]),
        "models": [{"model": str(p)} for p in paths[1:]],
        "dialect": "mergekernels",
    }


def test_an_input_replaced_during_the_merge_is_an_error_naming_it(tmp_path, monkeypatch):
    """Rewritten after the merge read part of it: the next read of that file refuses; the partial
    output (which may mix the two versions) is removed and nothing is published."""
    paths = _square_models(tmp_path)
    target = paths[1] / "model.safetensors"
    original = checkpoint_module.Checkpoint.read
    calls = []

    def read(self, name, rows=None):
        calls.append(name)
        if len(calls) == 2:  # after the first tensors were read: a new version of the file appears
            sd = {
                n: torch.zeros(256, 256, dtype=torch.bfloat16)
                for n in (f"layers.{i}.weight" for i in range(4))
            }
            save_file(sd, str(target), metadata={"version": "2"})
        return original(self, name, rows)

    monkeypatch.setattr(checkpoint_module.Checkpoint, "read", read)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"{target}: changed while the merge read it"):
        merge_checkpoints(_ta_config(paths), out, device="cpu", quiet=True, shard_size="100KB")
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_an_input_touched_after_its_last_read_stops_the_publication(tmp_path, monkeypatch):
    """Every read done, then an input's mtime changes: the check before publishing refuses."""
    paths = _square_models(tmp_path)
    target = paths[2] / "model.safetensors"
    original = writer_module.CheckpointWriter.finish

    def finish(self, side_files, total_size):
        raise AssertionError("published although an input changed")

    def touch_then_stream(*args, **kwargs):
        written = stream(*args, **kwargs)
        os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
        return written

    stream = run_module._stream
    monkeypatch.setattr(run_module, "_stream", touch_then_stream)
    monkeypatch.setattr(writer_module.CheckpointWriter, "finish", finish)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"{target}: changed while the merge read it \(modified\)"):
        merge_checkpoints(_ta_config(paths), out, device="cpu", quiet=True)
    assert not out.exists() and not out.with_name("out.partial").exists()
    monkeypatch.setattr(writer_module.CheckpointWriter, "finish", original)
    monkeypatch.setattr(run_module, "_stream", stream)
    merge_checkpoints(_ta_config(paths), out, device="cpu", quiet=True)  # stable inputs: published
    assert (out / "model.safetensors.index.json").exists()


TRUNCATE_DURING_READ = """
import os, sys
import mergekernels.engine.checkpoint as checkpoint
original = checkpoint.Checkpoint.read
def read(self, name, rows=None):
    tensor = original(self, name, rows)  # a view of the file's map, its pages not touched yet
    if self.path.name == "e1":
        os.truncate(self.info(name).file, 100)  # every data page of the map now lies past the end
    return tensor
checkpoint.Checkpoint.read = read
from mergekernels.cli import entry
sys.argv = ["mergekernels", "merge", *sys.argv[1:]]
entry()
"""


def test_an_input_truncated_under_its_map_ends_with_an_error_not_a_bus_error(tmp_path):
    """The kernel touches a page of an input that was truncated after it was mapped: SIGBUS, which
    the merge command turns into its error naming the file (status 2); nothing is published."""
    paths = _square_models(tmp_path)
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(_ta_config(paths)))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(mk.__file__).parent.parent)}
    cmd = [
        sys.executable,
        "-c",
        TRUNCATE_DURING_READ,
        str(tmp_path / "cfg.yml"),
        str(out),
        "--quiet",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    target = paths[1] / "model.safetensors"
    assert f"mergekernels merge: error: {target}: the file changed (was truncated or replaced)" in proc.stderr
    assert not out.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MB tmpfs (root only; skipped where mounting is not allowed), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_disk_stops_with_the_space_needed_and_resumes_once_freed(tmp_path, small_disk, capsys):
    """A 12 MB output onto a 5 MB disk: warned up front, stopped in the third shard with an error
    naming the shard and the space needed; after the disk grows, --resume finishes it, byte for
    byte equal to a merge that never stopped."""
    paths = write_layer_models(tmp_path, 12, (512, 1024))
    cfg = _ta_config(paths)
    assert _run(tmp_path, cfg, tmp_path / "clean", "--shard-size", "2MiB") == 0
    capsys.readouterr()

    out = small_disk / "out"
    assert _run(tmp_path, cfg, out, "--shard-size", "2MiB") == 2
    err = capsys.readouterr().err
    assert f"warning: {out}.partial: the output needs about 12.58 MB more, but" in err
    assert f"error: {out}.partial/model-00003-of-00006.safetensors: the disk is full" in err
    assert "the rest of the output needs about 8.39 MB" in err and "--resume" in err
    assert not out.exists()
    assert sorted(p.name for p in (small_disk / "out.partial").glob("model-*")) == [
        "model-00001-of-00006.safetensors",
        "model-00002-of-00006.safetensors",
    ]
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    assert _run(tmp_path, cfg, out, "--shard-size", "2MiB", "--resume") == 0
    assert _files(out) == _files(tmp_path / "clean")
    assert not (small_disk / "out.partial").exists()
