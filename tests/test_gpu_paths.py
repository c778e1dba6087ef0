"""GPU-path logic that runs without a GPU: device identity (``cuda`` vs ``cuda:0``), ranks bound to
their GPU, matmul precision around the closed-form methods, the fake kernels under keyword calls,
selection without CUDA's nondeterministic ``kthvalue``, and the pinned staging ring of GPU merges.

Fake CUDA tensors (``FakeTensorMode``) report ``cuda:0`` like real ones, so the package's device
logic runs here as it would on a GPU; the CUDA-only checks at the end skip without one."""

from __future__ import annotations

import ast
import importlib
import threading
import time
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mergekernels as mk
from mergekernels import devices
from mergekernels.engine import ranks as ranks_module
from mergekernels.engine.staging import PinnedStaging
from mergekernels.selection import MagnitudeThreshold, kth_largest_abs

from .conftest import cuda, make_inputs

ace_module = importlib.import_module("mergekernels.methods.ace")

PACKAGE = Path(mk.__file__).parent


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as a machine with two GPUs, current device 0, shows it (for the device logic only)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


# ---------------------------------------------------------------------------------------------------
# 1. Device identity
def test_devices_compare_by_type_and_index(two_gpus):
    assert devices.same("cuda", "cuda:0") and devices.same(torch.device("cuda"), torch.device("cuda", 0))
    assert not devices.same("cuda", "cuda:1") and not devices.same("cuda:0", "cpu")
    assert devices.concrete("cuda") == torch.device("cuda", 0)
    assert devices.concrete("cpu") == torch.device("cpu")


def test_a_run_resolves_its_device_to_a_concrete_index(two_gpus, monkeypatch):
    assert devices.resolve("auto") == torch.device("cuda", 0)
    assert devices.resolve("cuda") == torch.device("cuda", 0)
    assert devices.resolve("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: this rank's GPU
    assert devices.resolve("cuda") == torch.device("cuda", 1)
    assert devices.resolve("auto") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:2': only 2 CUDA device\(s\) are visible"):
        devices.resolve("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError, match="local rank 3 has no GPU"):
        devices.resolve("cuda")


def test_no_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda': no CUDA device is available"):
        devices.resolve("cuda")
    assert devices.resolve("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device name"):
        devices.resolve("gpu0")


def test_selector_on_cuda_accepts_tensors_on_cuda_0():
    """The MagnitudeThreshold device check, with tensors that report cuda:0 and a selector made on
    "cuda" (TIES with chunked tensors or threshold_scope: global)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        base, fts = torch.empty(300, device="cuda"), [torch.empty(300, device="cuda") for _ in range(2)]
        assert base.device == torch.device("cuda", 0)
        selector = MagnitudeThreshold(2, device="cuda")
        selector.count(base, fts)
        selector.set_density(0.2)
        selector.refine(base, fts)
        assert selector.thresholds().device == torch.device("cuda", 0)


def test_global_threshold_merge_on_cuda():
    """mk.merge(..., device="cuda", threshold_scope="global") on fake CUDA tensors."""
    base = {"a": torch.randn(40, 7), "b": torch.randn(13)}
    experts = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    with FakeTensorMode(allow_non_fake_inputs=True):
        merged = mk.merge(base, experts, method="ties", device="cuda", threshold_scope="global", density=0.3)
    assert set(merged) == {"a", "b"}


def test_every_device_comparison_goes_through_devices_same():
    """No ``x.device == y`` / ``!=`` in the package: such comparisons are what broke cuda vs cuda:0."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare) or not any(
                isinstance(o, (ast.Eq, ast.NotEq)) for o in node.ops
            ):
                continue
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "device" for s in sides):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f"compare devices with mergekernels.devices.same: {offenders}"


# ---------------------------------------------------------------------------------------------------
# 3. Ranks bound to their GPU
def test_torchrun_ranks_bind_their_gpu_before_the_process_group(two_gpus, monkeypatch):
    import torch.distributed as dist

    calls = []

    def init_process_group(
        backend=None, init_method=None, timeout=None, world_size=-1, rank=-1, device_id=None
    ):
        calls.append(("init", backend, device_id))

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(ranks_module, "_default_store", lambda: None)
    ranks = ranks_module.Ranks.start("auto")
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl", torch.device("cuda", 1))]
    assert (ranks.rank, ranks.world, ranks.owns_group) == (1, 2, True)
    calls.clear()
    ranks_module.Ranks.start("cpu")  # a CPU merge: gloo, no GPU bound
    assert calls == [("init", "gloo", None)]


