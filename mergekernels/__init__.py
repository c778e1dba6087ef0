"""mergekernels: C++/CUDA kernels for model merging.

Per-tensor methods take ``base`` (theta_0) and ``finetuned`` (theta_1..theta_K) and return the
merged tensor in base's dtype on base's device; task vectors tau_t = theta_t - theta_0 are formed
inside the kernels and never materialised. ``merge`` does the same for whole state dicts.
"""

__version__ = "0.1.0"  # before the imports: submodules read it

from ._ops import has_cuda_kernels, masked_drop, tensor_key
from .engine import MergeReport, merge_checkpoints
from .merge import merge
from .methods import (
    METHODS,
    AceInfo,
    ace,
    apl,
    arcee_fusion,
    awd,
    breadcrumbs,
    collect_input_grams,
    dare,
    della,
    iso_c,
    iso_cts,
    karcher,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    ramplus_tl,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv_m,
    wudi,
)
from .selection import MagnitudeThreshold, magnitude_threshold
from .stats import TaskVectorStats, task_vector_stats

__all__ = [
    "METHODS",
    "AceInfo",
    "ace",
    "apl",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
    "sce",
    "awd",
    "collect_input_grams",
    "iso_c",
    "iso_cts",
    "karcher",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "regmean",
    "slerp",
    "tsv_m",
    "wudi",
    "MagnitudeThreshold",
    "TaskVectorStats",
    "breadcrumbs",
    "dare",
    "della",
    "has_cuda_kernels",
    "magnitude_threshold",
    "masked_drop",
    "merge",
    "merge_checkpoints",
    "MergeReport",
    "task_arithmetic",
    "task_vector_stats",
    "tensor_key",
    "ties",
]


def __getattr__(name: str):
    """``mergekernels.bench`` is imported on first use, so ``import mergekernels`` stays light."""
    if name == "bench":
        import importlib

        return importlib.import_module(".bench", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
