"""Every access to a private part of Lightning, in one place.

The rest of the package uses only Lightning's public API plus the functions here. Each function says which
private attribute it reads; all were checked on Lightning 2.6.6 (the range ``pyproject.toml`` allows is
2.4–2.6). When Lightning changes one of them, this file is the only one to mend.
"""

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher


def train_dataloader_source(trainer: Trainer) -> Any:
    """The dataloader (or datamodule) object the user passed to ``trainer.fit``: ``fit_loop._data_source``.

    Read before Lightning wraps the loader in its combined loader, so attributes the user's object carries
    (a stream's :class:`~lightning_incremental.scenarios.Task`) are still there.
    """
    source = getattr(trainer.fit_loop, "_data_source", None)
    return getattr(source, "instance", None)


def should_update_logs(trainer: Trainer) -> bool:
    """Whether this step is one the Trainer logs (``log_every_n_steps``): ``_logger_connector.should_update_logs``."""
    return bool(trainer._logger_connector.should_update_logs)


def spawned_launcher(trainer: Trainer) -> Any:
    """The launcher when the fit runs in processes Lightning spawned or forked (``ddp_spawn``, ``ddp_fork``, a
    notebook's ``ddp``), else ``None``: those are the fits whose worker state must be carried back.

    ``_MultiProcessingLauncher`` is private; its ``get_extra_results`` hook is what a worker sends back.
    """
    launcher = trainer.strategy.launcher
    return launcher if isinstance(launcher, _MultiProcessingLauncher) else None


def micro_batches_in_window(trainer: Trainer) -> int:
    """How many micro-batches the optimizer step about to run accumulated (``accumulate_grad_batches``, or fewer
    for the last, partial window of an epoch): ``fit_loop.epoch_loop.batch_idx``."""
    return trainer.fit_loop.epoch_loop.batch_idx % trainer.accumulate_grad_batches + 1


def has_nothing_left_to_train(trainer: Trainer) -> bool:
    """Whether this fit will train nothing because the Trainer already reached ``max_epochs`` or ``max_steps``
    (a reused Trainer, or a resume from a checkpoint saved at the end of a task): the test of
    ``fit_loop.done``, read from ``fit_loop.epoch_progress`` without its side effects."""
    loop = trainer.fit_loop
    max_epochs, max_steps = loop.max_epochs, loop.max_steps
    epochs_reached = max_epochs is not None and max_epochs != -1 and loop.epoch_progress.current.processed >= max_epochs
    steps_reached = max_steps != -1 and loop.epoch_loop.global_step >= max_steps
    return epochs_reached or steps_reached


def logging_step(trainer: Trainer) -> int:
    """The step the Trainer logs at (``self.log``, LearningRateMonitor): ``fit_loop.epoch_loop._batches_that_stepped``,
    this Trainer's optimizer steps (restored with the loops from a checkpoint)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def continue_logging_step(trainer: Trainer, step: int) -> None:
    """Make the Trainer log from ``step`` on; Lightning uses ``_batches_that_stepped`` for the step of its logs only."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step
