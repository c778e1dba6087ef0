"""APL's open choices (tau1, tau2, the levels used) measured on a testbed (issue 13, section 2).

The spec (``specs/apl.md``) fixes the formulas but not the temperatures' values for a real model, nor
whether every level should shape the merge. This script scores each configuration as the demo
scores a method: the merge scale picked on validation, normalised accuracy reported on validation
and test, at each drop rate. DARE + task arithmetic is APL with tau1 = tau2 = inf (bit for bit), so
it is the first row of every drop rate.

    python benchmarks/apl_defaults.py --testbed text --drops 0.5 0.7 0.9 --json apl_defaults.json

Importance comes once per run from the testbed's calibration examples (``testbed.calibration``),
as the demo computes it. Merges run in memory (``mk.apl.merge``); they are the same numbers as the
engine's (tests/test_apl.py checks the two agree).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

from mergekernels.demo import load_testbed
from mergekernels.methods import apl

INF = math.inf
ALL = apl.LEVELS
# (label, plan parameters, importance parameters). The spec fixes tau1 = tau2 = 1 and all levels as
# defaults; the rows around it show what those choices do here. The open choices measured: k_min (the
# issue's floor, as a fraction of 1 - p), the layer partition and where the gradient is taken.
CONFIGS = [
    ("DARE (tau1 = tau2 = inf)", {"tau1": INF, "tau2": INF}, {}),
    ("defaults (spec: tau1 = tau2 = 1, all levels)", {}, {}),
    ("tau1 = 0.5", {"tau1": 0.5}, {}),
    ("tau1 = 2", {"tau1": 2.0}, {}),
    ("tau1 = 4", {"tau1": 4.0}, {}),
    ("tau2 = inf", {"tau2": INF}, {}),
    ("tau2 = 4", {"tau2": 4.0}, {}),
    ("levels model only", {"levels": ("model",)}, {}),
    ("levels model + layer", {"levels": ("model", "layer")}, {}),
    ("levels layer + hidden", {"levels": ("layer", "hidden")}, {}),
    ("k_min = 0.1 (1 - p)", {"k_min_fraction": 0.1}, {}),
    ("k_min = 0.5 (1 - p)", {"k_min_fraction": 0.5}, {}),
    ("layer = tensor", {}, {"layer": "tensor"}),
    ("grad_at = finetuned", {}, {"grad_at": "finetuned"}),
]
SCALES = (0.3, 0.5, 0.7, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--testbed", choices=["text", "digits"], default="text")
    parser.add_argument("--drops", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    parser.add_argument("--only", type=int, nargs="+", default=None, help="indices into CONFIGS")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()

    tb = load_testbed(text=args.testbed == "text")
    base = tb.base_state_dict()
    experts = tb.expert_state_dicts()
    print(tb.describe(), flush=True)
    calibration = {t: tb.calibration(t) for t in tb.tasks}
    importance: dict = {}

    def scores_for(options: dict) -> apl.APLScores:
        key = tuple(sorted(options.items()))
        if key not in importance:
            t0 = time.perf_counter()
            importance[key] = apl.importance(tb.model(base), tb.loss_fn, calibration, experts, **options)
            print(f"importance {options or '(defaults)'} in {time.perf_counter() - t0:.1f} s", flush=True)
        return importance[key]

    configs = [CONFIGS[i] for i in args.only] if args.only else CONFIGS
    rows = []
    header = f"{'drop':>5}  {'configuration':<46}{'scale':>7}{'val':>8}{'test':>8}{'max rescale':>13}"
    print(header, flush=True)
    for drop in args.drops:
        for label, plan_options, importance_options in configs:
            scores = scores_for(importance_options)
            plan_options = dict(plan_options)
            if "k_min_fraction" in plan_options:
                plan_options["k_min"] = plan_options.pop("k_min_fraction") * (1 - drop)
            best = None
            for scale in args.scales:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    the_plan = apl.plan(scores, drop=drop, scale=scale, **plan_options)
                merged = apl.merge(base, experts, scores=the_plan, exclude=tb.merge_exclude)
                val = tb.normalised_accuracy(merged, "val")
                if best is None or val > best[0]:
                    best = (val, scale, merged, max(the_plan.max_rescale) * (1 - drop))
            val, scale, merged, rescale = best
            test = tb.normalised_accuracy(merged, "test")
            row = {
                "drop": drop,
                "config": label,
                "plan": plan_options,
                "importance": importance_options,
                "scale": scale,
                "val": val,
                "test": test,
                "max_rescale_vs_dare": rescale,
            }
            rows.append(row)
            print(f"{drop:>5}  {label:<46}{scale:>7}{val:>8.3f}{test:>8.3f}{rescale:>12.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"testbed": tb.describe(), "rows": rows}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
