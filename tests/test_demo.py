"""The demo's testbed runs: each method's coefficient is a final scale of the merged task vector (the
coefficient search relies on it), the claims' verdicts, and a run on a cheap digits testbed."""

from __future__ import annotations

import pytest
import torch

import mergekernels as mk
from mergekernels import demo
from mergekernels import testbed as tb

from .test_apl import _setup, loss_fn

KNOBS = [label for label, (_, knob, _) in demo.TESTBED_METHODS.items() if knob is not None]


@pytest.fixture(scope="module")
def models():
    model, base, fts, calibration = _setup(tasks=3)
    scores = mk.apl.importance(model, loss_fn, calibration, fts)
    return base, fts, scores


@pytest.mark.parametrize("label", KNOBS)
def test_every_demo_coefficient_scales_the_merged_task_vector(models, label):
    base, fts, scores = models
    params, knob, _ = demo.TESTBED_METHODS[label]
    method = label.split(" ")[0]
    extra = {"scores": scores} if method == "apl" else {}
    one = mk.merge(base, fts, method, **params, **extra, **{knob: 1.0})
    other = mk.merge(base, fts, method, **params, **extra, **{knob: 0.7})
    changed = 0
    for name, value in other.items():
        expected = base[name] + 0.7 * (one[name] - base[name])
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=f"{label}: {name}")
        changed += int(not torch.equal(value, base[name]))
    assert changed > 0, label


def test_claims_report_what_was_measured():
    rows = [
        {"method": "task_arithmetic", "test": 0.90},
        {"method": "ties", "test": 0.95},
        {"method": "dare_linear", "test": 0.91},
        {"method": "apl", "test": 0.92},
        {"method": "dare_linear (p 0.9)", "test": 0.93},
        {"method": "apl (p 0.9)", "test": 0.80},
        {"method": "regmean", "test": 0.99},  # uses data: not in ACE's comparison
        {"method": "ace", "test": 0.94},
        {"method": "awd (per_row)", "test": 0.90},
    ]
    lines = "\n".join(demo.claims(rows))
    assert "APL >= DARE (p 0.5): 0.920 vs 0.910: holds" in lines
    assert "APL >= DARE (p 0.9): 0.800 vs 0.930: DOES NOT HOLD" in lines
    assert "the best other, ties 0.950: DOES NOT HOLD" in lines
    assert "AWD per_row >= task arithmetic: 0.900 vs 0.900: holds" in lines
    assert demo.claims([{"method": "linear", "test": 0.5}]) == []


def test_digits_demo_runs_through_the_engine(tmp_path, capsys, monkeypatch):
    cheap = tb.build_testbed(tmp_path / "digits", steps_scale=0.25)
    monkeypatch.setattr(demo, "load_testbed", lambda *args: cheap)
    rows = demo.run(methods=["task_arithmetic", "dare_linear", "apl"])
    assert [r["method"] for r in rows] == ["zero-shot (base)", "task_arithmetic", "dare_linear", "apl"]
    out = capsys.readouterr().out
    assert "APL >= DARE (p 0.5)" in out
    # the picked coefficient's model is the engine's: rescoring it gives the reported test score
    row = rows[1]
    value = float(row["picked"].split()[1])
    base, experts = cheap.base_state_dict(), cheap.expert_state_dicts()
    merged = mk.merge(base, experts, "task_arithmetic", scale=value, exclude=["head.*"])
    assert cheap.normalised_accuracy(merged, "test") == pytest.approx(row["test"], abs=1e-12)


def test_text_data_without_text_is_refused(capsys):
    from mergekernels.cli import main

    assert main(["demo", "--text-data", "somewhere"]) == 2
    assert "--text-data needs --text" in capsys.readouterr().err
