"""The model card (``README.md``) written beside a merged model: what was merged, how, and the exact
configuration, with hub metadata (the hub ids of the inputs as ``base_model``), so that the output
directory can be published as it is."""

from __future__ import annotations

import yaml

from .. import __version__
from ..config import MergeConfig
from ..hub import is_hub_id

# One line per method family: what the merge computes.
_METHOD_LINES = {
    "linear": "a weighted average of the models' parameters",
    "task_arithmetic": "task arithmetic: the base plus a weighted sum of the task vectors (model - base)",
    "ties": "TIES: trimmed task vectors, an elected sign per parameter, and the mean of the agreeing ones",
    "dare_ties": "DARE with TIES' sign election: task vectors randomly sparsified and rescaled",
    "dare_linear": "DARE: task vectors randomly sparsified and rescaled, then summed",
    "breadcrumbs": "Model Breadcrumbs: task vectors without their smallest and largest entries",
    "breadcrumbs_ties": "Model Breadcrumbs with TIES' sign election",
    "della": "DELLA: task vectors pruned by magnitude-ranked keep probabilities, with sign election",
    "della_linear": "DELLA: task vectors pruned by magnitude-ranked keep probabilities",
    "passthrough": "passthrough: layers taken as they are from the listed slices",
}


def _models(cfg: MergeConfig) -> dict[str, bool]:
    """The models as written, the base first, each with whether it is a hub id (the configuration
    keeps a hub id unresolved; a local path it resolves)."""
    sources = [src for sl in cfg.slices for src in sl.sources]
    ordered = sorted(sources, key=lambda src: src.path != cfg.base_model)
    return {src.written: src.path == src.written and is_hub_id(src.written) for src in ordered}


def model_card(cfg: MergeConfig, name: str, config_yaml: str) -> str:
    """The card's text: YAML front matter (``base_model``: the inputs' hub ids; ``tags``), the method,
    the models, and the configuration that made it."""
    models = _models(cfg)
    base = next(iter(models))
    hub_ids = [m for m, on_hub in models.items() if on_hub]
    meta: dict = {}
    if hub_ids:
        meta["base_model"] = hub_ids
    meta["library_name"] = "transformers"
    meta["tags"] = ["mergekernels", "mergekit", "merge"]
    method = _METHOD_LINES.get(cfg.method, cfg.method)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        f"# {name}",
        "",
        f"A merge of {len(models)} pre-trained model(s), made with mergekernels {__version__} from a "
        "mergekit-compatible configuration.",
        "",
        "## Method",
        "",
        f"`{cfg.method}`: {method}"
        + (f", with `{base}` as the base model." if cfg.method not in ("linear", "passthrough") else "."),
    ]
    if cfg.layered:
        lines.append(f"The output's layers follow {len(cfg.slices)} slice(s) of the inputs' layers.")
    lines += ["", "## Models", ""]
    lines += [
        f"- [{m}](https://huggingface.co/{m.partition('@')[0]})" if on_hub else f"- `{m}`"
        for m, on_hub in models.items()
    ]
    lines += ["", "## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


__all__ = ["model_card"]
