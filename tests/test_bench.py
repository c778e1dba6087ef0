"""``mergekernels bench`` and ``mk.bench``: the --quick CLI run and its JSON, the ceilings, the verdicts,
the optional plot and the errors. The quick run happens once per module (it takes ~15-60 s on 2 cores)."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import math
import subprocess
import sys

import pytest
import torch

import mergekernels as mk
from mergekernels import bench, cli
from mergekernels.bench import ceilings as ceil
from mergekernels.bench.results import BenchResults, CaseResult, Measurement
from mergekernels.bench.runner import _settle_ceilings
from mergekernels.bench.timing import Comparison, Timing, compare, time_fn

# ---- the fields the JSON promises ----------------------------------------------------------------
TOP_FIELDS = {"schema", "environment", "settings", "ceilings", "cases", "notes"}
ENVIRONMENT_FIELDS = {
    "date",
    "device",
    "device_type",
    "torch",
    "mergekernels",
    "cuda",
    "cuda_kernels",
    "threads",
    "cpu_count",
    "python",
    "platform",
}
SETTINGS_FIELDS = {
    "device",
    "dtype",
    "experts",
    "size",
    "preset",
    "ops",
    "quick",
    "repeats",
    "warmup",
    "budget_s",
    "seed",
    "slow_references",
    "llc_bytes",
    "input_sets",
    "input_bytes",
    "ace_groups",
    "ace_experts",
    "ace_params",
    "ace_input_sets",
    "stream",
    "win_margin",
    "ceiling_tolerance",
    "seconds",
}
STREAM_FIELDS = {"model", "model_bytes", "shard_bytes", "method", "engine_bytes_read", "engine_bytes_written"}
COPY_FIELDS = {"kind", "gbps", "buffer_bytes", "sweep", "measurements"}
MATMUL_FIELDS = {"dtype", "gflops", "n", "sweep", "measurements"}
CASE_FIELDS = {"name", "kind", "note", "ours", "references", "comparisons", "error"}
MEASUREMENT_FIELDS = {
    "name",
    "impl",
    "median_s",
    "min_s",
    "max_s",
    "q1_s",
    "q3_s",
    "samples",
    "warmup",
    "bytes",
    "flops",
    "flops_by_dtype",
    "rate",
    "rate_unit",
    "ceiling",
    "ceiling_rate",
    "ceiling_fraction",
    "ceiling_flag",
    "input_sets",
}
COMPARISON_FIELDS = {"reference", "speedup", "verdict", "agreement"}
VERDICTS = {"faster", "slower", "no clear difference"}
# case -> the torch (or I/O) references it is compared with in a --quick run.
EXPECTED_REFERENCES = {
    "stats": set(),
    "threshold": {"threshold_kthvalue"},
    "masked_drop": {"masked_drop_bernoulli"},
    "ta": {"ta_torch"},
    "ties": {"ties_kthvalue", "ties_argsort"},
    "dare": {"dare_bernoulli"},
    "dare_ties": set(),
    "breadcrumbs": set(),
    "della": set(),
    "slerp": {"slerp_torch"},
    "multislerp": set(),
    "model_stock": {"model_stock_torch"},
    "nearswap": {"nearswap_torch"},
    "ram": {"ram_torch"},
    "sce": {"sce_torch"},
    "arcee_fusion": {"arcee_fusion_torch"},
    "ace": {"ace_reference_style"},
    "stream": {"io_floor"},
}
if "awd" in mk.METHODS:
    EXPECTED_REFERENCES["awd"] = set()


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``mergekernels bench --quick --device cpu --json FILE`` through the CLI; keeps the JSON, the
    printed table and the BenchResults object run() returned."""
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    captured = {}
    real_run = bench.run

    def spy(*args, **kwargs):
        captured["results"] = real_run(*args, **kwargs)
        return captured["results"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "run", spy)
        rc, out, err = _cli(["bench", "--quick", "--device", "cpu", "--json", str(path)])
    assert rc == 0, err
    return {
        "json": json.loads(path.read_text()),
        "stdout": out,
        "stderr": err,
        "results": captured["results"],
    }


