"""The base callback every continual-learning method derives from: task boundaries, the hooks a method
overrides, and its state.

Each method writes only its own math; this class owns what all of them share (``docs/architecture.md``
explains the contract):

- **Task boundaries.** One ``trainer.fit`` is one task. In ``on_fit_start`` (after a checkpoint restore)
  :meth:`ContinualCallback.place_state` runs at every fit, then :meth:`ContinualCallback.on_task_start` (not
  again when a fit resumes a task already under way, :attr:`ContinualCallback.resuming_task`),
  :meth:`ContinualCallback.on_task_end` in ``on_train_end`` (model still on its device, DDP still up).
  The task index comes from the stream's dataloader when a :class:`~lightning_incremental.scenarios.Task`
  built it, else from counting fits. A fit that would train nothing (a reused Trainer already at
  ``max_epochs``) is refused with the fix.
- **The training step.** A method that overrides :meth:`ContinualCallback.wrap_training_step` joins the step
  chain (:mod:`lightning_incremental.core.step_chain`).
- **Gradient terms.** A method that overrides :meth:`ContinualCallback.add_gradient_terms` adds to
  ``p.grad`` in ``on_before_optimizer_step``: gradients already all-reduced (DDP) and unscaled (16-mixed),
  before clipping, once per optimizer step. ``scale`` is ``k / accumulate_grad_batches`` for a window of
  ``k`` micro-batches, so the term equals the gradient of the same penalty written into the loss.
- **State.** ``state_dict`` holds tensors, numbers, lists and dicts only; see :mod:`lightning_incremental.core.state`
  for checkpoint keys and state carried back from spawned workers.
"""

import uuid
from typing import Any, Protocol, runtime_checkable

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from typing_extensions import override

from lightning_incremental.core import _lightning
from lightning_incremental.core.interface import ModelInterface
from lightning_incremental.core.state import assign_state_keys, carry_state_to_main_process, register_instance
from lightning_incremental.core.step_chain import Step, StepChain


