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
    (a reused Trainer): the test of ``fit_loop.done``, read from ``fit_loop.epoch_progress`` without its side
    effects."""
    loop = trainer.fit_loop
    return _limits_reached(trainer, loop.epoch_progress.current.processed, loop.epoch_loop.global_step)


def _limits_reached(trainer: Trainer, epochs_processed: int, global_step: int) -> bool:
    """``fit_loop.done``'s test of ``max_epochs`` and ``max_steps`` on the given progress."""
    max_epochs, max_steps = trainer.fit_loop.max_epochs, trainer.fit_loop.max_steps
    epochs_reached = max_epochs is not None and max_epochs != -1 and epochs_processed >= max_epochs
    return epochs_reached or (max_steps != -1 and global_step >= max_steps)


def logging_step(trainer: Trainer) -> int:
    """The step the Trainer logs at (``self.log``, LearningRateMonitor): ``fit_loop.epoch_loop._batches_that_stepped``,
    this Trainer's optimizer steps (restored with the loops from a checkpoint)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def continue_logging_step(trainer: Trainer, step: int) -> None:
    """Make the Trainer log from ``step`` on; Lightning uses ``_batches_that_stepped`` for the step of its logs only."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


def checkpoint_trains_nothing(trainer: Trainer, checkpoint: dict[str, Any]) -> bool:
    """Whether resuming ``checkpoint`` with this Trainer's ``max_epochs`` / ``max_steps`` would train nothing: the
    test of ``fit_loop.done`` on the checkpoint's ``loops["fit_loop"]["epoch_progress"]["current"]["processed"]``
    (increased before ``on_train_epoch_end``, where epoch checkpoints are saved) and its ``global_step``."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return _limits_reached(trainer, int(progress.get("processed", 0)), int(checkpoint.get("global_step", 0)))


def start_fresh_fit_from(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Make Lightning restore only the weights and the callbacks' states from ``checkpoint``, the dict being loaded:
    drop the loops' progress and set no optimizer or LR scheduler state to restore, so the fit starts at epoch 0 with
    the optimizers ``configure_optimizers`` built. ``Callback.on_load_checkpoint`` receives the very dict
    ``restore_training_state`` reads afterwards (``_CheckpointConnector._loaded_checkpoint``), whose
    ``restore_loops`` skips a missing ``"loops"`` and whose optimizer and scheduler restores zip over these lists.
    A strategy that restores after its setup (``ModelParallelStrategy``) has loaded the optimizers' states into the
    optimizers before the callbacks' restore (``strategy.load_checkpoint``): they are emptied, as a new optimizer's."""
    checkpoint.pop("loops", None)
    checkpoint["optimizer_states"] = []
    checkpoint["lr_schedulers"] = []
    if trainer.strategy.restore_checkpoint_after_setup:  # ModelParallelStrategy loaded the optimizers' states already
        for optimizer in trainer.optimizers:
            optimizer.state.clear()


def validation_dataloaders(trainer: Trainer) -> list[Any]:
    """The fit's validation dataloaders as Lightning prepared them (a distributed sampler under DDP), loading them
    if no validation ran yet: ``fit_loop.epoch_loop.val_loop.setup_data()``, what the sanity check calls first.
    Empty when the fit has none (no ``val_dataloader`` or ``validation_step``, or ``limit_val_batches=0``)."""
    trainer.fit_loop.epoch_loop.val_loop.setup_data()
    loaders = trainer.val_dataloaders
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
