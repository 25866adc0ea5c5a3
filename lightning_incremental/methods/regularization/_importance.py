"""Importance estimated from per-sample gradients over the task's data: the common part of EWC and MAS."""

from collections import deque
from collections.abc import Iterator
from typing import Any

from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from lightning_incremental.core.batch import batch_size_of, index_batch, split_inputs
from lightning_incremental.core.per_sample import ForwardFn, Reduction, per_sample_grad_sums
from lightning_incremental.methods.regularization._quadratic import (
    QuadraticPenalty,
    all_reduce_sums,
    named_trainable_parameters,
)


def model_outputs(module: nn.Module, batch: Any) -> Tensor:
    """The default forward for importance estimation: ``module(x)``."""
    return module(split_inputs(batch))


class SampledImportance(QuadraticPenalty):
    """A quadratic penalty whose importance is a mean of per-sample gradient magnitudes.

    At a task end it reads up to ``samples`` training samples from the fit's train dataloader (each DDP
    rank its shard), in eval mode and fp32, and all-reduces the sums. In task-free use
    (``consolidate_every_n_steps``) it uses the most recent training batches instead.
    """

    reduction: Reduction = "square"

    def __init__(
        self,
        lambda_: float,
        samples: int | None,
        forward: ForwardFn | None,
        chunk_size: int,
        consolidate_every_n_steps: int | None,
    ) -> None:
        super().__init__(lambda_, consolidate_every_n_steps)
        if samples is not None and samples < 1:
            raise ValueError(f"The number of samples must be a positive integer or None (all), got {samples}.")
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
        self.samples = samples
        self.forward = forward or model_outputs
        self.chunk_size = chunk_size
        self._recent: deque[Any] = deque()

    def per_sample_loss(self, outputs: Tensor, batch: Any) -> Tensor:
        """The per-sample loss whose gradient magnitudes make the importance."""
        raise NotImplementedError

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.consolidate_every_n_steps is None:
            return
        self._recent.append(batch)
        limit = self.samples or 256
        while sum(batch_size_of(b) for b in self._recent) - batch_size_of(self._recent[0]) >= limit:
            self._recent.popleft()

    def estimate_importance(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """Mean over samples (and ranks) of ``phi(d loss_n / d theta)`` per trainable parameter."""
        params = named_trainable_parameters(pl_module)
        was_training = pl_module.training
        pl_module.eval()
        try:
            sums, count = per_sample_grad_sums(
                pl_module,
                self._batches(trainer, pl_module),
                self.per_sample_loss,
                self.forward,
                reduction=self.reduction,
                params=params,
                chunk_size=self.chunk_size,
            )
        finally:
            pl_module.train(was_training)
        sums, count = all_reduce_sums(trainer, sums, count)
        if count == 0:
            raise RuntimeError(f"{type(self).__name__} found no training data to estimate the importance from.")
        return {name: total / count for name, total in sums.items()}

    def _batches(self, trainer: Trainer, pl_module: LightningModule) -> Iterator[Any]:
        if self.consolidate_every_n_steps is not None and self._recent:
            source: Any = list(self._recent)
            limit = self.samples or 256
        else:
            source = trainer.train_dataloader
            limit = None if self.samples is None else -(-self.samples // trainer.world_size)
        seen = 0
        for batch in source:
            if limit is not None and seen >= limit:
                return
            batch = move_data_to_device(batch, pl_module.device)
            if limit is not None and seen + batch_size_of(batch) > limit:
                batch = index_batch(batch, slice(0, limit - seen))
            seen += batch_size_of(batch)
            yield batch
