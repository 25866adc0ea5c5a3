"""Continual evaluation: the metric matrix of a stream (accuracy by default, or any torchmetrics metric) and the
continual-learning metrics computed from it."""

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_incremental import metrics
from lightning_incremental.core import (
    IGNORE_INDEX,
    ContinualCallback,
    ModelInterface,
    check_interface_argument,
    continue_logging_step,
    interface_of,
    logging_step,
    own_pass,
    rows_of,
    validation_dataloaders,
)
from lightning_incremental.scenarios.stream import Task, TaskStream

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PredictFn = Callable[[LightningModule, Any], Tensor]
CollateFn = Callable[[list[Any]], Any]

DEFAULT_METRIC = "acc"  # the name of the default metric, accuracy


@dataclass
class ContinualResult:
    """The metric matrix of a run and the metrics of :mod:`lightning_incremental.metrics` over it.

    Attributes:
        matrix: ``matrix[i][j]``, the metric on task ``j`` after training task ``i`` (rows: tasks trained).
        initial: the metric on each task before any training, or ``None`` when it was not measured.
        metric: the metric's name (``"acc"``: accuracy); the summary's keys and the table use it.
        higher_is_better: the direction of the metric; BWT, FWT and forgetting follow it, so that negative
            BWT/FWT and positive forgetting always mean worse (for an error such as MSE, forgetting is the
            increase of the error).

    >>> result = ContinualResult([[0.9, 0.2], [0.5, 0.8]], initial=[0.5, 0.5])
    >>> result.summary()["acc"], result.summary()["bwt"]
    (0.65, -0.4)
    >>> errors = ContinualResult([[0.1, 0.9], [0.4, 0.2]], metric="mse", higher_is_better=False)
    >>> errors.summary()["mse"], errors.summary()["bwt"], errors.summary()["forgetting"]
    (0.3, -0.3, 0.3)
    >>> ContinualResult.from_json(errors.to_json()) == errors
    True
    >>> seen_so_far = ContinualResult([[0.9], [0.7, 0.8]])  # a validation loader per task seen so far
    >>> seen_so_far.summary()["acc"], seen_so_far.summary()["bwt"], math.isnan(seen_so_far.summary()["fwt"])
    (0.75, -0.2, True)
    """

    matrix: list[list[float]]
    initial: list[float] | None = None
    metric: str = DEFAULT_METRIC
    higher_is_better: bool = True

    def summary(self) -> dict[str, float]:
        """The scalar metrics: ``<metric>`` (its average over the tasks seen, after the last task; ``acc`` is the
        average accuracy), ``avg_incremental_<metric>``, ``bwt``, ``fwt`` and ``forgetting``; ``nan`` where
        undefined."""
        if not self.matrix:
            return {name: math.nan for name in self._labels()}
        width, direction = self._width(), self.higher_is_better
        matrix = torch.tensor([_padded(row, width) for row in self.matrix], dtype=torch.float64)
        initial = torch.tensor(_padded(self.initial, width), dtype=torch.float64) if self.initial else None
        values = {
            self.metric: metrics.average_metric(matrix),
            f"avg_incremental_{self.metric}": metrics.average_incremental_metric(matrix),
            "bwt": metrics.backward_transfer(matrix, direction),
            "fwt": math.nan if initial is None else metrics.forward_transfer(matrix, initial, direction),
            "forgetting": metrics.forgetting(matrix, direction),
        }
        return {name: round(float(value), 6) for name, value in values.items()}

    def table(self) -> str:
        """The summary and the matrix as plain text."""
        summary = self.summary()
        lines = [f"{self.metric} ({'higher' if self.higher_is_better else 'lower'} is better)"]
        lines += [f"{label:<30} {summary[name]:>10.4f}" for name, label in self._labels().items()]
        width = self._width()
        header = "after task | " + " ".join(f"{f'T{j}':>8}" for j in range(width))
        lines += ["", header, "-" * len(header)]
        if self.initial:
            lines.append("   initial | " + " ".join(f"{value:8.3f}" for value in _padded(self.initial, width)))
        lines += [
            f"{i:>10} | " + " ".join(f"{value:8.3f}" for value in _padded(row, width))
            for i, row in enumerate(self.matrix)
        ]
        return "\n".join(lines)

    def _width(self) -> int:
        """The number of tasks evaluated: rows of a matrix built from one validation loader per task seen grow."""
        return max((len(row) for row in self.matrix), default=0)

    def to_json(self) -> str:
        """The metric's name and direction, the matrix, the initial values and the summary as a JSON document."""
        document = {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "matrix": self.matrix,
            "initial": self.initial,
            "summary": self.summary(),
        }
        return json.dumps(document, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ContinualResult":
        """The result of a :meth:`to_json` document (one without ``metric`` is an accuracy matrix)."""
        data = json.loads(text)
        return cls(
            matrix=data["matrix"],
            initial=data["initial"],
            metric=data.get("metric", DEFAULT_METRIC),
            higher_is_better=data.get("higher_is_better", True),
        )

    def plot(self, title: str | None = None) -> "Figure":
        """A heat map of the matrix (rows: after training task i; columns: evaluated on task j).

        The colour scale is 0–1 when every value lies there (accuracy, F1), else the matrix's range; it is
        reversed for a lower-is-better metric, so the better values have the same colour for every metric.
        """
        from matplotlib.figure import Figure  # imported here: importing the package must not load matplotlib

        values = [value for row in self.matrix for value in row]
        low, high = (0.0, 1.0) if all(0.0 <= value <= 1.0 for value in values) else (min(values), max(values))
        n_rows, n_columns = len(self.matrix), len(self.matrix[0])
        figure = Figure(figsize=(1.0 + 0.9 * max(n_columns, 2), 0.8 + 0.8 * max(n_rows, 2)))
        axes = figure.add_subplot()
        colours = "viridis" if self.higher_is_better else "viridis_r"
        image = axes.imshow(self.matrix, vmin=low, vmax=high, cmap=colours)
        for i, row in enumerate(self.matrix):
            for j, value in enumerate(row):
                position = (value - low) / (high - low) if high > low else 1.0
                brightness = position if self.higher_is_better else 1.0 - position
                colour = "white" if brightness < 0.6 else "black"
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour)
        axes.set_xlabel("evaluated on task")
        axes.set_ylabel("after training task")
        axes.set_xticks(range(n_columns))
        axes.set_yticks(range(n_rows))
        axes.set_title(f"{self.metric} matrix" if title is None else title)
        figure.colorbar(image, ax=axes, fraction=0.046)
        figure.tight_layout()
        return figure

    def _labels(self) -> dict[str, str]:
        shown = "accuracy" if self.metric == "acc" else self.metric
        return {
            self.metric: f"average {shown}",
            f"avg_incremental_{self.metric}": f"average incremental {shown}",
            "bwt": "backward transfer (BWT)",
            "fwt": "forward transfer (FWT)",
            "forgetting": "forgetting",
        }