class ContinualCallback(Callback):
    """Base class of the continual-learning callbacks; see the module docstring for the contract.

    The base owns the lifecycle. A method overrides only what it does, never Lightning's ``on_fit_start`` or
    ``on_train_end``:

    - :meth:`place_state` at every fit start, after Lightning restored a checkpoint: put the state where this
      fit needs it (on the model's device, laid out for this fit's ranks, an old model built from saved weights);
    - :meth:`on_task_start` once per task, after :meth:`place_state`; not again when a fit resumes a task under
      way (:attr:`resuming_task`);
    - :meth:`on_task_end` once per task, in ``on_train_end``;
    - :meth:`wrap_training_step` and :meth:`add_gradient_terms` to enter the training step;
    - ``state_dict`` / ``load_state_dict`` (call ``super()``) for everything the method keeps.

    Class attributes a method sets:
        reads_step_outputs: the method reads the model's logits of the training step (``step.logits_for``).
        adds_loss_terms: the method adds a term to the loss ``training_step`` returns, which manual
            optimization would never backpropagate: such methods refuse ``automatic_optimization=False``.
        reads_trained_weights: the method reads the trained weights at the task end (a regularizer's anchor, a
            merge), so a method that changes them there (LoRA merging its adapters) must come before it.

    Attributes:
        tasks_completed: how many tasks (fits) this method has finished.
        current_task: the index of the task being trained, or of the last one.
        task: the :class:`~lightning_incremental.scenarios.Task` behind the current fit's data (its
            ``classes``, ``label``), or ``None`` when the data did not come from a stream.
        model_interface: how the method reads the model (:class:`~lightning_incremental.ModelInterface`);
            ``None``: the model's ``continual_interface`` attribute, else the default.
        logits_module: the submodule whose output is the logits (methods that read them), or ``None``.

    Example: a method that keeps the mean of every weight at each task end and pulls the weights towards it.

        >>> import lightning as L
        >>> import torch
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> class PullToTaskMean(ContinualCallback):
        ...     def __init__(self, strength: float = 0.1) -> None:
        ...         super().__init__()
        ...         self.strength = strength
        ...         self.means: dict[str, torch.Tensor] = {}
        ...
        ...     def place_state(self, trainer, pl_module):  # a checkpoint restores the means on the CPU
        ...         self.means = {name: mean.to(pl_module.device) for name, mean in self.means.items()}
        ...
        ...     def on_task_end(self, trainer, pl_module):
        ...         self.means = {name: p.detach().mean() for name, p in pl_module.named_parameters()}
        ...
        ...     def add_gradient_terms(self, trainer, pl_module, params, grads, scale):
        ...         names = {id(p): name for name, p in pl_module.named_parameters()}
        ...         for p, grad in zip(params, grads):
        ...             if names[id(p)] in self.means:
        ...                 grad.add_(p.detach() - self.means[names[id(p)]], alpha=self.strength * scale)
        ...
        ...     def state_dict(self):
        ...         return {**super().state_dict(), "means": {n: m.cpu() for n, m in self.means.items()}}
        ...
        ...     def load_state_dict(self, state_dict):
        ...         super().load_state_dict(state_dict)
        ...         self.means = dict(state_dict["means"])
        >>> stream, model, pull = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,)), PullToTaskMean()
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[pull], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> pull.tasks_completed, sorted(pull.means)[:2]
        (2, ['net.0.bias', 'net.0.weight'])
    """

    reads_step_outputs = False
    adds_loss_terms = False
    reads_trained_weights = False

    def __init__(self) -> None:
        self.tasks_completed = 0
        self.current_task = 0
        self.task: Any = None
        self.model_interface: ModelInterface | None = None
        self.logits_module: str | nn.Module | None = None
        self.key_suffix: str | None = None
        self.instance_id = uuid.uuid4().hex
        self._task_in_progress = False
        register_instance(self)

    # ------------------------------------------------------------------ what a method overrides
    def place_state(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called at every fit start, after Lightning restored a checkpoint and before :meth:`on_task_start`:
        put the state where this fit needs it (the model's device, this fit's ranks, grown parameters)."""

    def on_task_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called once when a task starts (``self.current_task`` is set)."""

    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called once when a task ends, before ``tasks_completed`` is incremented."""

    def prepare_model(self, pl_module: nn.Module) -> None:
        """Add to a freshly built model what this method adds in ``setup`` (adapters, grown heads), so that
        weights saved with them load into it (:func:`~lightning_incremental.load_task_checkpoint` calls it)."""

    def wrap_training_step(self, trainer: Trainer, pl_module: LightningModule, batch: Any, step: Step) -> STEP_OUTPUT:
        """Return the training-step output; call ``step(batch)`` to run the inner step on a (new) batch."""
        return step(batch)

    def add_gradient_terms(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        params: list[Tensor],
        grads: list[Tensor],
        scale: float,
    ) -> None:
        """Add to ``grads`` (the ``.grad`` of ``params``, in place); multiply the term by ``scale``."""

    @property
    def resuming_task(self) -> bool:
        """Whether the state holds a task under way: a fit that starts now resumes it (a checkpoint saved in the
        middle of a task was loaded) rather than starting the next task. True while a task trains, too."""
        return self._task_in_progress

    # ------------------------------------------------------------------ state
    @property
    @override
    def state_key(self) -> str:
        if self.key_suffix is None:  # not attached yet: unique, so Lightning's duplicate check passes
            return f"{type(self).__qualname__}@{self.instance_id}"
        return type(self).__qualname__ + self.key_suffix

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks_completed": self.tasks_completed,
            "current_task": self.current_task,
            "task_in_progress": self._task_in_progress,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tasks_completed = int(state_dict["tasks_completed"])
        self.current_task = int(state_dict["current_task"])
        self._task_in_progress = bool(state_dict["task_in_progress"])

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        assign_state_keys(trainer.callbacks)
        if stage != "fit":
            return
        if self.adds_loss_terms and not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__} adds a term to the loss training_step returns, which manual optimization "
                "(`automatic_optimization = False`) never backpropagates. Use automatic optimization with "
                f"{type(self).__name__}, or a method that acts on the gradients (EWC, SI, MAS, L2Anchor, A-GEM) or "
                "on the batch (ExperienceReplay)."
            )
        if self._overrides("wrap_training_step"):
            StepChain.attach(pl_module, self, trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        StepChain.detach(pl_module, self)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        StepChain.detach(pl_module, self)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _lightning.has_nothing_left_to_train(trainer):
            raise RuntimeError(
                f"This fit would train nothing: the Trainer is at max_epochs={trainer.max_epochs} (or "
                f"max_steps={trainer.max_steps}) already, so {type(self).__name__} would see a task that never trains "
                "and never ends. Give every task at least one epoch, and build a new Trainer for every task (or raise "
                "`trainer.fit_loop.max_epochs` before each fit on a reused one); to "
                "start the next task from a checkpoint saved at the end of one, use "
                "`lightning_incremental.load_task_checkpoint` instead of `ckpt_path=`."
            )
        self.task = task_of(trainer)
        self.place_state(trainer, pl_module)
        if self._task_in_progress:  # resumed in the middle of a task: the restored state is the task's
            return
        self.current_task = self.task.index if self.task is not None else self.tasks_completed
        self._task_in_progress = True
        try:
            self.on_task_start(trainer, pl_module)
        except BaseException:
            self._task_in_progress = False  # refused: the fit after the fix starts this task, it resumes nothing
            raise

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_task_end(trainer, pl_module)
        self.tasks_completed += 1
        self._task_in_progress = False

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        carry_state_to_main_process(self, trainer)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self._overrides("add_gradient_terms"):
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            scale = _lightning.micro_batches_in_window(trainer) / trainer.accumulate_grad_batches
            self.add_gradient_terms(trainer, pl_module, params, [p.grad for p in params], scale)

    # ------------------------------------------------------------------ helpers
    def _overrides(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(ContinualCallback, method)


def task_of(trainer: Trainer) -> Any:
    """The :class:`~lightning_incremental.scenarios.Task` behind this fit's data, if a stream built it."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "task"):
        return datamodule.task
    loader = _lightning.train_dataloader_source(trainer)
    return getattr(getattr(loader, "dataset", None), "task", None)


@runtime_checkable
class FisherSource(Protocol):
    """A method that estimates the diagonal Fisher information of the model at every task end (EWC).

    Another method that needs each task's Fisher (``WeightMerging(mode="fisher")``) finds its source among the
    Trainer's callbacks with ``isinstance(callback, FisherSource)``, without importing the method's class.
    """

    def check_task_fisher(self) -> None:
        """Refuse, with the fix, a configuration that cannot give one Fisher per task (the consumer calls it in
        ``setup``, before the first step)."""
        ...

    def task_fisher(self) -> dict[str, Tensor]:
        """The Fisher of the task that is ending, alone, per parameter name (fp32, >= 0), estimated on the trained
        weights at its end; the consumer calls it in its own ``on_task_end``, after the source's."""
        ...
