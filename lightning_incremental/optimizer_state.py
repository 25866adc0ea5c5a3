"""Carry the optimizer's state (and optionally the LR scheduler's) from one task to the next."""

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lightning_incremental.core import CarriedOptimizerState, ContinualCallback


class KeepOptimizerState(ContinualCallback):
    r"""Carry every optimizer's state from the end of one task to the start of the next.

    Lightning builds a fresh optimizer in ``configure_optimizers`` at every ``trainer.fit``, so Adam's moments
    and step count, or SGD's momentum, restart at every task. With this callback the next task's optimizer
    starts where the last one stopped, as in one long fit:

    - **Matching.** Optimizers match by position in ``configure_optimizers``' result and must be of the same
      class. A parameter matches the one it is (identity), or failing that the parameter of the same name in
      ``pl_module.named_parameters()`` (a head that was replaced when it grew, or a new process that loaded
      a checkpoint).
    - **New parameters** (a grown head's new module) start fresh. A parameter whose shape **grew**
      (:class:`~lightning_incremental.IncrementalClassifier` adding classes) keeps its state for the old
      entries and zeros for the new ones, with the old step count: Adam's first steps on the new rows are
      then larger than a fresh Adam's, until the moments fill.
    - **Frozen parameters** (``requires_grad=False``, or absent from the new optimizer) are left alone: their
      state is kept and given back when they train again.
    - **Hyperparameters** (``lr``, betas, weight decay, …) are the new optimizer's, as ``configure_optimizers``
      set them: change them there between tasks. With ``schedulers=True`` each LR scheduler continues its
      schedule instead (its state is carried) and so does the learning rate it reached; with
      ``schedulers=False`` (the default) the scheduler the new task configures runs as configured, e.g. a
      cosine decay over each task's epochs.

    Carrying the state turns a stream of fits into the one long fit the optimizer was designed for; its
    effect on every method is measured in ``benchmarks/RESULTS.md``.

    The carried state is in ``state_dict`` (by parameter name; tensors, numbers, lists, dicts), so a checkpoint
    saved between tasks and loaded with :func:`~lightning_incremental.load_task_checkpoint` carries it to
    the next task in a new process. A fit resumed mid-task from a checkpoint gets its optimizer from the
    checkpoint, as Lightning restores it. Under DDP every rank holds the same optimizer state and carries it
    itself; under ``ddp_spawn`` / ``ddp_fork`` rank 0's state comes back to the main process. Sharded
    optimizers (FSDP, DeepSpeed ZeRO) are not supported.

    **Without this callback** the methods in the Trainer decide: each carries the state where our benchmarks
    measured a gain (``keeps_optimizer_state``; :func:`~lightning_incremental.core.optimizer_state_carrier` states how
    methods with different needs combine). With it, it decides for the Trainer: ``KeepOptimizerState()`` carries the
    state for any combination, ``KeepOptimizerState(carry=False)`` lets every task start with a fresh optimizer.

    Args:
        schedulers: also carry every LR scheduler's state and the learning rates of the optimizers'
            parameter groups (the schedule continues across tasks).
        carry: ``False`` carries nothing: every task's optimizer starts fresh, whatever the methods recommend.

    Attributes:
        optimizers: the carried state, one entry per optimizer: its class, ``"params"`` (parameter name ->
            its shape and optimizer state; while a task trains, only the parameters its optimizer does not
            hold) and ``"lrs"`` (its parameter groups' learning rates).
        lr_schedulers: with ``schedulers=True``, every LR scheduler's class and state at the last task end.

    Raises at the start of a task, with the fix, when the optimizers do not fit the carried state: a different
    number of optimizers or schedulers, a different class, a parameter whose shape changed other than by
    growing, a parameter of an optimizer that is not a parameter of the LightningModule. :meth:`reset` drops
    carried state on purpose.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model, keep = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,)), KeepOptimizerState()
        >>> for task in stream:  # 96 samples a task: 6 steps of 16
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[keep], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> trainer.optimizers[0].state[model.net[0].weight]["step"].item()  # Adam counted both tasks' steps
        12.0
    """

    decides_optimizer_state = True

    def __init__(self, schedulers: bool = False, carry: bool = True) -> None:
        super().__init__()
        for name, value in (("schedulers", schedulers), ("carry", carry)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, got {value!r}.")
        self.schedulers = schedulers
        self.carry = carry
        self.carried = CarriedOptimizerState(schedulers)

    @property
    def optimizers(self) -> list[dict[str, Any]]:
        """The carried state, one entry per optimizer (:class:`~lightning_incremental.core.CarriedOptimizerState`)."""
        return self.carried.optimizers

    @property
    def lr_schedulers(self) -> list[dict[str, Any]] | None:
        """With ``schedulers=True``, every LR scheduler's class and state at the last task end."""
        return self.carried.lr_schedulers

    def reset(self, *names: str) -> None:
        """Drop the carried state of the parameters ``names`` (all of it, schedulers too, when none are given).

        They start fresh in the next task, as a new parameter does. Call it between two fits, e.g. when a
        parameter was replaced by one of another shape on purpose, or to switch optimizer classes.
        """
        self.carried.reset(*names)

    @override
    def on_task_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.carry:
            self.carried.carry_into(trainer, pl_module)

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.carry:
            self.carried.capture(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.carried.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.carried.load_state_dict(state_dict)
