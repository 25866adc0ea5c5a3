"""The base callback every continual-learning method derives from: task boundaries, the hooks a method
overrides, and its state.

Each method writes only its own math; this class owns what all of them share (``docs/architecture.md``
explains the contract):

- **Task boundaries.** One ``trainer.fit`` is one task. In ``on_fit_start`` (after a checkpoint restore)
  :meth:`ContinualCallback.place_state` runs at every fit, then :meth:`ContinualCallback.on_task_start` (not
  again when a fit resumes a task already under way, :attr:`ContinualCallback.resuming_task`),
  :meth:`ContinualCallback.on_task_end` in ``on_train_end`` (model still on its device, DDP still up).
  The task index comes from the stream's dataloader when a :class:`~lightning_incremental.scenarios.Task`
  built it, else from counting fits (restored from a checkpoint: never from the user's DataModule). A fit that
  would train nothing (a reused Trainer already at ``max_epochs``) is refused with the fix.
- **Updates as jobs.** ``fit(ckpt_path=)`` of a finished task starts the next one, of a task under way resumes
  it; every other case is refused before a step (:meth:`ContinualCallback.on_load_checkpoint`).
- **The optimizer's state.** ``keeps_optimizer_state`` says whether the benchmarks favour carrying it across
  tasks for the method; :func:`~lightning_incremental.core.optimizer_state_carrier` decides for a Trainer.
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
from lightning_incremental.core.optimizer_state import CarriedOptimizerState, optimizer_state_carrier
from lightning_incremental.core.sharding import local, refuse_unsupported_strategy
from lightning_incremental.core.state import assign_state_keys, carry_state_to_main_process, register_instance
from lightning_incremental.core.step_chain import Step, StepChain
from lightning_incremental.scenarios.stream import TaskDataset

PROGRESS_KEY = "lightning_incremental"  # the checkpoint's record of the tasks: completed, one under way


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
        keeps_optimizer_state: ``True`` when the optimizer's state carried across tasks helps the method in the
            benchmarks, ``False`` when it hurts, ``None`` (the default) for no preference; the method then carries
            it itself unless another method is against it or a ``KeepOptimizerState`` decides.

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
    keeps_optimizer_state: bool | None = None

    def __init__(self) -> None:
        self.tasks_completed = 0
        self.current_task = 0
        self.task: Any = None
        self.model_interface: ModelInterface | None = None
        self.logits_module: str | nn.Module | None = None
        self.key_suffix: str | None = None
        self.instance_id = uuid.uuid4().hex
        self._task_in_progress = False
        self._carried: CarriedOptimizerState | None = None  # the optimizer's state, when this method carries it
        self._carries_optimizer_state = False
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
        """Add to ``grads`` (the ``.grad`` of ``params``, in place); multiply the term by ``scale``.

        Under sharding (``fully_shard``) ``params`` are the ``DTensor`` parameters, each the same object at every
        step, and ``grads`` this rank's shards of their gradients: read a parameter's shard with
        :func:`~lightning_incremental.core.local`."""

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
            "optimizer_state": None if self._carried is None else self._carried.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tasks_completed = int(state_dict["tasks_completed"])
        self.current_task = int(state_dict["current_task"])
        self._task_in_progress = bool(state_dict["task_in_progress"])
        if state_dict.get("optimizer_state") is not None:  # absent from checkpoints of before it was carried here
            self._carried = CarriedOptimizerState()
            self._carried.load_state_dict(state_dict["optimizer_state"])

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[PROGRESS_KEY] = {"tasks_completed": self.tasks_completed, "task_in_progress": self._task_in_progress}

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Decide what a fit from ``ckpt_path`` trains, before Lightning restores the loops and the optimizers.

        - A checkpoint saved in the middle of a task (``task_in_progress``) resumes it, with the same methods. One
          saved at the end of the task's last epoch, before its task end (``ModelCheckpoint``'s ``last.ckpt``),
          would train nothing and lose the task end: refused, naming :class:`~lightning_incremental.TaskCheckpoint`.
        - A checkpoint of a finished task (:class:`~lightning_incremental.TaskCheckpoint`'s ``last.ckpt``) starts
          the next task: the weights and every callback's state are restored; the loops start at epoch 0 and the
          optimizers as ``configure_optimizers`` built them (the carried optimizer state is in the methods' state).
          A method the checkpoint has no state of joins at this task.
        - A checkpoint of a fit without any method starts the first task from its weights when that fit had
          finished, and is refused in the middle of one.
        """
        own_state = checkpoint.get("callbacks", {}).get(self.state_key)
        progress = checkpoint.get(PROGRESS_KEY)
        if progress is None and own_state is not None:  # a checkpoint written before the record: the method's own
            progress = {key: own_state[key] for key in ("tasks_completed", "task_in_progress")}
        trains_nothing = _lightning.checkpoint_trains_nothing(trainer, checkpoint)
        if (progress is None and trains_nothing) or (progress is not None and not progress["task_in_progress"]):
            _lightning.start_fresh_fit_from(trainer, checkpoint)
            if own_state is None and progress is not None:  # joins the updates at this task
                self.tasks_completed = self.current_task = int(progress["tasks_completed"])
            return
        task = "a task" if progress is None else f"task {progress['tasks_completed']}"
        if own_state is None:
            raise RuntimeError(
                f"`ckpt_path` resumes {task} in its middle, in a fit that had no {type(self).__name__} "
                f"({self.state_key!r} is not among the checkpoint's callbacks "
                f"{sorted(checkpoint.get('callbacks', {}))}). "
                "Resume with the callbacks of the fit that saved it, and add the method when the next task starts."
            )
        if trains_nothing:
            raise RuntimeError(
                f"`ckpt_path` holds the end of the last epoch of {task}, saved before its task end (ModelCheckpoint "
                "saves at epoch ends): what the methods do at the task end (EWC's Fisher, the rows replay stores, "
                "LwF's old model, a merge, the evaluation's row) is not in it, and the fit would train nothing. Start "
                "the next task from a checkpoint that holds the task end: add `lightning_incremental.TaskCheckpoint("
                "dirpath=...)` to the callbacks (in place of ModelCheckpoint) and pass its `<dirpath>/last.ckpt`; the "
                "update that saved this checkpoint must run again with it."
            )

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        assign_state_keys(trainer.callbacks)
        if stage != "fit":
            return
        refuse_unsupported_strategy(trainer, type(self).__name__)
        self._carries_optimizer_state = optimizer_state_carrier(trainer.callbacks) is self
        if self._carries_optimizer_state and self._carried is None:
            self._carried = CarriedOptimizerState()
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
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._enter_fit(trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # ModelParallelStrategy (FSDP2) restores a checkpoint's callbacks and loops after on_fit_start: the fit starts
        # here, once the state it resumes is in place
        if trainer.strategy.restore_checkpoint_after_setup:
            self._enter_fit(trainer, pl_module)

    def _enter_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The fit's start after every restore: :meth:`place_state`, then :meth:`on_task_start` unless the fit resumes
        a task under way."""
        if _lightning.has_nothing_left_to_train(trainer):
            raise RuntimeError(
                f"This fit would train nothing: the Trainer is at max_epochs={trainer.max_epochs} (or "
                f"max_steps={trainer.max_steps}) already, so {type(self).__name__} would see a task that never trains "
                "and never ends. Give every task at least one epoch, and build a new Trainer for every task (or raise "
                "`trainer.fit_loop.max_epochs` before each fit on a reused one)."
            )
        self.task = task_of(trainer)
        self.place_state(trainer, pl_module)
        if self._task_in_progress:  # resumed in the middle of a task: the restored state is the task's
            return
        self.current_task = self.task.index if self.task is not None else self.tasks_completed
        self._task_in_progress = True
        try:
            self.on_task_start(trainer, pl_module)
            if self._carries_optimizer_state and self._carried is not None:
                self._carried.carry_into(trainer, pl_module)
        except BaseException:
            self._task_in_progress = False  # refused: the fit after the fix starts this task, it resumes nothing
            raise

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_task_end(trainer, pl_module)
        if self._carries_optimizer_state and self._carried is not None:
            self._carried.capture(trainer, pl_module)
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
        if params:  # the term of a sharded parameter is its rank's: the local shards of the gradients
            scale = _lightning.micro_batches_in_window(trainer) / trainer.accumulate_grad_batches
            self.add_gradient_terms(trainer, pl_module, params, [local(p.grad) for p in params], scale)

    # ------------------------------------------------------------------ helpers
    def _overrides(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(ContinualCallback, method)


def task_of(trainer: Trainer) -> Any:
    """The :class:`~lightning_incremental.scenarios.Task` behind this fit's data, when the dataloader passed to
    ``trainer.fit`` is one a :class:`~lightning_incremental.scenarios.Task` built (``task.train_dataloader()``).

    Only the library's own dataset type is read: every attribute of a user's DataModule or dataset (``task``,
    ``task_id``, ``stream``, …) is the user's, and a fit of the user's own data counts as the next task.
    """
    dataset = getattr(_lightning.train_dataloader_source(trainer), "dataset", None)
    return dataset.task if isinstance(dataset, TaskDataset) else None


@runtime_checkable
class FisherSource(Protocol):
    """A method that estimates the diagonal Fisher information of the model at every task end (EWC).

    Another method that needs each task's Fisher (``WeightMerging(mode="fisher")``) finds its source among the
    Trainer's callbacks with ``isinstance(callback, FisherSource)``, without importing the method's class.
    """

    def check_task_fisher(self) -> None:
        """Refuse, with the fix, a configuration that cannot give one Fisher per task; otherwise keep each task's Fisher
        from now on (the consumer calls it in ``setup``, after the source's ``setup`` and before the first step)."""
        ...

    def task_fisher(self) -> dict[str, Tensor]:
        """The Fisher of the task that is ending, alone, per parameter name (fp32, >= 0), estimated on the trained
        weights at its end; the consumer calls it in its own ``on_task_end``, after the source's."""
        ...
