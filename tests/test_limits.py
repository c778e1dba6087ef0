"""The merge command at the machine's limits: memory that cannot fit, a disk that fills, inputs that
change while they are read. Each ends in a clear error naming what and where, and no output that
looks complete; a full disk's partial output completes with --resume once space is freed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergekernels.cli import main as cli_main

from .test_engine import _config, models  # noqa: F401  (the fixture)


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
