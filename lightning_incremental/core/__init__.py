"""Shared machinery every method uses (DESIGN.md §3–§4): write it here once, never in a method."""

from lightning_incremental.core.batch import (
    batch_size_of,
    concat_batches,
    index_batch,
    split_batch,
    split_inputs,
    task_labels_of,
)
from lightning_incremental.core.callback import ContinualCallback, add_to_loss
from lightning_incremental.core.logits import FeatureCapture, LogitsCapture
from lightning_incremental.core.modules import OldModel, frozen_copy

__all__ = [
    "ContinualCallback",
    "FeatureCapture",
    "LogitsCapture",
    "OldModel",
    "add_to_loss",
    "batch_size_of",
    "concat_batches",
    "frozen_copy",
    "index_batch",
    "split_batch",
    "split_inputs",
    "task_labels_of",
]
