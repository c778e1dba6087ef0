"""Streaming merges of checkpoints on disk (``mk.merge_checkpoints``, ``mergekernels merge``).

``checkpoint`` reads (lazy safetensors reads, HF layouts), ``writer`` writes (atomic shards, index
last, resume), ``run`` plans and executes (reader / compute / writer overlap).
"""

from .checkpoint import Checkpoint, CheckpointError
from .run import MergeReport, merge_checkpoints
from .writer import OutputError

__all__ = ["Checkpoint", "CheckpointError", "MergeReport", "OutputError", "merge_checkpoints"]
