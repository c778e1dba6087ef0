"""Plain-torch reference merges: they live in :mod:`mergekernels.bench.references` (shared with
``mergekernels bench``) and are re-exported here for the benchmark scripts."""

from __future__ import annotations

from mergekernels.bench.references import (
    ACE_DELTA,
    MERGE_MODES,
    ace_reference_style,
    dare_bernoulli,
    masked_drop_bernoulli,
    ta_torch,
    threshold_kthvalue,
    ties_argsort,
    ties_kthvalue,
)

__all__ = [
    "ACE_DELTA",
    "MERGE_MODES",
    "ace_reference_style",
    "dare_bernoulli",
    "masked_drop_bernoulli",
    "ta_torch",
    "threshold_kthvalue",
    "ties_argsort",
    "ties_kthvalue",
]