# ---- the --quick run -----------------------------------------------------------------------------
def test_quick_json_has_every_field(quick):
    data = quick["json"]
    assert TOP_FIELDS <= data.keys()
    assert ENVIRONMENT_FIELDS <= data["environment"].keys()
    assert SETTINGS_FIELDS <= data["settings"].keys()
    assert STREAM_FIELDS <= data["settings"]["stream"].keys()
    env, settings = data["environment"], data["settings"]
    assert env["mergekernels"] == mk.__version__ and env["device_type"] == "cpu"
    assert settings["quick"] is True and settings["device"] == "cpu" and settings["dtype"] == "bf16"
    assert settings["experts"] == 8 and settings["size"] == [512, 1024]
    # Enough input sets rotate that a repeat does not find its inputs in the last-level cache.
    assert settings["input_sets"] >= 2
    assert settings["input_bytes"] >= 2 * settings["llc_bytes"] or settings["input_sets"] == 1

    ceilings = data["ceilings"]
    assert {"device", "copy", "host_copy", "matmul"} <= ceilings.keys()
    assert COPY_FIELDS <= ceilings["copy"].keys() and ceilings["copy"]["gbps"] > 0
    assert {"fp32", "fp64", "bf16"} <= ceilings["matmul"].keys()
    for rate in ceilings["matmul"].values():
        assert MATMUL_FIELDS <= rate.keys() and rate["gflops"] > 0

    assert [c["name"] for c in data["cases"]] == [op for op in bench.OPS if op in EXPECTED_REFERENCES]
    for case in data["cases"]:
        assert CASE_FIELDS <= case.keys()
        assert case["error"] is None, (case["name"], case["error"])
        assert {r["name"] for r in case["references"]} == EXPECTED_REFERENCES[case["name"]]
        for m in [case["ours"], *case["references"]]:
            assert MEASUREMENT_FIELDS <= m.keys()
            assert m["min_s"] <= m["q1_s"] <= m["median_s"] <= m["q3_s"] <= m["max_s"]
            assert len(m["samples"]) >= 2 and m["rate"] > 0
            assert m["rate_unit"] == ("GFLOP/s" if case["name"] == "ace" else "GB/s")
            assert (m["flops"] or 0) > 0 if case["name"] == "ace" else m["bytes"] > 0
        assert len(case["comparisons"]) == len(case["references"])
        for c in case["comparisons"]:
            assert COMPARISON_FIELDS <= c.keys() and c["verdict"] in VERDICTS and c["speedup"] > 0


def test_quick_fractions_of_ceilings_at_most_1_05(quick):
    for case in quick["json"]["cases"]:
        for m in [case["ours"], *case["references"]]:
            assert m["ceiling_rate"] > 0
            assert 0 < m["ceiling_fraction"] <= 1.05, (case["name"], m["name"], m["ceiling_fraction"])
            raw = m["rate"] / m["ceiling_rate"]
            assert m["ceiling_fraction"] == pytest.approx(raw) or (m["ceiling_flag"] and raw > 1.05)


def test_quick_exact_references_agree(quick):
    """Ours and the exact references give the same results on the same inputs (TIES vs argsort may
    differ where |tau| ties at the threshold, so only kthvalue is checked)."""
    comparisons = {(c["name"], x["reference"]): x for c in quick["json"]["cases"] for x in c["comparisons"]}
    for key in [("ta", "ta_torch"), ("ties", "ties_kthvalue"), ("threshold", "threshold_kthvalue")]:
        assert comparisons[key]["agreement"].startswith("max abs diff 0.00e+00"), comparisons[key]


def test_quick_prints_the_table(quick):
    out = quick["stdout"]
    assert out.startswith("mergekernels bench |")
    assert "| case | impl | median ms |" in out
    for case in EXPECTED_REFERENCES:
        assert f"\n| {case} | mergekernels |" in out
    assert "ceilings: host memory copy" in out


