"""The checkpoint an update leaves behind: ``last.ckpt`` rewritten after the task end."""

import os
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class TaskCheckpoint(ModelCheckpoint):
    """A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose ``last.ckpt`` holds the end of every task.

    ``ModelCheckpoint`` saves at epoch ends, so its ``last.ckpt`` is taken before the task end: without EWC's
    Fisher, the rows replay stores at the end, LwF's old model, a merge, the evaluation's new row. This subclass
    takes every argument of ``ModelCheckpoint`` and does all it does (mid-task checkpoints to resume an interrupted
    fit, the best ``save_top_k``), and at the end of every fit it writes ``<dirpath>/last.ckpt`` once more, after
    every method's task end and evaluation: Lightning runs checkpoint callbacks after all others, and this save is
    in ``on_fit_end``, the last hook of a fit. That file is what the next update starts from:
    ``trainer.fit(model, datamodule, ckpt_path="<dirpath>/last.ckpt")`` starts the next task from it (see
    :class:`~lightning_incremental.core.ContinualCallback`); a ``ckpt_path`` saved before a task end is refused.

    Give it a fixed ``dirpath``: by default ``ModelCheckpoint`` writes into the logger's version folder, which is
    new in every process. A fit that would put its ``last.ckpt`` beside another run's (the file exists, and is
    neither the fit's ``ckpt_path`` nor one this callback wrote) is refused before its first step: it would start
    the updates over, and the next update would continue the other run. With a Trainer that has this callback
    every fit is an update, so a first fit that replays nothing yet does not warn (``ExperienceReplay``).

    Args:
        dirpath: the folder of the checkpoints; the next update's ``ckpt_path`` is ``<dirpath>/last.ckpt``.
        save_last: must stay ``True`` (the default): ``last.ckpt`` is the task-end checkpoint.
        **kwargs: the other arguments of ``ModelCheckpoint`` (``filename``, ``monitor``, ``save_top_k``,
            ``every_n_epochs``, ...). ``save_weights_only=True`` is refused: the next task needs the methods' state.

    Example::

        >>> import lightning as L, os, tempfile
        >>> from lightning_incremental import EWC, MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model, folder = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,)), tempfile.mkdtemp()
        >>> def update(task, ckpt_path=None):  # one job: a new process would build all of this anew
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[EWC(), TaskCheckpoint(dirpath=folder)], logger=False,
        ...                         enable_progress_bar=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16), ckpt_path=ckpt_path)
        ...     return trainer.callbacks[0]
        >>> update(stream[0]).tasks_completed
        1
        >>> ewc = update(stream[1], ckpt_path=os.path.join(folder, "last.ckpt"))  # starts task 1 from task 0's end
        >>> ewc.tasks_completed, ewc.current_task
        (2, 1)
    """

    def __init__(self, dirpath: str | None = None, save_last: bool = True, **kwargs: Any) -> None:
        if save_last is not True:
            raise ValueError(
                f"`save_last` must be True for TaskCheckpoint, got {save_last!r}: its last.ckpt is the checkpoint "
                "the next update starts from. Use ModelCheckpoint for checkpoints without it."
            )
        if kwargs.get("save_weights_only"):
            raise ValueError(
                "`save_weights_only=True` would leave the methods' state out of the checkpoint the next update "
                "starts from. Drop it (TaskCheckpoint saves the full checkpoint)."
            )
        super().__init__(dirpath=dirpath, save_last=True, **kwargs)

    @property
    def task_end_path(self) -> str:
        """``<dirpath>/last.ckpt``: the file every task end is written to, the next update's ``ckpt_path``."""
        return self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._refuse_another_run(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.strategy.restore_checkpoint_after_setup:  # ModelParallelStrategy restores after on_fit_start
            self._refuse_another_run(trainer)

    def _refuse_another_run(self, trainer: Trainer) -> None:
        """Refuse a fit that would write its task end over another run's, before its first step."""
        # after the restore: ``trainer.ckpt_path`` is the checkpoint loaded, ``last_model_path`` restored from it
        path = self.task_end_path
        ours = {os.path.abspath(self.last_model_path)} if self.last_model_path else set()
        if trainer.ckpt_path is not None:
            ours.add(os.path.abspath(trainer.ckpt_path))
        elsewhere = trainer.strategy.broadcast(self.file_exists(path, trainer) and os.path.abspath(path) not in ours)
        if elsewhere:
            raise FileExistsError(
                f"{path} holds another run's task end, and this fit does not start from it. Pass "
                f"`ckpt_path={path!r}` (`--ckpt_path` on the command line) to continue those updates, or give "
                "TaskCheckpoint another `dirpath` (or remove the file) to start over."
            )

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self.task_end_path
        trainer.save_checkpoint(path)
        self.last_model_path = path
