"""The lifecycle both partial-training methods share (FreezeLayers, LoRA): freeze for one fit, release after it."""

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lightning_incremental.core import ContinualCallback, FrozenPart


class PartialTraining(ContinualCallback):
    """A method that trains only part of the model during a fit and keeps the rest fixed.

    A subclass decides what stays fixed in :meth:`_freeze_for_task`, which freezes it into ``self._frozen`` (a
    :class:`~lightning_incremental.core.FrozenPart`), and calls :meth:`_start_fit` from its ``setup`` of a fit:
    before the checkpoint restore, the strategy's wrapping and ``configure_optimizers``, so an optimizer over the
    parameters that require grad never sees the frozen ones. This base does the rest: it decides again when a
    checkpoint's state loads in the fit (still before the optimizer is built), holds the frozen part's BatchNorm
    layers in eval mode at every training epoch's start, and at ``teardown`` (or on an exception) gives the model
    back as it was and lets go of the Trainer.
    """

    def __init__(self) -> None:
        super().__init__()
        self._trainer: Trainer | None = None  # the Trainer of the fit under way
        self._frozen = FrozenPart()  # what this callback froze for the fit under way

    def _freeze_for_task(self, pl_module: LightningModule) -> None:
        """Freeze, into ``self._frozen``, what stays fixed in the task about to train, and release what no longer
        does (``self.resuming_task`` says whether the fit goes on with a checkpoint's task)."""
        raise NotImplementedError

    def _start_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Call it from ``setup`` of a fit, once the model is ready to be frozen."""
        self._trainer = trainer
        self._freeze_for_task(pl_module)

    def _end_fit(self) -> None:
        """The fit is over: give the model back as it was and hold no reference to it."""
        self._frozen.release()
        self._trainer = None

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._frozen.hold_batchnorms_in_eval()  # Lightning leaves modes alone in fit; this undoes a user's .train()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._end_fit()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._end_fit()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._trainer is not None:  # a fit restoring its checkpoint: the model is loaded, the optimizer not built
            self._freeze_for_task(self._trainer.lightning_module)
