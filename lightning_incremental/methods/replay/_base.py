"""What every replay method shares: the buffer, filling it from batches, the policy that fits the targets,
replaying rows in the batch's own structure (sequences padded per key), and one global buffer over DDP ranks."""

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from typing_extensions import override

from lightning_incremental.buffers import (
    POLICIES,
    PadValue,
    ReplayBuffer,
    concat_padded,
    local_share,
    pad_values_for,
)
from lightning_incremental.core import (
    ContinualCallback,
    ModelInterface,
    TaskCheckpoint,
    are_class_labels,
    batch_leaves,
    batch_size_of,
    check_interface_argument,
    index_batch,
    interface_of,
    own_pass,
    rank_and_world_size,
    task_labels_of,
    task_rows,
    with_leaves,
)

Fill = Literal["stream", "first_epoch", "task_end", "none"]
FILLS = ("stream", "first_epoch", "task_end", "none")
PolicyChoice = Literal["auto", "reservoir", "class_balanced", "task_balanced"]
POLICY_CHOICES = ("auto", *POLICIES)


class ReplayMethod(ContinualCallback):
    """Base class of the replay methods: owns a :class:`~lightning_incremental.ReplayBuffer`.

    **Policy.** ``policy="auto"`` decides at the first batch: class-balanced when the targets are integer
    class labels (one per row), reservoir otherwise (real-valued, multi-label or token-level targets, or none);
    the choice is kept in the state. An explicit ``"class_balanced"`` on other targets is refused at the first
    training step. ``"task_balanced"`` balances the task labels of ``(x, y, t)`` batches, else the task index.

    **Sequences.** Batch tensors whose length (second dimension) varies from batch to batch are stored per row
    and replayed padded to the longest row drawn; the current batch and the replayed rows are padded to their
    common length when joined (:meth:`concat`). Each entry's pad value comes from its key
    (:func:`~lightning_incremental.buffers.pad_values_for`: -100 for integer labels, the data's pad id for
    ``input_ids``, 0 for masks and the rest), or from ``pad_values={"input_ids": 1}``. Variable-length extras
    (token-level logits ``[B, T, V]``) are padded with 0 and come with a mask of their stored positions
    (``replay(..., masks=True)``).

    **DDP.** The buffer is one global buffer of ``buffer_size`` rows, of which each rank holds its share
    (filled from its own shard of the data). ``state_dict`` gathers every rank's share, so the checkpoint
    rank 0 writes holds every sample; ``load_state_dict`` gives each rank its share back (the same one
    when the number of ranks is unchanged, an even split of all rows otherwise). Nothing is lost or
    duplicated.

    **When rows enter the buffer** (``fill``): ``"stream"`` offers every training batch as it is trained on
    (task-free; with several epochs a row is offered once per epoch), ``"first_epoch"`` only the batches of
    a task's first epoch (every row once), ``"task_end"`` the whole task once more at its end, with the
    extras the final model gives (:meth:`extras_at_task_end`), in eval mode, without gradients, and without
    touching the random streams the user's shuffling and dropout draw from; ``"none"`` only the rows given to
    :meth:`prefill` (general data of the pretrained model's domain replayed beside every task, the continual
    pre-training recipe; stack a second replay method for the tasks' own rows). A first fit that replayed nothing
    with ``fill="task_end"`` (a single task-free fit trains exactly as without replay) warns and names
    ``fill="stream"``, unless its data come from a :class:`~lightning_incremental.scenarios.TaskStream` or the
    Trainer has a :class:`~lightning_incremental.TaskCheckpoint` (every fit is an update: the next one replays).
    """

    keeps_optimizer_state = True  # measured: RESULTS.md "The optimizer's state across tasks"

    def __init__(
        self,
        buffer_size: int,
        policy: PolicyChoice,
        fill: Fill,
        seed: int,
        model_interface: ModelInterface | None = None,
        pad_values: Mapping[str, PadValue] | None = None,
    ) -> None:
        super().__init__()
        if fill not in FILLS:
            raise ValueError(f"`fill` must be one of {FILLS}, got {fill!r}.")
        if policy not in POLICY_CHOICES:
            raise ValueError(f"`policy` must be one of {POLICY_CHOICES}, got {policy!r}.")
        if pad_values is not None and (
            not isinstance(pad_values, Mapping)
            or not all(isinstance(k, str) and isinstance(v, int | float) for k, v in pad_values.items())
        ):
            raise ValueError(
                f"`pad_values` must map batch keys to numbers, such as {{'input_ids': 1}}, got {pad_values!r}."
            )
        self.model_interface = check_interface_argument(model_interface)
        self.buffer_size, self.policy, self.fill, self.seed = buffer_size, policy, fill, seed
        self.pad_values = dict(pad_values or {})
        self.buffer = ReplayBuffer(buffer_size, "reservoir" if policy == "auto" else policy, seed)
        self._policy_decided = policy != "auto"  # "auto" becomes the buffer's policy at the first batch
        self._interface = self.model_interface or ModelInterface()
        self._checked = False  # this fit's first batch was checked against the policy
        self._replayed = False  # rows were replayed in this fit
        self._world_size = 1  # the number of ranks the buffer is laid out for
        self._prefill: list[Any] = []  # batches given to `prefill`, offered to the buffer at the next fit start

    # ------------------------------------------------------------------ hooks
    @override
    def place_state(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._interface = interface_of(pl_module, self.model_interface)
        self._checked = self._replayed = False
        if trainer.world_size != self._world_size:  # a global buffer meets its first DDP fit
            self.buffer = self.buffer.share(trainer.global_rank, trainer.world_size, self.seed)
            self._world_size = trainer.world_size
        self.buffer.to(pl_module.device)  # a buffer restored from a checkpoint comes on the CPU
        rank, world = trainer.global_rank, trainer.world_size
        for batch in self._prefill:  # this rank's share of every row: a global buffer, nothing held twice
            share = torch.arange(rank, batch_size_of(batch), world)
            if len(share):
                rows = apply_to_collection(index_batch(batch, share), Tensor, lambda t: t.to(pl_module.device))
                self.insert(rows)
        self._prefill = []

    def prefill(self, batches: Iterable[Any]) -> None:
        """Offer the rows of ``batches`` (of the structure of the training batches, on any device) to the buffer at
        the next fit's start, each rank its share: data to replay that no task trains on, such as general text of
        the pretrained model's domain with the language-model loss on every token (with ``fill="none"`` nothing
        else enters the buffer). The buffer keeps them like any rows: in its state and checkpoints."""
        self._prefill.extend(batches)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if not self._checked:  # decides policy="auto"; a batch the policy cannot use fails now, not at task end
            self.groups_of(batch)
            self._checked = True

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.fill != "task_end":
            return
        updates = any(isinstance(callback, TaskCheckpoint) for callback in trainer.callbacks)
        if not self._replayed and self.tasks_completed == 0 and self.task is None and not updates:
            rank_zero_warn(
                f"{type(self).__name__} replayed nothing in this fit: with `fill='task_end'` it stores a task's rows "
                "when its fit ends and replays them in the fits that follow, so this fit trained exactly as without "
                f"it. For one task-free fit over a drifting stream, pass `{type(self).__name__}(fill='stream')` (with "
                "`policy='reservoir'` for a plain reservoir). Fits of a TaskStream's data, and fits with a "
                "TaskCheckpoint (one update per fit), are tasks and never warn."
            )
        # the final model's view of the task: BatchNorm statistics and dropout frozen, the user's RNG untouched
        with own_pass(trainer, pl_module, task_rows(trainer)) as batches:
            for batch in batches:
                self.insert(batch, self.extras_at_task_end(pl_module, batch))

    # ------------------------------------------------------------------ helpers for the methods
    def inserts_now(self, trainer: Trainer) -> bool:
        """Whether the batch being trained on enters the buffer now (see ``fill``)."""
        return self.fill == "stream" or (self.fill == "first_epoch" and trainer.current_epoch == 0)

    def extras_at_task_end(self, pl_module: LightningModule, batch: Any) -> dict[str, Tensor] | None:
        """The extras stored with ``batch``'s rows when ``fill="task_end"`` (none by default)."""
        return None

    def insert(self, batch: Any, extras: dict[str, Tensor] | None = None) -> None:
        """Offer the rows of ``batch`` (and their ``extras``) to the buffer."""
        groups = self.groups_of(batch)
        pads = None if self.buffer.storage else self._pad_values_for(batch)
        self.buffer.add(batch_leaves(batch), groups, extras, pads)

    def groups_of(self, batch: Any) -> Tensor | None:
        """The class (or task) of every row for the balanced policies, ``None`` for the reservoir; decides
        ``policy="auto"`` at the first call and refuses targets the policy cannot use."""
        policy = self._decide_policy(batch)
        if policy == "class_balanced":
            return self._class_labels(batch)
        if policy == "task_balanced":
            labels = task_labels_of(batch)
            return labels if labels is not None else torch.full((batch_size_of(batch),), self.current_task)
        return None

    def replay(self, like: Any, k: int, masks: bool = False) -> Any:
        """``k`` buffer rows as a batch of the same structure as ``like``, and their extras: ``(batch, extras)``.

        With ``masks=True``: ``(batch, extras, masks)``, where ``masks[name]`` is a bool ``[k, T]`` tensor, ``True``
        at the positions of extra ``name`` that were stored (``False`` at padding), for every extra whose length
        varies (token-level logits ``[k, T, V]``); fixed-shape extras have no mask.
        """
        sample = self.buffer.sample(k)
        self._replayed = True
        batch = with_leaves(like, sample.rows)
        return (batch, sample.extras, sample.extra_masks) if masks else (batch, sample.extras)

    def concat(self, batch: Any, replayed: Any) -> Any:
        """``batch`` followed by the ``replayed`` rows (same structure, device and dtype as ``batch``); sequence
        tensors are padded to their common length with each entry's pad value."""
        return concat_padded(batch, replayed, self.buffer.pad_values)

    # ------------------------------------------------------------------ targets and pad values
    def _decide_policy(self, batch: Any) -> str:
        if not self._policy_decided:
            targets = self._interface.targets(batch) if self._interface.has_targets(batch) else None
            self.buffer.policy = "class_balanced" if targets is not None and are_class_labels(targets) else "reservoir"
            self._policy_decided = True
        return self.buffer.policy

    def _class_labels(self, batch: Any) -> Tensor:
        method = f"{type(self).__name__}(policy='class_balanced')"
        try:
            targets = self._interface.targets(batch)
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"{method} balances the buffer over class labels: {error.args[0]} Or pass `policy='reservoir'` "
                "(or 'auto'), which needs no labels."
            ) from error
        if not are_class_labels(targets):
            raise ValueError(
                f"{method} needs one integer class label per row, but the targets are {targets.dtype} of shape "
                f"{list(targets.shape)} (real-valued, multi-label or token-level targets). Pass `policy='auto'` or "
                "`policy='reservoir'`, which serve any target, or `policy='task_balanced'`."
            )
        return targets.reshape(-1)

    def _pad_values_for(self, batch: Any) -> list[PadValue]:
        targets = self._interface.targets(batch) if self._interface.has_targets(batch) else None
        return pad_values_for(batch, targets, self.pad_values)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        local = apply_to_collection(self.buffer.state_dict(), Tensor, lambda t: t.cpu())
        world_size = rank_and_world_size()[1]
        if world_size > 1 and self._world_size > 1:
            shards: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(shards, local)
        else:
            shards = [local]
        return {**super().state_dict(), "policy_decided": self._policy_decided, "shards": shards}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        shards = state_dict["shards"]
        policy = shards[0]["policy"]
        if self.policy != "auto" and policy != self.policy:
            raise ValueError(
                f"The saved buffer used policy={policy!r}, but this {type(self).__name__} has "
                f"`policy={self.policy!r}`: build it with the checkpoint's policy (or 'auto')."
            )
        self._policy_decided = bool(state_dict["policy_decided"])
        rank, world_size = rank_and_world_size()
        if len(shards) == world_size:  # the same layout: every rank gets its own share back, RNG included
            self.buffer = ReplayBuffer(local_share(self.buffer_size, rank, world_size), policy, self.seed)
            self.buffer.load_state_dict(shards[rank])
        else:
            pooled = ReplayBuffer.pooled(shards, self.buffer_size, self.seed)
            self.buffer = pooled.share(rank, world_size, self.seed) if world_size > 1 else pooled
        self._world_size = world_size
