"""The base callback every continual-learning method derives from (DESIGN.md §2–§4).

It owns what all methods share, so that each method only writes its own math:

- **Task boundaries.** One ``trainer.fit`` is one task. :meth:`ContinualCallback.on_task_start` runs in
  ``on_fit_start`` (after a checkpoint restore, and not again when a fit resumes a task already under way),
  :meth:`ContinualCallback.on_task_end` in ``on_train_end`` (model still on its device, DDP still up).
  The task index comes from the stream's dataloader when a :class:`~lightning_incremental.scenarios.Task`
  built it, else from counting fits.
- **The training step.** A method that overrides :meth:`ContinualCallback.wrap_training_step` sees every
  batch before the user's ``training_step`` and its output after. The wrappers of all methods chain on one
  instance attribute of the LightningModule, in callback order (the first callback is outermost), and the
  attribute is removed when the last method lets go of it.
- **Gradient terms.** A method that overrides :meth:`ContinualCallback.add_gradient_terms` adds to
  ``p.grad`` in ``on_before_optimizer_step``: gradients already all-reduced (DDP) and unscaled (16-mixed),
  before clipping, once per optimizer step. ``scale`` is ``k / accumulate_grad_batches`` for a window of
  ``k`` micro-batches, so the term equals the gradient of the same penalty written into the loss.
- **State.** ``state_dict`` holds tensors, numbers, lists and dicts only. ``state_key`` is distinct for
  every instance in a Trainer and the same in a new process that builds the same callback list.
- **ddp_spawn / ddp_fork.** The state a method built in the worker processes is carried back to the
  instance in the main process through Lightning's own result channel, so a notebook can run one fit per
  task with 2 processes and keep every method's state (DESIGN.md §4).
"""

import functools
import os
import tempfile
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor

StepFn = Callable[[Any], STEP_OUTPUT]

_CHAIN_ATTRIBUTE = "_lightning_incremental_step_chain"
_CARRY_PREFIX = "lightning_incremental_state/"
_LIVE_INSTANCES: "weakref.WeakValueDictionary[str, ContinualCallback]" = weakref.WeakValueDictionary()


