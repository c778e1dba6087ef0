"""torch.distributed: two gloo ranks on CPU write the same files as one process."""

import datetime
import time

import pytest
import torch.multiprocessing as mp

from mergekernels.engine import merge_checkpoints

from .test_engine import _config, _files, models  # noqa: F401  (fixture)


def _rank(rank: int, world: int, store: str, config: dict, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        merge_checkpoints(config, out, device="cpu", quiet=True, shard_size=1500)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(models):  # noqa: F811
    tmp_path, _, _, paths = models
    runs = (
        ("dare_ties", {"drop": 0.5, "seed": 4}),
        ("ties", {"density": 0.3}),
        ("awd", {"granularity": "global", "scale_free": True}),  # each rank runs the statistics pass
    )
    for method, params in runs:
        cfg = _config(tmp_path, paths, method, **params)
        if method == "ties":
            cfg.setdefault("options", {})["threshold_scope"] = "global"  # exercises the all-reduce
        single, double = tmp_path / f"{method}-1", tmp_path / f"{method}-2"
        merge_checkpoints(cfg, single, device="cpu", quiet=True, shard_size=1500)
        ranks = mp.start_processes(
            _rank, args=(2, str(tmp_path / f"{method}.store"), cfg, str(double)), nprocs=2, join=False
        )
        deadline = time.monotonic() + 120
        while not ranks.join(timeout=1):  # raises if a rank failed
            if time.monotonic() > deadline:
                for process in ranks.processes:
                    process.kill()
                pytest.fail("the two ranks did not finish within 120 s")
        assert _files(double) == _files(single)
        assert len([f for f in _files(single) if f.startswith("model-")]) > 2