# ---------------------------------------------------------------------------------------------------
# 5. Smaller promises
def test_closed_form_products_are_full_float32_unless_tf32(monkeypatch):
    seen = []
    real_ace_merge, real_svd = ace_module._ops.ace_merge, torch.linalg.svd

    def ace_merge(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return real_ace_merge(*args, **kwargs)

    def svd(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(ace_module._ops, "ace_merge", ace_merge)
    monkeypatch.setattr(torch.linalg, "svd", svd)
    base, fts = make_inputs(3, (2, 9, 6), seed=1)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # a user's global TF32
    try:
        mk.methods.ace_batched(base, fts, tf32=False)
        mk.methods.tsv_m_batched(base, fts)
        mk.methods.iso_c_batched(base, fts)
        assert seen[0] == "highest" and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == "high"  # restored
    finally:
        torch.set_float32_matmul_precision(previous)


def test_fused_merge_fake_kernel_takes_keywords():
    args = dict(
        weights=[1.0, 1.0], scale=1.0, reduce=0, ties=False, weighted_election=False, sparsify=0,
        thresholds=None, keep_source=0, keep=[], step=[], post=[], rescale_inverse=True, row_keep=None,
        ranks=[], seed=0, key=0, element_offset=0, row_len=1,
    )  # fmt: skip
    with FakeTensorMode():
        base = torch.empty(5, dtype=torch.bfloat16)
        fts = [torch.empty(5, dtype=torch.bfloat16) for _ in range(2)]
        out = torch.ops.mergekernels.fused_merge(base, fts, **args, out_dtype=torch.float32)
        assert out.dtype == torch.float32
        assert (
            torch.ops.mergekernels.fused_merge(base, finetuned=fts, **args, out_dtype=None).dtype
            == torch.bfloat16
        )


def test_small_selection_on_cuda_does_not_use_kthvalue(monkeypatch):
    """CUDA's kthvalue is refused under torch.use_deterministic_algorithms(True): small tensors on a
    GPU go through the radix select too."""

    def refuse(*args, **kwargs):
        raise AssertionError("kthvalue called for a CUDA tensor")

    monkeypatch.setattr(torch.Tensor, "kthvalue", refuse)
    with FakeTensorMode(allow_non_fake_inputs=True):
        base = torch.empty(100, device="cuda")
        fts = [torch.empty(100, device="cuda") for _ in range(2)]
        (found,) = kth_largest_abs(base, fts, [[10, 20]])
        assert found.shape == (2,)


# ---------------------------------------------------------------------------------------------------
# Pinned staging ring
def test_staging_ring_copies_wraps_and_reuses_after_the_copies():
    ring = PinnedStaging(1024, pin=False)
    a = [torch.arange(100, dtype=torch.float32), torch.ones(3, dtype=torch.bfloat16)]  # 448 + 64 B aligned
    staged, first = ring.stage(a)
    assert all(torch.equal(s, t) and s.dtype == t.dtype for s, t in zip(staged, a, strict=True))
    assert staged[0].data_ptr() == ring.buffer.data_ptr()
    _, second = ring.stage([torch.zeros(100)])  # 448 B more: 960 of 1024 in use
    assert ring.used == 960

    class Event:  # a copy that finishes when told
        done = False

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    # A third unit fits only at the front, once the first unit's copies have finished.
    event = Event()
    ring.give_back(first, event)
    got = {}
    worker = threading.Thread(target=lambda: got.setdefault("r", ring.stage([torch.full((100,), 7.0)])))
    worker.start()
    worker.join(timeout=5)
    assert event.done, "the ring waited for the oldest region's copies"
    staged3, third = got["r"]
    assert staged3[0].data_ptr() == ring.buffer.data_ptr() and torch.equal(
        staged3[0], torch.full((100,), 7.0)
    )
    assert ring.used == 896
    ring.give_back(second)
    ring.give_back(third)
    assert ring.stage([torch.zeros(1)])[0][0].data_ptr() == ring.buffer.data_ptr()  # empty ring: front


def test_staging_ring_waits_for_the_consumer_and_stops():
    ring = PinnedStaging(512, pin=False)
    _, held = ring.stage([torch.zeros(100)])  # 448 of 512
    stop = threading.Event()
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", ring.stage([torch.zeros(100)], stop)))
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive(), "no room until the first unit is handed back"
    stop.set()
    worker.join(timeout=5)
    assert result["r"] is None
    big = [torch.zeros(1000)]
    assert ring.stage(big) == (big, None)  # larger than the ring: handed over unstaged
    ring.give_back(held)


# ---------------------------------------------------------------------------------------------------
# On a GPU
@cuda
def test_small_selection_under_deterministic_algorithms_on_cuda():
    base, fts = make_inputs(3, (1000,), seed=2, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        got = mk.magnitude_threshold(base, fts, 0.1)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(got.cpu(), mk.magnitude_threshold(base.cpu(), [x.cpu() for x in fts], 0.1))


@cuda
def test_ties_on_cuda_with_an_unindexed_device():
    base, fts = make_inputs(3, (300, 7), seed=3)
    cpu = mk.merge({"w": base}, [{"w": x} for x in fts], method="ties", threshold_scope="global", density=0.3)
    gpu = mk.merge(
        {"w": base},
        [{"w": x} for x in fts],
        method="ties",
        threshold_scope="global",
        density=0.3,
        device="cuda",
    )
    assert torch.equal(gpu["w"], cpu["w"])
