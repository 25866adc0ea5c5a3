"""``fit_tasks``: the task loop of DESIGN.md §1 in one call."""

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_incremental.evaluation import ContinualEvaluation, ContinualResult
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
) -> ContinualResult:
    """Train ``model`` on every task of ``stream`` in turn, one new Trainer per task; return the evaluation.

    The same callback instances go to every Trainer, so the methods carry their state from task to task.
    A :class:`~lightning_incremental.ContinualEvaluation` among ``callbacks`` is used (and moved last);
    otherwise one is added. ``trainer_kwargs`` go to every Trainer (default ``max_epochs=10``).

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
    for task in stream:
        trainer = Trainer(callbacks=[*methods, *extra_callbacks, evaluation], **trainer_kwargs)
        loader = task.train_dataloader(batch_size=batch_size, shuffle=shuffle, **(dataloader_kwargs or {}))
        trainer.fit(model, loader)
    return evaluation.result()