class ContinualCallback(Callback):
    """Base class of the continual-learning callbacks; see the module docstring for the contract.

    Attributes:
        tasks_completed: how many tasks (fits) this method has finished.
        current_task: the index of the task being trained, or of the last one.
        task: the :class:`~lightning_incremental.scenarios.Task` behind the current fit's data (its
            ``classes``, ``label``), or ``None`` when the data did not come from a stream.
    """

    def __init__(self) -> None:
        self.tasks_completed = 0
        self.current_task = 0
        self.task: Any = None
        self._task_in_progress = False
        self._key_suffix: str | None = None
        self._micro_batches = 0
        self._instance_id = uuid.uuid4().hex
        _LIVE_INSTANCES[self._instance_id] = self

    # ------------------------------------------------------------------ what a method overrides
    def on_task_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called once when a task starts (``self.current_task`` is set)."""

    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called once when a task ends, before ``tasks_completed`` is incremented."""

    def wrap_training_step(self, trainer: Trainer, pl_module: LightningModule, batch: Any, step: StepFn) -> STEP_OUTPUT:
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

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        if self._key_suffix is None:  # not attached yet: unique, so Lightning's duplicate check passes
            return f"{type(self).__qualname__}@{self._instance_id}"
        return type(self).__qualname__ + self._key_suffix

    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks_completed": self.tasks_completed,
            "current_task": self.current_task,
            "task_in_progress": self._task_in_progress,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tasks_completed = int(state_dict["tasks_completed"])
        self.current_task = int(state_dict["current_task"])
        self._task_in_progress = bool(state_dict["task_in_progress"])

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        assign_state_keys(trainer.callbacks)
        if stage == "fit" and self._overrides("wrap_training_step"):
            _StepChain.attach(pl_module, self, trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _StepChain.detach(pl_module, self)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        _StepChain.detach(pl_module, self)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._micro_batches = 0
        self.task = _task_of(trainer)
        if self._task_in_progress:  # resumed in the middle of a task: the restored state is the task's
            return
        self.current_task = self.task.index if self.task is not None else self.tasks_completed
        self._task_in_progress = True
        self.on_task_start(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_task_end(trainer, pl_module)
        self.tasks_completed += 1
        self._task_in_progress = False

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._carry_state_to_main_process(trainer)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._micro_batches += 1

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        micro_batches, self._micro_batches = self._micro_batches, 0
        if not self._overrides("add_gradient_terms"):
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            scale = max(micro_batches, 1) / trainer.accumulate_grad_batches
            self.add_gradient_terms(trainer, pl_module, params, [p.grad for p in params], scale)

    # ------------------------------------------------------------------ helpers
    def _overrides(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(ContinualCallback, method)

    def _carry_state_to_main_process(self, trainer: Trainer) -> None:
        """Under ddp_spawn / ddp_fork, send this callback's state back with rank 0's results.

        The worker's launcher pickles the dict of ``get_extra_results`` into the queue the main process
        reads; a :class:`_CarriedState` in it loads the state into this callback's twin when unpickled there.
        The state itself goes through a temporary file, as Lightning sends the weights: the main process
        reads the queue only after the workers exit, so a payload larger than a pipe's buffer (64 KiB) in
        the queue would block the worker forever.
        """
        launcher = trainer.strategy.launcher
        if not isinstance(launcher, _MultiProcessingLauncher):
            return
        state = self.state_dict()  # on every rank: a state_dict may gather across ranks
        if trainer.global_rank != 0:
            return
        handle, path = tempfile.mkstemp(suffix=".pt", prefix="lightning_incremental_state_")
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
        carried = _CarriedState(self._instance_id, path)
        collect = launcher.get_extra_results  # this worker's launcher, possibly patched by another method

        def get_extra_results(trainer: Trainer) -> dict[str, Any]:
            return {**collect(trainer), _CARRY_PREFIX + self._instance_id: carried}

        launcher.get_extra_results = get_extra_results  # type: ignore[method-assign]


def assign_state_keys(callbacks: list[Callback]) -> None:
    """Give every ContinualCallback its checkpoint key: its class name, ``#k`` for the k-th repeat of a class.

    Keys follow the position in the callback list, so a new process that builds the same list finds its
    state in a checkpoint.
    """
    seen: dict[type, int] = {}
    for callback in callbacks:
        if isinstance(callback, ContinualCallback):
            position = seen.get(type(callback), 0)
            seen[type(callback)] = position + 1
            callback._key_suffix = "" if position == 0 else f"#{position}"


class _CarriedState:
    """Travels from the rank-0 worker to the main process; unpickling it loads the state there."""

    def __init__(self, instance_id: str, path: str) -> None:
        self.instance_id, self.path = instance_id, path

    def __reduce__(self) -> tuple:
        return _deliver_state, (self.instance_id, self.path)


def _deliver_state(instance_id: str, path: str) -> None:
    try:
        callback = _LIVE_INSTANCES.get(instance_id)
        if callback is not None:
            callback.load_state_dict(torch.load(path, weights_only=True))
    finally:
        os.remove(path)


def _task_of(trainer: Trainer) -> Any:
    """The :class:`~lightning_incremental.scenarios.Task` behind this fit's data, if a stream built it."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "task"):
        return datamodule.task
    source = getattr(trainer.fit_loop, "_data_source", None)
    loader = getattr(source, "instance", None)
    return getattr(getattr(loader, "dataset", None), "task", None)


class _StepChain:
    """The one ``training_step`` wrapper on a LightningModule through which every method's wrapper runs."""

    def __init__(self, pl_module: LightningModule, trainer: Trainer) -> None:
        self.trainer = trainer
        self.pl_module = pl_module
        self.user_defined_attribute = "training_step" in pl_module.__dict__
        self.original = pl_module.training_step
        self.callbacks: list[ContinualCallback] = []

        @functools.wraps(self.original)
        def training_step(batch: Any, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
            return self._step_from(0, list(self.callbacks), batch, args, kwargs)

        self.wrapper = training_step

    @classmethod
    def attach(cls, pl_module: LightningModule, callback: ContinualCallback, trainer: Trainer) -> None:
        chain = pl_module.__dict__.get(_CHAIN_ATTRIBUTE)
        if chain is None:
            chain = cls(pl_module, trainer)
            pl_module.__dict__[_CHAIN_ATTRIBUTE] = chain
            pl_module.__dict__["training_step"] = chain.wrapper
        chain.trainer = trainer
        if callback not in chain.callbacks:
            chain.callbacks.append(callback)
            order = {id(cb): i for i, cb in enumerate(trainer.callbacks)}
            chain.callbacks.sort(key=lambda cb: order.get(id(cb), len(order)))

    @staticmethod
    def detach(pl_module: LightningModule, callback: ContinualCallback) -> None:
        chain = pl_module.__dict__.get(_CHAIN_ATTRIBUTE)
        if chain is None or callback not in chain.callbacks:
            return
        chain.callbacks.remove(callback)
        if chain.callbacks:
            return
        del pl_module.__dict__[_CHAIN_ATTRIBUTE]
        if chain.user_defined_attribute:
            pl_module.__dict__["training_step"] = chain.original
        else:
            del pl_module.__dict__["training_step"]

    def _step_from(
        self, position: int, callbacks: list[ContinualCallback], batch: Any, args: tuple, kwargs: dict
    ) -> STEP_OUTPUT:
        if position == len(callbacks):
            return self.original(batch, *args, **kwargs)
        return callbacks[position].wrap_training_step(
            self.trainer,
            self.pl_module,
            batch,
            lambda inner: self._step_from(position + 1, callbacks, inner, args, kwargs),
        )


def add_to_loss(output: STEP_OUTPUT, term: Tensor) -> STEP_OUTPUT:
    """Add ``term`` to the loss of a training-step output (a tensor or a dict with ``"loss"``).

    A ``None`` output (the user skipped the batch) stays ``None``.

    >>> add_to_loss(torch.tensor(1.0), torch.tensor(0.5))
    tensor(1.5000)
    >>> add_to_loss({"loss": torch.tensor(1.0), "acc": 0.9}, torch.tensor(2.0))["loss"]
    tensor(3.)
    """
    if output is None:
        return None
    if isinstance(output, Tensor):
        return output + term
    if isinstance(output, dict) and "loss" in output:
        return {**output, "loss": output["loss"] + term}
    raise TypeError(
        f"training_step returned a {type(output).__name__}; continual methods need a loss tensor or a dict "
        "with a 'loss' key."
    )