def test_api_returns_data(quick):
    results = mk.bench.run(
        device="cpu", quick=True, ops=["ta", "task_arithmetic", "masked_drop"], size="64x128", repeats=3,
        ceilings=quick["results"].ceilings,
    )  # fmt: skip
    assert isinstance(results, BenchResults)
    assert [c.name for c in results.cases] == ["masked_drop", "ta"]
    ta = results.case("ta")
    assert isinstance(ta, CaseResult) and isinstance(ta.ours, Measurement)
    assert ta.ours.bytes == bench.bytes_moved("ta", 8, 64 * 128, 2)
    assert isinstance(ta.comparisons[0], Comparison)
    data = json.loads(json.dumps(results.to_json()))
    assert data["settings"]["ops"] == ["masked_drop", "ta"] and data["settings"]["size"] == [64, 128]
    assert "| ta | mergekernels |" in results.table()


# ---- the plot ------------------------------------------------------------------------------------
def _hide_matplotlib(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_plot_without_matplotlib_says_how_to_install(quick, monkeypatch, tmp_path):
    _hide_matplotlib(monkeypatch)
    monkeypatch.setattr(bench, "run", lambda **kwargs: quick["results"])
    png, js = tmp_path / "bench.png", tmp_path / "bench.json"
    rc, out, err = _cli(["bench", "--quick", "--device", "cpu", "--json", str(js), "--plot", str(png)])
    assert rc != 0
    assert "matplotlib" in err and "pip install 'mergekernels[plot]'" in err
    assert "| case | impl |" in out  # the table is still printed
    assert json.loads(js.read_text())["cases"]  # and the JSON still written
    assert not png.exists()
    with pytest.raises(bench.PlotUnavailable, match=r"mergekernels\[plot\]"):
        quick["results"].plot(tmp_path / "again.png")


def test_plot_writes_a_png(quick, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    quick["results"].plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- no win within the spread --------------------------------------------------------------------
def _t(*samples: float) -> Timing:
    return Timing.of(list(samples))


def test_compare_needs_disjoint_spreads_for_a_win():
    # Medians 2x apart, but the spreads overlap: not a win.
    assert compare(_t(1.0, 1.1, 3.0), _t(2.0, 2.2, 2.5))[1] == "no clear difference"
    assert compare(_t(2.0, 2.2, 2.5), _t(1.0, 1.1, 3.0))[1] == "no clear difference"
    # Disjoint spreads: a win or a loss, with the speed-up reference / ours.
    speedup, verdict = compare(_t(1.0, 1.1, 1.2), _t(2.0, 2.2, 2.5))
    assert verdict == "faster" and speedup == pytest.approx(2.0)
    speedup, verdict = compare(_t(2.0, 2.2, 2.5), _t(1.0, 1.1, 1.2))
    assert verdict == "slower" and speedup == pytest.approx(0.5)
    # Disjoint but within the noise margin (and a single sample each): no clear difference.
    assert compare(_t(1.00, 1.01), _t(1.02, 1.03))[1] == "no clear difference"
    assert compare(_t(1.0), _t(1.04))[1] == "no clear difference"
    assert compare(_t(1.0), _t(1.2))[1] == "faster"
    # Identical timings.
    assert compare(_t(1.0, 1.0), _t(1.0, 1.0)) == (1.0, "no clear difference")


def test_comparison_wording_never_claims_an_unclear_win():
    text = Comparison("ref", 3.0, "no clear difference").describe()
    assert "no clear difference" in text and "faster" not in text
    assert Comparison("ref", 3.0, "faster").describe() == "3.0x faster than ref"
    assert Comparison("ref", 0.5, "slower").describe() == "2.0x slower than ref"


# ---- ceilings ------------------------------------------------------------------------------------
def _measurement(rate: float, ceiling: str = "copy") -> Measurement:
    return Measurement.from_timing(
        "k", "mergekernels", _t(1.0, 1.0), 1, bytes=int(rate * 1e9), flops=None, flops_by_dtype=None,
        rate=rate, rate_unit="GB/s", ceiling=ceiling, ceiling_rate=math.nan, ceiling_fraction=math.nan,
    )  # fmt: skip


def test_a_rate_above_the_ceiling_is_remeasured_then_clamped(monkeypatch):
    copy = ceil.BandwidthCeiling("host memory copy", 10.0, 1 << 28, {1 << 28: 10.0})
    calls = []

    def remeasure(c, device):
        calls.append(device)
        return ceil.BandwidthCeiling(c.kind, 12.0, c.buffer_bytes, c.sweep, c.measurements + 1)

    monkeypatch.setattr(ceil, "remeasure_copy", remeasure)
    fast, fine = _measurement(20.0), _measurement(5.0)
    case = CaseResult("x", "bandwidth", ours=fast, references=[fine])
    results = BenchResults({}, {}, ceil.Ceilings("cpu", copy, copy, {}), [case])
    _settle_ceilings(results, "cpu", None)
    assert len(calls) == 1  # measured again once
    assert results.ceilings.copy.gbps == 12.0 and results.ceilings.host_copy is results.ceilings.copy
    assert fast.ceiling_fraction == 1.0 and "clamped" in fast.ceiling_flag
    assert fine.ceiling_fraction == pytest.approx(5.0 / 12.0) and fine.ceiling_flag is None
    # Within the tolerance: neither measured again nor clamped.
    calls.clear()
    ok = _measurement(10.4)
    results = BenchResults(
        {}, {}, ceil.Ceilings("cpu", copy, copy, {}), [CaseResult("x", "bandwidth", ours=ok)]
    )
    _settle_ceilings(results, "cpu", None)
    assert not calls and ok.ceiling_fraction == pytest.approx(1.04) and ok.ceiling_flag is None


def test_copy_ceiling_sweeps_sizes_beyond_the_cache(monkeypatch):
    monkeypatch.setattr(ceil, "llc_bytes", lambda device: 32 << 20)
    sizes = ceil._copy_sizes(torch.device("cpu"), 1 << 30)
    assert sizes[0] >= 4 * (32 << 20) and sizes == sorted(sizes) and sizes[-1] <= 1 << 30


def test_time_fn_budget_cuts_repeats_but_not_below_the_minimum():
    calls = []
    timing = time_fn(lambda: calls.append(1), repeats=50, warmup=1, budget_s=0.0, min_repeats=3)
    assert len(timing.samples) == 3 and len(calls) == 4


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "12xfoo"], "bad shape '12xfoo'"),
        (["--size", "0x4"], "bad shape '0x4': sizes must be positive"),
        (["--ops", "ties", "nosuchop"], "unknown op 'nosuchop'; choose from: stats, threshold"),
        (["--experts", "0"], "experts must be an integer from 1 to 64"),
    ],
)
def test_bad_arguments_give_clear_errors(argv, message):
    rc, out, err = _cli(["bench", "--device", "cpu", *argv])
    assert rc == 2 and out == ""
    assert f"mergekernels bench: error: {message}" in err


def test_size_and_preset_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--size", "64x64", "--preset", "llama-7b-block"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_api_validates_before_measuring():
    with pytest.raises(ValueError, match="bad shape"):
        mk.bench.run(device="cpu", size="axb")
    with pytest.raises(ValueError, match="either a size or a preset"):
        mk.bench.run(device="cpu", size=(64, 64), preset="gpt2")
    with pytest.raises(ValueError, match="unknown preset"):
        mk.bench.run(device="cpu", preset="gpt5")
    with pytest.raises(ValueError, match="dtype must be one of"):
        mk.bench.run(device="cpu", dtype="int8")


def test_import_mergekernels_does_not_import_bench():
    code = "import sys, mergekernels; assert 'mergekernels.bench' not in sys.modules; mergekernels.bench.run"
    subprocess.run([sys.executable, "-c", code], check=True)
