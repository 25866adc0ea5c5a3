"""Continual evaluation: the accuracy matrix of a stream and the metrics computed from it."""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torchmetrics.classification import MulticlassAccuracy

from lightning_incremental import metrics
from lightning_incremental.core.batch import split_batch, task_labels_of
from lightning_incremental.core import ContinualCallback
from lightning_incremental.scenarios.stream import TaskStream

PredictFn = Callable[[LightningModule, Any], Tensor]

_SUMMARY_NAMES = {
    "acc": "average accuracy",
    "avg_incremental_acc": "average incremental accuracy",
    "bwt": "backward transfer (BWT)",
    "fwt": "forward transfer (FWT)",
    "forgetting": "forgetting",
}


@dataclass
class ContinualResult:
    """The accuracy matrix of a run and the metrics of :mod:`lightning_incremental.metrics` over it.

    Attributes:
        matrix: ``matrix[i][j]``, accuracy on task ``j`` after training task ``i`` (rows: tasks trained).
        initial: accuracy on each task before any training, or ``None`` when it was not measured.

    >>> result = ContinualResult([[0.9, 0.2], [0.5, 0.8]], initial=[0.5, 0.5])
    >>> result.summary()["bwt"]
    -0.4
    >>> ContinualResult.from_json(result.to_json()).matrix == result.matrix
    True
    """

    matrix: list[list[float]]
    initial: list[float] | None = None

    def summary(self) -> dict[str, float]:
        """The scalar metrics: ``acc``, ``avg_incremental_acc``, ``bwt``, ``fwt``, ``forgetting``."""
        if not self.matrix:
            return {name: math.nan for name in _SUMMARY_NAMES}
        matrix = torch.tensor(self.matrix, dtype=torch.float64)
        fwt = metrics.forward_transfer(matrix, torch.tensor(self.initial)) if self.initial else torch.tensor(math.nan)
        values = {
            "acc": metrics.average_accuracy(matrix),
            "avg_incremental_acc": metrics.average_incremental_accuracy(matrix),
            "bwt": metrics.backward_transfer(matrix),
            "fwt": fwt,
            "forgetting": metrics.forgetting(matrix),
        }
        return {name: round(float(value), 6) for name, value in values.items()}

    def table(self) -> str:
        """The summary and the matrix as plain text."""
        lines = [f"{_SUMMARY_NAMES[name]:<30} {value:>8.4f}" for name, value in self.summary().items()]
        n_tasks = len(self.matrix[0]) if self.matrix else 0
        header = "after task | " + " ".join(f"T{j:<5}" for j in range(n_tasks))
        lines += ["", header, "-" * len(header)]
        if self.initial:
            lines.append("   initial | " + " ".join(f"{v:.3f} " for v in self.initial))
        lines += [f"{i:>10} | " + " ".join(f"{v:.3f} " for v in row) for i, row in enumerate(self.matrix)]
        return "\n".join(lines)

    def to_json(self) -> str:
        """The matrix, the initial accuracies and the summary as a JSON document."""
        return json.dumps({"matrix": self.matrix, "initial": self.initial, "summary": self.summary()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ContinualResult":
        data = json.loads(text)
        return cls(matrix=data["matrix"], initial=data["initial"])

    def plot(self, title: str = "accuracy matrix") -> Figure:
        """A heat map of the matrix (rows: after training task i; columns: evaluated on task j)."""
        figure = Figure(figsize=(1.0 + 0.9 * max(len(self.matrix[0]), 2), 0.8 + 0.8 * max(len(self.matrix), 2)))
        axes = figure.add_subplot()
        image = axes.imshow(self.matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        for i, row in enumerate(self.matrix):
            for j, value in enumerate(row):
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
        axes.set_xlabel("evaluated on task")
        axes.set_ylabel("after training task")
        axes.set_xticks(range(len(self.matrix[0])))
        axes.set_yticks(range(len(self.matrix)))
        axes.set_title(title)
        figure.colorbar(image, ax=axes, fraction=0.046)
        figure.tight_layout()
        return figure


class ContinualEvaluation(ContinualCallback):
    r"""Evaluate every task's test set after each task: the accuracy matrix, ACC, BWT, FWT, forgetting.

    Add it last to the callbacks of every task's Trainer (after methods that change the weights at task
    end). It evaluates once before the first task (the baseline for FWT) and once after each fit, on the
    model's device and under the Trainer's precision; under DDP every rank evaluates a share of each test
    set and torchmetrics sums the counts, so all ranks hold the same matrix. The metrics go to the
    Trainer's loggers as ``cl/acc``, ``cl/bwt``, ``cl/fwt``, ``cl/forgetting``, ``cl/avg_incremental_acc``
    and ``cl/acc_task_<j>``, with the task index as the step.

    Args:
        stream: the stream whose test sets are evaluated.
        task_incremental: mask the logits to each task's classes (task-incremental evaluation). Defaults to
            whether the stream is task-incremental.
        batch_size: evaluation batch size.
        predict: ``predict(pl_module, batch) -> logits``; defaults to ``pl_module(x)``.
        evaluate_initial: evaluate before the first task, for forward transfer.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental.models import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream = synthetic_stream(n_tasks=2)
        >>> model = MLPClassifier(16, 4, hidden=(32,), lr=1e-2)
        >>> evaluation = ContinualEvaluation(stream)
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=2, callbacks=[evaluation], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> result = evaluation.result()
        >>> len(result.matrix), len(result.matrix[0]), result.matrix[0][0] > 0.9
        (2, 2, True)
    """

    def __init__(
        self,
        stream: TaskStream,
        task_incremental: bool | None = None,
        batch_size: int = 256,
        predict: PredictFn | None = None,
        evaluate_initial: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(stream, TaskStream):
            raise TypeError(f"`stream` must be a TaskStream, got {type(stream).__name__}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
        self.stream = stream
        self.task_incremental = stream.scenario == "task-incremental" if task_incremental is None else task_incremental
        self.batch_size = batch_size
        self.predict = predict
        self.evaluate_initial = evaluate_initial
        self.matrix: list[list[float]] = []
        self.initial: list[float] | None = None

    def result(self) -> ContinualResult:
        """The accuracy matrix so far and its metrics."""
        return ContinualResult([list(row) for row in self.matrix], list(self.initial) if self.initial else None)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "matrix": self.matrix, "initial": self.initial}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.matrix = [list(row) for row in state_dict["matrix"]]
        self.initial = list(state_dict["initial"]) if state_dict["initial"] is not None else None

    def on_task_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.evaluate_initial and self.initial is None and not self.matrix:
            self.initial = self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.matrix.append(self.evaluate(trainer, pl_module))
        self._log(trainer)
        super().on_fit_end(trainer, pl_module)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> list[float]:
        """Accuracy on every task's test set, synchronised over DDP ranks."""
        device = trainer.strategy.root_device
        home = pl_module.device
        was_training = pl_module.training
        pl_module.to(device).eval()
        accuracy = MulticlassAccuracy(num_classes=self.stream.num_classes, average="micro").to(device)
        accuracies = []
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for task in self.stream:
                    accuracy.reset()
                    share = Subset(task.test, range(trainer.global_rank, len(task.test), trainer.world_size))
                    for batch in DataLoader(share, batch_size=self.batch_size):
                        batch = move_data_to_device(batch, device)
                        _, targets = split_batch(batch)
                        logits = self._logits(pl_module, batch, task.classes).float()
                        accuracy.update(logits.argmax(dim=-1), targets)
                    accuracies.append(float(accuracy.compute()))
        finally:
            pl_module.to(home).train(was_training)
        return accuracies

    def _logits(self, pl_module: LightningModule, batch: Any, classes: tuple[int, ...]) -> Tensor:
        if self.predict is not None:
            logits = self.predict(pl_module, batch)
        else:
            inputs, _ = split_batch(batch)
            task_labels = task_labels_of(batch)
            logits = (
                pl_module(inputs)
                if task_labels is None or not self._takes_task_labels(pl_module)
                else (pl_module(inputs, task_labels))
            )
        if self.task_incremental:
            mask = torch.full_like(logits, float("-inf"))
            mask[..., list(classes)] = 0.0
            logits = logits + mask
        return logits

    @staticmethod
    def _takes_task_labels(pl_module: LightningModule) -> bool:
        import inspect

        return len(inspect.signature(pl_module.forward).parameters) >= 2

    def _log(self, trainer: Trainer) -> None:
        if not trainer.loggers:
            return
        values = {f"cl/{name}": value for name, value in self.result().summary().items() if not math.isnan(value)}
        values.update({f"cl/acc_task_{j}": value for j, value in enumerate(self.matrix[-1])})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=len(self.matrix) - 1)
            logger.save()
