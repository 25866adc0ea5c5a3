"""Shared machinery every method uses: write it here once, never in a method (``docs/architecture.md``)."""

from lightning_incremental.core._lightning import (
    continue_logging_step,
    logging_step,
    should_update_logs,
    spawned_launcher,
    validation_dataloaders,
)
from lightning_incremental.core.base import PROGRESS_KEY, ContinualCallback, FisherSource, task_of
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
from lightning_incremental.core.checkpoint import TaskCheckpoint
from lightning_incremental.core.classifier import (
    FeatureCapture,
    check_submodule_argument,
    head_by_name,
    logits_producers,
    resolve_submodule,
)
from lightning_incremental.core.distillation import class_columns, distillation_loss, top_k_distillation_loss
from lightning_incremental.core.distributed import all_reduce_sum, rank_and_world_size
from lightning_incremental.core.freezing import FrozenPart, batchnorms_without_training
from lightning_incremental.core.interface import ModelInterface, check_interface_argument, interface_of, model_within
from lightning_incremental.core.modules import OldModel, frozen_copy
from lightning_incremental.core.optimizer_state import (
    CarriedOptimizerState,
    grow_param_state,
    optimizer_state_carrier,
)
from lightning_incremental.core.passes import eval_mode, own_pass, private_pass, rows_of, task_rows
from lightning_incremental.core.sharding import (
    any_sharded,
    full_state,
    gather_full,
    is_sharded,
    local,
    shard_of,
    shard_state,
    sum_to_shard,
)
from lightning_incremental.core.state import assign_state_keys
from lightning_incremental.core.step_chain import Step, StepChain, add_to_loss
from lightning_incremental.core.targets import IGNORE_INDEX, are_class_labels
from lightning_incremental.core.tensors import grow_to, is_growth

__all__ = [
    "IGNORE_INDEX",
    "PROGRESS_KEY",
    "CarriedOptimizerState",
    "ContinualCallback",
    "FeatureCapture",
    "FisherSource",
    "FrozenPart",
    "ModelInterface",
    "OldModel",
    "Step",
    "StepChain",
    "TaskCheckpoint",
    "add_to_loss",
    "all_reduce_sum",
    "any_sharded",
    "are_class_labels",
    "assign_state_keys",
    "batch_leaves",
    "batch_size_of",
    "batchnorms_without_training",
    "check_interface_argument",
    "check_submodule_argument",
    "class_columns",
    "concat_batches",
    "continue_logging_step",
    "distillation_loss",
    "eval_mode",
    "frozen_copy",
    "full_state",
    "gather_full",
    "grow_param_state",
    "grow_to",
    "head_by_name",
    "index_batch",
    "interface_of",
    "is_growth",
    "is_sharded",
    "local",
    "logging_step",
    "logits_producers",
    "model_within",
    "optimizer_state_carrier",
    "own_pass",
    "private_pass",
    "rank_and_world_size",
    "resolve_submodule",
    "rows_of",
    "shard_of",
    "shard_state",
    "should_update_logs",
    "spawned_launcher",
    "split_batch",
    "split_inputs",
    "sum_to_shard",
    "task_labels_of",
    "task_of",
    "task_rows",
    "top_k_distillation_loss",
    "validation_dataloaders",
    "with_leaves",
]