class ContinualEvaluation(ContinualCallback):
    r"""Evaluate every task's test set after each task: the metric matrix, its average, BWT, FWT and forgetting.

    - **The test sets** are a :class:`~lightning_incremental.scenarios.TaskStream`'s (``stream``), or, without
      one, the fit's own validation dataloaders: the ``j``-th (Lightning's ``dataloader_idx``) is task ``j``'s. A
      DataModule whose ``val_dataloader`` returns one loader per task seen so far gives row ``t`` the ``t + 1``
      tasks it knows (the matrix is lower-triangular, FWT undefined); one that returns every task's gives the full
      matrix. The rows are measured at the task end, after every method's task end (a merge, a closed-form head),
      on every row of each loader's dataset (``limit_val_batches`` is Lightning's own validation's), and kept in
      the state: a checkpoint carries the matrix to the next update's process, so it spans jobs.
    Add it last to the callbacks of every task's Trainer (after methods that change the weights at task end).
    It evaluates once before the first task (the baseline for FWT) and once after each fit, on the model's
    device and under the Trainer's precision.

    - **The metric** is accuracy by default (named ``acc``; labels of ``-100`` are skipped). Any torchmetrics
      ``Metric`` (``MeanSquaredError()``, ``MulticlassF1Score(10)``, …) or ``MetricCollection`` fits; it is
      cloned and reset for every test set, and a single metric is named after its class (wrap it as
      ``MetricCollection({"mse": MeanSquaredError()})`` for another name). A collection gives one matrix per
      metric (:attr:`matrices`); the ``primary`` one (the first, or named) drives :meth:`result` and the logged
      summary. BWT, FWT and forgetting follow the metric's ``higher_is_better`` (see
      :mod:`lightning_incremental.metrics`).
    - **What the metric receives**: ``metric.update(predictions, targets)``, with the targets and the
      predictions read through the model interface (:class:`~lightning_incremental.ModelInterface`: ``model(x)``
      for ``(x, y)`` batches, ``model(**inputs)`` and ``.logits`` for Hugging Face-style dicts, the first element
      of a ``(logits, features)`` output), or what ``predict(pl_module, batch)`` returns. Classification metrics
      get the logits; class scores in the last dimension go to dimension 1, where torchmetrics expects them
      (token-level ``[B, T, C]`` becomes ``[B, C, T]``), and a single output per row (``[B, 1]`` for targets
      ``[B]``) is squeezed to ``[B]``.
    - **DDP**: every rank evaluates a share of each test set and torchmetrics synchronises the metric's states in
      ``compute``, so every rank holds the same matrix (counts, not averages, are summed).
    - **Private passes**: evaluation leaves the training as it would have been without it: the model's train/eval
      mode is restored, even on an error, and the global random stream (which a shuffled DataLoader draws from)
      is untouched.
    - **Logging**: after each task, to the Trainer's loggers: the primary metric's summary (``cl/acc``,
      ``cl/avg_incremental_acc``, ``cl/bwt``, ``cl/fwt``, ``cl/forgetting`` for accuracy), every metric's
      average ``cl/<metric>`` and its row ``cl/<metric>_task_<j>``, and the index of the task just trained,
      ``cl/task``. The step is the number of optimizer steps over all tasks so far, and the Trainer of each later
      task continues its own logging step from there, so the training rows and the ``cl/`` rows of a logger
      shared by the tasks' Trainers lie on one non-decreasing step axis.

    Args:
        stream: the stream whose test sets are evaluated; ``None``: the fit's validation dataloaders, one per task.
        metric: a torchmetrics ``Metric`` or ``MetricCollection``; defaults to micro accuracy over
            ``stream.num_classes`` (or ``num_classes``) classes. A metric whose ``higher_is_better`` is ``None``
            (an aggregate such as ``MeanMetric``) needs a subclass that sets it.
        primary: the name of the metric of a collection that drives the summary; defaults to the collection's
            first (torchmetrics sorts the names of a collection built from a dict).
        task_incremental: mask the logits to each task's classes (task-incremental evaluation). Defaults to
            whether the stream is task-incremental.
        batch_size: evaluation batch size.
        predict: ``predict(pl_module, batch) -> predictions``, replacing the model interface's predictions
            (iCaRL's nearest-mean-of-exemplars classifier: ``predict=icarl.predict``).
        model_interface: how to read the model's outputs and the targets; ``None``: the model's
            ``continual_interface`` attribute, else the default. A model whose forward takes the task label of
            ``(x, y, t)`` batches: ``ModelInterface(forward=lambda model, batch: model(batch[0], batch[2]))``.
        collate_fn: the collate function of the test loaders, for items torch's default cannot stack (token
            sequences of different lengths: :func:`lightning_incremental.text.pad_batch`).
        evaluate_initial: evaluate before the first task, for forward transfer. Without it, one test batch
            still goes through the model and the metric before the first task, so a metric that does not fit the
            model fails before training.
        num_classes: the number of classes of the default accuracy without a stream.

    Example::

        >>> import lightning as L
        >>> from torchmetrics.classification import MulticlassF1Score
        >>> from lightning_incremental.models import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream = synthetic_stream(n_tasks=2)
        >>> model = MLPClassifier(16, 4, hidden=(32,), lr=1e-2)
        >>> evaluation = ContinualEvaluation(stream)
        >>> both = MetricCollection({"f1": MulticlassF1Score(4), "acc": MulticlassAccuracy(4, average="micro")})
        >>> f1 = ContinualEvaluation(stream, both, primary="f1")
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=2, callbacks=[evaluation, f1], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> result = evaluation.result()
        >>> len(result.matrix), len(result.matrix[0]), result.matrix[0][0] > 0.9
        (2, 2, True)
        >>> sorted(f1.matrices), f1.result().metric, f1.result("acc").matrix == result.matrix
        (['acc', 'f1'], 'f1', True)
    """

    def __init__(
        self,
        stream: TaskStream | None = None,
        metric: Metric | MetricCollection | None = None,
        primary: str | None = None,
        task_incremental: bool | None = None,
        batch_size: int = 256,
        predict: PredictFn | None = None,
        model_interface: ModelInterface | None = None,
        collate_fn: CollateFn | None = None,
        evaluate_initial: bool = True,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if stream is not None and not isinstance(stream, TaskStream):
            raise TypeError(f"`stream` must be a TaskStream or None (the validation dataloaders), got {stream!r}.")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
            raise TypeError(f"`num_classes` must be an integer or None, got {num_classes!r}.")
        if stream is None and task_incremental:
            raise ValueError(
                "`task_incremental=True` masks the logits to each task's classes, which only a TaskStream knows: "
                "pass the stream, or `task_incremental=False` for the validation dataloaders."
            )
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
        for name, value in (("predict", predict), ("collate_fn", collate_fn)):
            if value is not None and not callable(value):
                raise TypeError(f"`{name}` must be a callable or None, got {type(value).__name__}.")
        self.stream = stream
        self.num_classes = stream.num_classes if stream is not None else num_classes
        self.metric = _as_collection(metric, self.num_classes)
        self.measures_default_accuracy = metric is None
        self.higher_is_better = _directions(self.metric)
        if primary is not None and primary not in self.higher_is_better:
            raise ValueError(f"`primary` must name one of the metrics {list(self.higher_is_better)}, got {primary!r}.")
        self.primary = primary if primary is not None else next(iter(self.higher_is_better))
        if task_incremental is None:
            task_incremental = stream is not None and stream.scenario == "task-incremental"
        self.task_incremental = task_incremental
        self.batch_size = batch_size
        self.predict = predict
        self.model_interface = check_interface_argument(model_interface)
        self.collate_fn = collate_fn
        self.evaluate_initial = evaluate_initial
        self.matrices: dict[str, list[list[float]]] = {name: [] for name in self.higher_is_better}
        self.initials: dict[str, list[float]] | None = None
        self.log_step = 0  # optimizer steps over all tasks so far: the step of the logs

    @property
    def matrix(self) -> list[list[float]]:
        """The primary metric's matrix: ``matrix[i][j]``, the metric on task ``j`` after training task ``i``."""
        return self.matrices[self.primary]

    def result(self, metric: str | None = None) -> ContinualResult:
        """The matrix of ``metric`` (default: the primary metric) so far, and its metrics."""
        name = self.primary if metric is None else metric
        if name not in self.matrices:
            raise ValueError(f"`metric` must be one of {list(self.matrices)}, got {metric!r}.")
        initial = list(self.initials[name]) if self.initials is not None else None
        return ContinualResult([list(row) for row in self.matrices[name]], initial, name, self.higher_is_better[name])

    def results(self) -> dict[str, ContinualResult]:
        """The result of every metric, by name."""
        return {name: self.result(name) for name in self.matrices}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "matrices": {name: [list(row) for row in matrix] for name, matrix in self.matrices.items()},
            "initials": None if self.initials is None else {name: list(row) for name, row in self.initials.items()},
            "log_step": self.log_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict["matrices"]) != set(self.matrices):
            raise ValueError(
                f"The state holds the matrices of {sorted(state_dict['matrices'])}, but this ContinualEvaluation "
                f"measures {sorted(self.matrices)}: build it with the metric of the run that saved the state."
            )
        super().load_state_dict(state_dict)
        self.matrices = {name: [list(row) for row in matrix] for name, matrix in state_dict["matrices"].items()}
        initials = state_dict["initials"]
        self.initials = None if initials is None else {name: list(row) for name, row in initials.items()}
        self.log_step = int(state_dict["log_step"])

    @override
    def on_task_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.stream is None:
            self._check_validation_dataloaders(trainer)
        if self.initials is not None or self.matrix:
            return
        if self.evaluate_initial:
            self.initials = self.evaluate(trainer, pl_module)
        else:
            self._check_a_batch(trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if logging_step(trainer) < self.log_step:  # a new Trainer: continue the axis of the earlier tasks
            continue_logging_step(trainer, self.log_step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, row in self.evaluate(trainer, pl_module).items():
            self.matrices[name].append(row)
        self.log_step = max(self.log_step, logging_step(trainer))
        self._log(trainer)
        super().on_fit_end(trainer, pl_module)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, list[float]]:
        """Every metric on every task's test set, ``{name: [value on task 0, …]}``, the same on every DDP rank."""
        values: dict[str, list[float]] = {name: [] for name in self.matrices}
        interface = interface_of(pl_module, self.model_interface)
        with _on_root_device(trainer, pl_module):
            for index, (task, rows) in enumerate(self._test_sets(trainer)):
                metric = self._fresh_metric(trainer)
                with own_pass(trainer, pl_module, rows, autocast=False) as batches:
                    for batch in batches:
                        metric.update(*self._predictions_and_targets(trainer, pl_module, interface, batch, task, index))
                    computed = metric.compute()
                for name, row in values.items():
                    row.append(_scalar(computed, name, index))
        return values

    def _check_validation_dataloaders(self, trainer: Trainer) -> None:
        """Refuse, before training, a fit whose validation dataloaders cannot give this task's row."""
        loaders = validation_dataloaders(trainer)
        if not loaders:
            raise ValueError(
                "ContinualEvaluation() without a stream evaluates the fit's validation dataloaders, one per task, and "
                "this fit has none (no `val_dataloader` or `validation_step`, or `limit_val_batches=0`). Return one "
                "loader per task seen so far from the DataModule's `val_dataloader`, or pass a TaskStream: "
                "`ContinualEvaluation(stream)`."
            )
        if len(loaders) <= self.current_task:
            raise ValueError(
                f"This fit is task {self.current_task} (counted from the checkpoint), but it has {len(loaders)} "
                f"validation dataloader(s): ContinualEvaluation() needs one per task seen so far, loader j being task "
                f"j's ({self.current_task + 1} here). Return them from the DataModule's `val_dataloader`, or check "
                "that `ckpt_path` is the last update's checkpoint."
            )

    def _check_a_batch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """One test batch through the model and the metric, so a metric that does not fit fails before training."""
        interface = interface_of(pl_module, self.model_interface)
        task, rows = self._test_sets(trainer)[0]
        with _on_root_device(trainer, pl_module), own_pass(trainer, pl_module, rows, autocast=False) as batches:
            batch = next(batches, None)
            if batch is not None:
                metric = self._fresh_metric(trainer)
                metric.update(*self._predictions_and_targets(trainer, pl_module, interface, batch, task, 0))

    def _fresh_metric(self, trainer: Trainer) -> MetricCollection:
        metric = self.metric.clone().to(trainer.strategy.root_device)
        metric.reset()
        return metric

    def _test_sets(self, trainer: Trainer) -> list[tuple[Task | None, DataLoader]]:
        """Every task's test rows, this rank's share (every row once over the ranks), with the stream's task."""
        rank, world_size = trainer.global_rank, trainer.world_size
        if self.stream is not None:
            return [
                (task, rows_of(task.test, self.batch_size, self.collate_fn, rank, world_size)) for task in self.stream
            ]
        sets = []
        for index, loader in enumerate(validation_dataloaders(trainer)):
            dataset = getattr(loader, "dataset", None)
            if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
                raise TypeError(
                    f"ContinualEvaluation evaluates every row of each validation dataloader's dataset, once over the "
                    f"ranks, but validation dataloader {index} has no map-style dataset (got "
                    f"{type(dataset).__name__}). Give it a dataset with `__len__` and `__getitem__`, or pass a "
                    "TaskStream."
                )
            collate_fn = self.collate_fn if self.collate_fn is not None else loader.collate_fn
            sets.append((None, rows_of(dataset, self.batch_size, collate_fn, rank, world_size)))
        return sets

    def _predictions_and_targets(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        interface: ModelInterface,
        batch: Any,
        task: Task | None,
        index: int,
    ) -> tuple[Tensor, Tensor]:
        """The predictions and targets of a batch already on the model's device, inside the evaluation's pass."""
        targets = interface.targets(batch)
        if self.measures_default_accuracy and targets.is_floating_point():
            raise ValueError(
                "ContinualEvaluation measures accuracy by default, which needs integer class labels, but the targets "
                f"of task {index} are floating point (a regression stream?). Pass a metric that fits them, e.g. "
                "`ContinualEvaluation(stream, metric=torchmetrics.MeanSquaredError())`."
            )
        predict = self.predict if self.predict is not None else interface.predict
        with trainer.precision_plugin.forward_context():
            predictions = predict(pl_module, batch)
        if predictions.is_floating_point() and self.num_classes is not None:
            predictions = _grown_to(predictions.float(), targets, self.num_classes)
        if task is not None and self.task_incremental:
            predictions = _mask_to_classes(predictions, targets, task)
        return _aligned(predictions, targets), targets

    def _log(self, trainer: Trainer) -> None:
        if not trainer.loggers:
            return
        values: dict[str, float] = {"cl/task": self.current_task}
        for name, result in self.results().items():
            summary = result.summary()
            shown = summary if name == self.primary else {name: summary[name]}
            values.update({f"cl/{key}": value for key, value in shown.items() if not math.isnan(value)})
            values.update({f"cl/{name}_task_{j}": value for j, value in enumerate(result.matrix[-1])})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=self.log_step)
            logger.save()


