"""Importance estimated from per-sample gradients over the task's data: the common part of EWC and MAS."""

from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_incremental.core import (
    ModelInterface,
    all_reduce_sum,
    batch_size_of,
    check_interface_argument,
    index_batch,
    interface_of,
    own_pass,
    private_pass,
    task_rows,
)
from lightning_incremental.core.per_sample import Reduction, per_sample_grad_sums, without_fast_path
from lightning_incremental.core.sharding import any_sharded, sum_to_shard
from lightning_incremental.methods.regularization._quadratic import (
    QuadraticPenalty,
    all_reduce_sums,
    named_trainable_parameters,
)


class SampledImportance(QuadraticPenalty):
    """A quadratic penalty whose importance is a mean of per-sample gradient magnitudes.

    At a task end it reads up to ``importance_samples`` training samples from the fit's train dataloader (each
    DDP rank its shard), in eval mode and fp32, and all-reduces the sums; the pass leaves the user's random
    stream untouched. In task-free use (``consolidate_every_n_steps``) it uses the most recent training batches
    instead. The estimator is the mean over samples of ``phi`` of each sample's gradient, never ``phi`` of an averaged
    gradient: on a ``fully_shard``-ed model each rank sums its rows' per-sample terms for whole parameters (the layer
    rule of :mod:`~lightning_incremental.core.per_sample`) and a reduce-scatter leaves each rank its shard of the sum
    over every row, the single-process estimate on the same rows (``tests/test_sharded.py``). The model's outputs and
    targets come from the model interface; a batch it cannot use is refused at the first training step of a task,
    not after the task.
    """

    reduction: Reduction = "square"

    def __init__(
        self,
        lambda_: float,
        importance_samples: int | None,
        model_interface: ModelInterface | None,
        chunk_size: int,
        consolidate_every_n_steps: int | None,
        state_dtype: torch.dtype | str | None,
    ) -> None:
        super().__init__(lambda_, consolidate_every_n_steps, state_dtype)
        if importance_samples is not None and importance_samples < 1:
            raise ValueError(
                f"`importance_samples` must be a positive integer or None (the whole task), got {importance_samples}."
            )
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
        self.importance_samples = importance_samples
        self.model_interface = check_interface_argument(model_interface)
        self.chunk_size = chunk_size
        self._recent: deque[Any] = deque()
        self._checked_task: int | None = None

    def per_sample_loss(
        self, interface: ModelInterface, pl_module: LightningModule, logits: Tensor, batch: Any
    ) -> Tensor:
        """The per-sample loss whose gradient magnitudes make the importance."""
        raise NotImplementedError

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._checked_task != self.current_task:  # a batch this method cannot use fails now, not at task end
            self._check_sharded_parameters(pl_module)
            interface = interface_of(pl_module, self.model_interface)
            rows = index_batch(batch, slice(0, 2))
            with torch.no_grad(), private_pass(pl_module), trainer.precision_plugin.forward_context():
                self.per_sample_loss(interface, pl_module, interface.predict(pl_module, rows), rows)
            self._checked_task = self.current_task
        if self.consolidate_every_n_steps is None:
            return
        self._recent.append(batch)
        limit = self.importance_samples or 256
        while sum(batch_size_of(b) for b in self._recent) - batch_size_of(self._recent[0]) >= limit:
            self._recent.popleft()

    def _check_sharded_parameters(self, pl_module: LightningModule) -> None:
        """Refuse a sharded parameter that no layer rule covers: its per-sample gradients would need a backward per
        sample, whose gradient FSDP averages over the ranks."""
        params = named_trainable_parameters(pl_module)
        uncovered = [name for name in without_fast_path(pl_module, params) if any_sharded([params[name]])]
        if uncovered:
            raise RuntimeError(
                f"{type(self).__name__} estimates per-sample gradients of a fully_shard-ed model from the inputs and "
                f"output gradients of its nn.Linear and nn.Conv2d layers, but {uncovered[:5]} (of {len(uncovered)}) "
                "belong to other layers. Freeze them (`requires_grad_(False)`, or FreezeLayers before this method), "
                "or train without sharding."
            )

    def estimate_importance(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """Mean over samples (and ranks) of ``phi(d loss_n / d theta)`` per trainable parameter."""
        params = named_trainable_parameters(pl_module)
        interface = interface_of(pl_module, self.model_interface)
        if self.consolidate_every_n_steps is not None and self._recent:  # task-free: the most recent batches
            source: Iterable[Any] = list(self._recent)
            limit: int | None = self.importance_samples or 256
        else:  # this rank's shard of the task, its share of `importance_samples`
            source = task_rows(trainer)
            limit = None if self.importance_samples is None else -(-self.importance_samples // trainer.world_size)
        with own_pass(trainer, pl_module, source, limit=limit, grad=True, autocast=False) as batches:
            sums, count = per_sample_grad_sums(
                pl_module,
                batches,
                lambda logits, batch: self.per_sample_loss(interface, pl_module, logits, batch),
                interface.predict,
                reduction=self.reduction,
                params=params,
                chunk_size=self.chunk_size,
            )
        if any_sharded(params.values()):  # each rank keeps its shard of the sums, reduce-scattered
            device = next(iter(sums.values())).device  # the collective's device (NCCL takes no CPU tensor)
            count = int(all_reduce_sum([torch.tensor([float(count)], device=device)])[0].item())
            sums = {name: sum_to_shard(total, params[name]) for name, total in sums.items()}
        else:
            sums, count = all_reduce_sums(sums, count)
        if count == 0:
            raise RuntimeError(f"{type(self).__name__} found no training data to estimate the importance from.")
        return {name: total / count for name, total in sums.items()}
