"""What every replay method shares: the buffer, filling it from batches, replaying rows in the batch's own
structure, and one global buffer over DDP ranks."""

from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_incremental.buffers import Policy, ReplayBuffer, local_share
from lightning_incremental.core.batch import batch_leaves, split_batch, task_labels_of, with_leaves
from lightning_incremental.core import ContinualCallback

Fill = Literal["stream", "first_epoch", "task_end"]
FILLS = ("stream", "first_epoch", "task_end")


class ReplayMethod(ContinualCallback):
    """Base class of the replay methods: owns a :class:`~lightning_incremental.buffers.ReplayBuffer`.

    Under DDP the buffer is one global buffer of ``buffer_size`` rows, of which each rank holds its share
    (filled from its own shard of the data). ``state_dict`` gathers every rank's share, so the checkpoint
    rank 0 writes holds every sample; ``load_state_dict`` gives each rank its share back (the same one
    when the number of ranks is unchanged, an even split of all rows otherwise). Nothing is lost or
    duplicated.

    When rows enter the buffer (``fill``): ``"stream"`` offers every training batch as it is trained on
    (task-free; with several epochs a row is offered once per epoch), ``"first_epoch"`` only the batches of
    a task's first epoch (every row once), ``"task_end"`` the whole task once more at its end, with the
    extras the final model gives (:meth:`extras_at_task_end`).
    """

    def __init__(self, buffer_size: int, policy: Policy, fill: Fill, seed: int) -> None:
        super().__init__()
        if fill not in FILLS:
            raise ValueError(f"`fill` must be one of {FILLS}, got {fill!r}.")
        self.buffer_size, self.policy, self.fill, self.seed = buffer_size, policy, fill, seed
        self.buffer = ReplayBuffer(buffer_size, policy, seed)
        self._world_size = 1  # the number of ranks the buffer is laid out for

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.world_size != self._world_size:  # a global buffer meets its first DDP fit
            self.buffer = self.buffer.share(trainer.global_rank, trainer.world_size, self.seed)
            self._world_size = trainer.world_size

    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.fill != "task_end":
            return
        was_training = pl_module.training
        pl_module.eval()  # the final model's view of the task: BatchNorm statistics and dropout frozen
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for batch in trainer.train_dataloader:
                batch = move_data_to_device(batch, pl_module.device)
                self.insert(batch, self.extras_at_task_end(pl_module, batch))
        pl_module.train(was_training)

    # ------------------------------------------------------------------ helpers for the methods
    def inserts_now(self, trainer: Trainer) -> bool:
        """Whether the batch being trained on enters the buffer now (see ``fill``)."""
        return self.fill == "stream" or (self.fill == "first_epoch" and trainer.current_epoch == 0)

    def extras_at_task_end(self, pl_module: LightningModule, batch: Any) -> dict[str, Tensor] | None:
        """The extras stored with ``batch``'s rows when ``fill="task_end"`` (none by default)."""
        return None

    def insert(self, batch: Any, extras: dict[str, Tensor] | None = None) -> None:
        """Offer the rows of ``batch`` (and their ``extras``) to the buffer."""
        self.buffer.add(batch_leaves(batch), self.groups_of(batch), extras)

    def groups_of(self, batch: Any) -> Tensor | None:
        """The class (or task) of every row, for the balanced policies; raises on a batch without labels."""
        if self.policy == "class_balanced":
            return split_batch(batch)[1]
        if self.policy == "task_balanced":
            labels = task_labels_of(batch)
            return labels if labels is not None else torch.full((len(batch_leaves(batch)[0]),), self.current_task)
        return None

    def replay(self, like: Any, k: int) -> tuple[Any, dict[str, Tensor]]:
        """``k`` buffer rows as a batch of the same structure as ``like``, and their extras."""
        rows, extras, _ = self.buffer.sample(k)
        return with_leaves(like, rows), extras

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        local = _to_cpu(self.buffer.state_dict())
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self._world_size > 1:
            shards: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shards, local)
        else:
            shards = [local]
        return {**super().state_dict(), "shards": shards}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        shards = state_dict["shards"]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size = torch.distributed.get_world_size() if distributed else 1
        rank = torch.distributed.get_rank() if distributed else 0
        if len(shards) == world_size:  # the same layout: every rank gets its own share back, RNG included
            self.buffer = ReplayBuffer(local_share(self.buffer_size, rank, world_size), self.policy, self.seed)
            self.buffer.load_state_dict(shards[rank])
        else:
            pooled = ReplayBuffer.pooled(shards, self.buffer_size, self.seed)
            self.buffer = pooled.share(rank, world_size, self.seed) if world_size > 1 else pooled
        self._world_size = world_size


def _to_cpu(state: Any) -> Any:
    from lightning_utilities.core.apply_func import apply_to_collection

    return apply_to_collection(state, Tensor, lambda t: t.cpu())
