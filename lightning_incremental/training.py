"""``fit_tasks``: the task loop in one call; ``load_task_checkpoint``: resume between tasks."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_incremental.core import PROGRESS_KEY, ContinualCallback, assign_state_keys
from lightning_incremental.evaluation import ContinualEvaluation, ContinualResult
from lightning_incremental.optimizer_state import KeepOptimizerState
from lightning_incremental.scenarios.stream import TaskStream

DEFAULT_TRAINER_KWARGS: dict[str, Any] = {"max_epochs": 10, "enable_model_summary": False}


def fit_tasks(
    model: LightningModule,
    stream: TaskStream,
    callbacks: Sequence[Callback] = (),
    trainer_kwargs: dict[str, Any] | None = None,
    batch_size: int = 32,
    shuffle: bool = True,
    dataloader_kwargs: dict[str, Any] | None = None,
    keep_optimizer_state: bool | None = None,
) -> ContinualResult:
    """Train ``model`` on every task of ``stream`` in turn, one new Trainer per task; return the evaluation.

    The same callback instances go to every Trainer, so the methods carry their state from task to task.
    A :class:`~lightning_incremental.ContinualEvaluation` among ``callbacks`` is used (and moved last);
    otherwise one is added. ``trainer_kwargs`` go to every Trainer (default ``max_epochs=10``).
    ``keep_optimizer_state``: ``None`` (the default) lets the methods carry the optimizer's state from task to task
    where it helps them, as in a user's own Trainer (see :class:`~lightning_incremental.KeepOptimizerState`);
    ``True`` / ``False`` adds a ``KeepOptimizerState(carry=...)`` that decides, unless ``callbacks`` hold one.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental.models import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream = synthetic_stream(n_tasks=2)
        >>> result = fit_tasks(MLPClassifier(16, 4, hidden=(32,)), stream, batch_size=16,
        ...                    trainer_kwargs={"max_epochs": 2, "logger": False, "enable_progress_bar": False,
        ...                                    "enable_checkpointing": False})
        >>> len(result.matrix)
        2
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
    trainer_kwargs = {**DEFAULT_TRAINER_KWARGS, **(trainer_kwargs or {})}
    extra_callbacks = list(trainer_kwargs.pop("callbacks", []))
    evaluations = [cb for cb in callbacks if isinstance(cb, ContinualEvaluation)]
    evaluation = evaluations[0] if evaluations else ContinualEvaluation(stream)
    methods = [cb for cb in callbacks if cb is not evaluation]
    if keep_optimizer_state is not None and not any(isinstance(cb, KeepOptimizerState) for cb in methods):
        methods.append(KeepOptimizerState(carry=keep_optimizer_state))
    for task in stream:
        trainer = Trainer(callbacks=[*methods, *extra_callbacks, evaluation], **trainer_kwargs)
        loader = task.train_dataloader(batch_size=batch_size, shuffle=shuffle, **(dataloader_kwargs or {}))
        trainer.fit(model, loader)
    return evaluation.result()


def load_task_checkpoint(checkpoint_path: str | Path, model: LightningModule, callbacks: Sequence[Callback]) -> None:
    """Load the model weights and every callback's state from a checkpoint saved between two tasks.

    ``trainer.fit(..., ckpt_path=...)`` of such a checkpoint starts the next task by itself (a
    :class:`~lightning_incremental.TaskCheckpoint` writes it; see ``docs/architecture.md``, *Updates as jobs*).
    This is the same from Python, before any Trainer: build the same model and callback list, call this, then
    evaluate the model or fit the next task as usual.

    Example::

        >>> import lightning as L, tempfile, os
        >>> from lightning_incremental.models import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream = synthetic_stream(n_tasks=2)
        >>> evaluation, model = ContinualEvaluation(stream), MLPClassifier(16, 4, hidden=(8,))
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[evaluation], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, stream[0].train_dataloader())
        >>> path = os.path.join(tempfile.mkdtemp(), "after_task_0.ckpt")
        >>> trainer.save_checkpoint(path)
        >>> restored = ContinualEvaluation(stream)
        >>> load_task_checkpoint(path, MLPClassifier(16, 4, hidden=(8,)), [restored])
        >>> restored.matrix == evaluation.matrix, restored.tasks_completed
        (True, 1)
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    progress = checkpoint.get(PROGRESS_KEY)
    if progress is not None and progress["task_in_progress"]:
        raise ValueError(
            f"{checkpoint_path} was saved during task {progress['tasks_completed']}, before its task end "
            "(ModelCheckpoint saves at epoch ends), so it is no checkpoint between two tasks. Resume that task with "
            "`trainer.fit(..., ckpt_path=...)`, or start the next one from a checkpoint that holds the task end "
            "(`lightning_incremental.TaskCheckpoint`'s last.ckpt)."
        )
    callbacks = list(callbacks)
    for callback in callbacks:
        if isinstance(callback, ContinualCallback):
            callback.prepare_model(model)
    model.load_state_dict(checkpoint["state_dict"])
    assign_state_keys(callbacks)
    states = checkpoint.get("callbacks", {})
    for callback in callbacks:
        if callback.state_key in states:
            callback.load_state_dict(states[callback.state_key])
        elif isinstance(callback, ContinualCallback):
            raise KeyError(
                f"The checkpoint holds no state for {callback.state_key!r} (it has {sorted(states)}). Build the "
                "same callbacks, in the same order, as the run that saved it."
            )
