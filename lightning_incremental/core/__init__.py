"""Shared machinery every method uses: write it here once, never in a method (``docs/architecture.md``)."""

from lightning_incremental.core.base import ContinualCallback, task_of
from lightning_incremental.core.batch import (
    batch_leaves,
    batch_size_of,
    concat_batches,
    index_batch,
    split_batch,
    split_inputs,
    task_labels_of,
    with_leaves,
)
from lightning_incremental.core.interface import ModelInterface, check_interface_argument, interface_of
from lightning_incremental.core.logits import FeatureCapture, LogitsCapture
from lightning_incremental.core.modules import OldModel, frozen_copy
from lightning_incremental.core.passes import eval_mode, private_pass
from lightning_incremental.core.state import assign_state_keys
from lightning_incremental.core.step_chain import Step, StepChain, add_to_loss

__all__ = [
    "ContinualCallback",
    "FeatureCapture",
    "LogitsCapture",
    "ModelInterface",
    "OldModel",
    "Step",
    "StepChain",
    "add_to_loss",
    "assign_state_keys",
    "batch_leaves",
    "batch_size_of",
    "check_interface_argument",
    "concat_batches",
    "eval_mode",
    "frozen_copy",
    "index_batch",
    "interface_of",
    "private_pass",
    "split_batch",
    "split_inputs",
    "task_labels_of",
    "task_of",
    "with_leaves",
]
