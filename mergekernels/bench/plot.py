"""A PNG of each kernel's achieved bandwidth or FLOP rate against the ceilings (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import BenchResults

INSTALL_HINT = "pip install 'mergekernels[plot]'  (or: pip install matplotlib)"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailable(
            f"--plot needs matplotlib, which is not installed ({exc}). Install it with: {INSTALL_HINT}"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results: BenchResults, path: str | Path) -> None:
    """Two panels: GB/s of every memory-bound case (ours and the torch references, log scale) against
    the copy bandwidth, and GFLOP/s of the FLOP-rated cases against the matmul ceilings."""
    plt = _pyplot()
    bw = [(c, m) for c in results.cases for m in c.measurements() if m.rate_unit == "GB/s"]
    fl = [(c, m) for c in results.cases for m in c.measurements() if m.rate_unit == "GFLOP/s"]
    panels = [p for p in (("GB/s", bw), ("GFLOP/s", fl)) if p[1]]
    heights = [max(2.0, 0.32 * len(rows) + 1.2) for _, rows in panels] or [2.0]
    fig, axes = plt.subplots(
        len(panels) or 1, 1, figsize=(9, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    env, settings, ceilings = results.environment, results.settings, results.ceilings
    for ax, (unit, rows) in zip(axes[:, 0], panels, strict=False):
        labels = [m.name if m is c.ours else f"{m.name} ({m.impl})" for c, m in rows]
        values = [m.rate for _, m in rows]
        colors = ["tab:blue" if m is c.ours else "tab:gray" for c, m in rows]
        y = list(range(len(rows)))[::-1]
        ax.barh(y, values, color=colors)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(unit)
        if unit == "GB/s":
            lines = [(f"{ceilings.copy.kind} {ceilings.copy.gbps:.1f} GB/s", ceilings.copy.gbps)]
            if ceilings.host_copy is not ceilings.copy:
                lines.append(
                    (f"host memory copy {ceilings.host_copy.gbps:.1f} GB/s", ceilings.host_copy.gbps)
                )
        else:
            lines = [(f"matmul {k} {v.gflops:.0f} GFLOP/s", v.gflops) for k, v in ceilings.matmul.items()]
        styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
        for i, (label, value) in enumerate(lines):
            ax.axvline(value, color="tab:red", linestyle=styles[i % len(styles)], label=label)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"mergekernels bench, {env['device']} ({settings['device']}), {env['date'][:10]}\n"
        f"K={settings['experts']} x {'x'.join(map(str, settings['size']))} {settings['dtype']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
