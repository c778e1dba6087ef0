"""torch.distributed: two gloo ranks on CPU write the same files as one process, and a rank that fails
stops the other with its error."""

import datetime
import time

import pytest
import torch.multiprocessing as mp

from mergekernels.engine import merge_checkpoints

from .test_engine import _config, _files, models  # noqa: F401  (fixture)


def _join(rank: int, world: int, store: str, timeout_s: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _wait(ranks, seconds: int, what: str) -> None:
    """Join the rank processes (raising if one failed); kill them and fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"{what}: the ranks did not finish within {seconds} s")


def _rank(rank: int, world: int, store: str, config: dict, out: str) -> None:
    import torch.distributed as dist

    _join(rank, world, store, 60)
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
        _wait(ranks, 120, method)
        assert _files(double) == _files(single)
        assert len([f for f in _files(single) if f.startswith("model-")]) > 2


def _failing_rank(rank: int, world: int, store: str, config: dict, out: str, report: str) -> None:
    """Rank 1 finds every tensor non-finite (as if its share of the files were corrupt); both ranks
    write what they raised to `report`.<rank>."""
    import torch.distributed as dist

    from mergekernels.engine import reader

    if rank == 1:

        def corrupt(self, task, rows=None):
            raise self.nonfinite_error(task, 0)

        reader.InputReader.read = corrupt
    _join(rank, world, store, 300)
    try:
        merge_checkpoints(config, out, device="cpu", quiet=True, shard_size=1500)
        message = "finished"
    except Exception as exc:  # noqa: BLE001 - the test reads what each rank raised
        message = f"{type(exc).__name__}: {exc}"
    finally:
        dist.destroy_process_group()
    with open(f"{report}.{rank}", "w") as f:
        f.write(message)


def test_a_failing_rank_stops_every_rank_with_its_error(models):  # noqa: F811
    """No rank waits for a failed one: every rank stops promptly, naming the failed rank and its error
    (the collective timeout here is 300 s; the test allows 60)."""
    tmp_path, _, _, paths = models
    for method, params in (("task_arithmetic", {}), ("ties", {"density": 0.3})):
        cfg = _config(tmp_path, paths, method, **params)
        if method == "ties":
            cfg.setdefault("options", {})["threshold_scope"] = "global"  # fails before an all-reduce
        report = tmp_path / f"{method}.report"
        args = (2, str(tmp_path / f"{method}.fail.store"), cfg, str(tmp_path / f"{method}-out"), str(report))
        _wait(
            mp.start_processes(_failing_rank, args=args, nprocs=2, join=False),
            60,
            f"{method} after rank 1 failed",
        )
        failed = (tmp_path / f"{method}.report.1").read_text()
        stopped = (tmp_path / f"{method}.report.0").read_text()
        assert failed.startswith("CheckpointError") and "NaN or Inf" in failed
        assert stopped.startswith("RankFailed: rank 0 stopped: rank 1 failed: CheckpointError")
        assert "NaN or Inf" in stopped
        assert not (tmp_path / f"{method}-out").exists()


def test_a_lost_store_is_reported_as_a_failed_rank():
    from mergekernels.engine.ranks import RankFailed, Ranks

    class GoneStore:  # the process hosting the store has exited
        def add(self, key, value):
            raise RuntimeError("Connection reset by peer")

    ranks = Ranks(rank=1, world=2, store=GoneStore(), prefix="run/")
    with pytest.raises(RankFailed, match="rank 1 stopped: lost contact with the other ranks"):
        ranks.sync()
    ranks._last_check = -1e9
    with pytest.raises(RankFailed, match="lost contact"):
        ranks.check()
