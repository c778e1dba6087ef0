"""Benchmark results as data: dataclasses, JSON and the terminal table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .ceilings import Ceilings
from .timing import Comparison, Timing

# A rate may exceed its ceiling by this factor (measurement noise) before it is clamped and flagged.
CEILING_TOLERANCE = 1.05


@dataclass
class Measurement:
    """One implementation timed on one case."""

    name: str
    impl: str  # "mergekernels", "torch" or "safetensors"
    median_s: float
    min_s: float
    max_s: float
    q1_s: float
    q3_s: float
    samples: list[float]
    warmup: int
    bytes: int | None  # least bytes the algorithm moves (see cases.bytes_moved)
    flops: float | None  # FLOPs counted (ACE: the package's work, see cases.ace_flops)
    flops_by_dtype: dict[str, float] | None
    rate: float  # achieved GB/s or GFLOP/s (over the median time)
    rate_unit: str
    ceiling: str  # which ceiling the rate is measured against
    ceiling_rate: float  # in rate_unit
    ceiling_fraction: float  # rate / ceiling_rate, at most CEILING_TOLERANCE (clamped to 1 beyond)
    ceiling_flag: str | None = None  # set when the raw fraction exceeded CEILING_TOLERANCE
    input_sets: int = 1

    @classmethod
    def from_timing(cls, name: str, impl: str, timing: Timing, warmup: int, **kw) -> Measurement:
        q1, q3 = timing.quartiles
        return cls(
            name=name,
            impl=impl,
            median_s=timing.median,
            min_s=timing.min,
            max_s=timing.max,
            q1_s=q1,
            q3_s=q3,
            samples=list(timing.samples),
            warmup=warmup,
            **kw,
        )

    @property
    def timing(self) -> Timing:
        return Timing(self.median_s, self.min_s, self.max_s, tuple(self.samples))


@dataclass
class CaseResult:
    name: str
    kind: str  # "bandwidth", "flops" or "io"
    note: str = ""
    ours: Measurement | None = None
    references: list[Measurement] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    error: str | None = None

    def measurements(self) -> list[Measurement]:
        return ([self.ours] if self.ours is not None else []) + list(self.references)


@dataclass
class BenchResults:
    """Everything one ``mergekernels bench`` run measured; ``to_json()`` is JSON-serialisable."""

    environment: dict
    settings: dict
    ceilings: Ceilings
    cases: list[CaseResult]
    notes: list[str] = field(default_factory=list)

    def case(self, name: str) -> CaseResult:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(name)

    def measurements(self) -> list[Measurement]:
        return [m for c in self.cases for m in c.measurements()]

    def to_json(self) -> dict:
        return {
            "schema": 1,
            "environment": self.environment,
            "settings": self.settings,
            "ceilings": self.ceilings.to_json(),
            "cases": [asdict(c) for c in self.cases],
            "notes": list(self.notes),
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        return render(self)

    def plot(self, path: str | Path) -> None:
        from .plot import plot

        plot(self, path)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def header(results: BenchResults) -> list[str]:
    env, s, c = results.environment, results.settings, results.ceilings
    lines = [
        f"mergekernels bench | {env['date']} | {env['device']} ({s['device']}, {env['threads']} threads) | "
        f"torch {env['torch']}" + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + f" | "
        f"mergekernels {env['mergekernels']}",
        f"K={s['experts']} x {'x'.join(map(str, s['size']))} {s['dtype']}"
        + (f" (preset {s['preset']})" if s.get("preset") else "")
        + f"; {s['input_sets']} input sets rotated ({s['input_bytes'] / 1e6:.0f} MB, last-level cache "
        f"{s['llc_bytes'] / 1e6:.0f} MB); repeats {s['repeats']}" + (" (quick)" if s["quick"] else ""),
        f"ceilings: {c.copy.kind} {c.copy.gbps:.1f} GB/s ({_mib(c.copy.buffer_bytes)} buffers)"
        + (f"; host memory copy {c.host_copy.gbps:.1f} GB/s" if c.host_copy is not c.copy else "")
        + (
            "; matmul GFLOP/s: " + ", ".join(f"{k} {v.gflops:.0f} (n={v.n})" for k, v in c.matmul.items())
            if c.matmul
            else ""
        ),
    ]
    return lines


def render(results: BenchResults) -> str:
    """A header and a markdown table: one row per implementation, ours first in each case."""
    lines = header(results) + [
        "",
        "| case | impl | median ms | min-max ms | MB moved | GFLOP | rate | of ceiling | vs reference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    footnotes: list[str] = []
    for case in results.cases:
        if case.error:
            lines.append(f"| {case.name} | - | | | | | | | error: {case.error} |")
            continue
        versus = {c.reference: c for c in case.comparisons}
        for m in case.measurements():
            impl = m.impl if m is case.ours else f"{m.impl}: {m.name}"
            cmp = "; ".join(c.describe() for c in case.comparisons) if m is case.ours else ""
            if m is not case.ours and m.name in versus and versus[m.name].agreement:
                footnotes.append(f"{case.name} vs {m.name}: {versus[m.name].agreement}")
            flag = "*" if m.ceiling_flag else ""
            if m.ceiling_flag:
                footnotes.append(f"* {case.name} / {m.name}: {m.ceiling_flag}")
            lines.append(
                f"| {case.name} | {impl} | {_ms(m.median_s)} | {_ms(m.min_s)}-{_ms(m.max_s)} | "
                f"{'' if m.bytes is None else f'{m.bytes / 1e6:.1f}'} | "
                f"{'' if m.flops is None else f'{m.flops / 1e9:.2f}'} | {m.rate:.2f} {m.rate_unit} | "
                f"{100 * m.ceiling_fraction:.1f}%{flag} {m.ceiling} | {cmp} |"
            )
    if footnotes:
        lines += ["", "agreement on the same inputs, and flags:"] + [f"- {f}" for f in footnotes]
    notes = [f"- {c.name}: {c.note}" for c in results.cases if c.note]
    if notes:
        lines += ["", "cases:"] + notes
    if results.notes:
        lines += [""] + [f"note: {n}" for n in results.notes]
    return "\n".join(lines)


def report(meta: dict, rows: list, render_rows, json_path: str | None) -> None:
    """For the scripts in benchmarks/: print a table, and when asked write the meta data and the rows
    (dataclasses) as JSON."""
    print()
    print(render_rows(meta, rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=2)