def _padded(values: list[float], width: int) -> list[float]:
    """``values`` with ``nan`` for the tasks not evaluated yet (a row of a lower-triangular matrix)."""
    return [*values, *[math.nan] * (width - len(values))]


@contextmanager
def _on_root_device(trainer: Trainer, pl_module: LightningModule) -> Iterator[None]:
    """The model on the strategy's device inside the block (a fit may end with it elsewhere), back after."""
    home, root = pl_module.device, trainer.strategy.root_device
    if home == root:  # nothing to move (a fully_shard-ed model cannot be moved while its optimizer holds it)
        yield
        return
    pl_module.to(root)
    try:
        yield
    finally:
        pl_module.to(home)


def _as_collection(metric: Metric | MetricCollection | None, num_classes: int | None) -> MetricCollection:
    if metric is None:
        if num_classes is None:
            raise ValueError(
                "ContinualEvaluation without a stream measures accuracy over `num_classes` classes: pass "
                "`num_classes=...`, or a metric (e.g. `metric=torchmetrics.MeanSquaredError()`)."
            )
        if num_classes < 2:
            raise ValueError(
                "ContinualEvaluation measures accuracy by default, which needs a stream of at least 2 classes, but "
                f"the number of classes is {num_classes}. For a regression stream pass a metric that fits it, "
                "e.g. `ContinualEvaluation(stream, metric=torchmetrics.MeanSquaredError())`."
            )
        accuracy = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX)
        return MetricCollection({DEFAULT_METRIC: accuracy})
    if isinstance(metric, MetricCollection):
        return metric
    if isinstance(metric, Metric):
        return MetricCollection({type(metric).__name__: metric})
    raise TypeError(
        "`metric` must be a torchmetrics Metric or MetricCollection (e.g. `torchmetrics.MeanSquaredError()`), got "
        f"{type(metric).__name__}."
    )


def _directions(collection: MetricCollection) -> dict[str, bool]:
    """Whether higher is better, for every metric of ``collection`` by name."""
    directions = {}
    for name, metric in collection.items(keep_base=False, copy_state=False):
        if metric.higher_is_better is None:
            raise ValueError(
                f"The metric {name!r} ({type(metric).__name__}) does not say whether higher is better (its "
                "`higher_is_better` is None), which BWT and forgetting need. Give it a direction in a subclass, e.g. "
                f"`class MyMetric({type(metric).__name__}): higher_is_better = False`."
            )
        directions[str(name)] = bool(metric.higher_is_better)
    return directions


def _grown_to(predictions: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Class scores of a head that has not grown to every class of the stream yet (``GrowHeads``), padded with the
    lowest score for the classes it does not have, so the metric sees ``num_classes`` columns.

    >>> _grown_to(torch.zeros(2, 2), torch.tensor([0, 3]), 4)[0].tolist()[2] < -1e38
    True
    """
    missing = num_classes - predictions.shape[-1]
    if predictions.ndim != targets.ndim + 1 or missing <= 0:
        return predictions
    padding = predictions.new_full((*predictions.shape[:-1], missing), torch.finfo(predictions.dtype).min)
    return torch.cat([predictions, padding], dim=-1)


def _mask_to_classes(predictions: Tensor, targets: Tensor, task: Task) -> Tensor:
    if predictions.ndim != targets.ndim + 1:
        raise ValueError(
            f"`task_incremental=True` masks class scores to each task's classes, but predictions of shape "
            f"{tuple(predictions.shape)} are no class scores for targets of shape {tuple(targets.shape)}. Pass "
            "`task_incremental=False`."
        )
    allowed = torch.zeros(predictions.shape[-1], dtype=torch.bool, device=predictions.device)
    allowed[list(task.classes)] = True
    return predictions.masked_fill(~allowed, float("-inf"))


def _aligned(predictions: Tensor, targets: Tensor) -> Tensor:
    """``predictions`` in the layout torchmetrics expects: class scores last (``[B, C]``, ``[B, T, C]``) moved to
    dimension 1, one output per row (``[B, 1]`` for targets ``[B]``) squeezed."""
    if predictions.ndim == targets.ndim + 1 and predictions.shape[:-1] == targets.shape:
        return predictions.squeeze(-1) if predictions.shape[-1] == 1 else predictions.movedim(-1, 1)
    return predictions


def _scalar(computed: dict[str, Any], name: str, index: int) -> float:
    value = computed.get(name)
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"
        raise ValueError(
            f"The metric {name!r} gave a value of {shape} on task {index}, but the metric matrix needs one "
            "number per task: use a metric that averages to a scalar (e.g. `average='macro'`)."
        )
    return float(value)
