"""The experiment runner: one cataloged method over a task stream, as the command line, the benchmarks and the tests
run it.

Its defaults are the reference protocol (``docs/architecture.md``): scikit-learn's digits in 5 tasks
(:func:`make_stream`), an MLP 64-256-256-10 trained with Adam 1e-3 (:func:`reference_model`), batch 32, 10 epochs a
task, each method with its catalog defaults (:class:`~lightning_incremental.catalog.MethodSpec`). What a study or a
test changes (the model, the batches, the Trainer, the evaluation) is a keyword of :func:`run_method`; the task loop
itself is :func:`~lightning_incremental.fit_tasks`.

Example::

    >>> from lightning_incremental.catalog import registry
    >>> run = run_method(registry()["replay"], make_stream("split", n_tasks=2), epochs=1)
    >>> len(run.result.matrix), [type(method).__name__ for method in run.methods]  # it carries Adam's state itself
    (2, ['ExperienceReplay'])
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch import Callback, LightningModule

from lightning_incremental.catalog import MethodSpec
from lightning_incremental.evaluation import ContinualEvaluation, ContinualResult
from lightning_incremental.heads import GrowHeads, IncrementalClassifier, MultiHeadClassifier
from lightning_incremental.models import MLPClassifier
from lightning_incremental.scenarios import TaskStream, digits_stream
from lightning_incremental.training import fit_tasks

SCENARIOS = {
    "split": "class-incremental: digits (0,1), (2,3), … one pair per task, one 10-way head",
    "split-task": "task-incremental: the same split, the task label in the batch, logits masked per task",
    "permuted": "domain-incremental: all digits, task 0 unpermuted, tasks 1… a fixed pixel permutation each",
}

QUIET_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


def make_stream(scenario: str, n_tasks: int = 5, seed: int = 0) -> TaskStream:
    """The digits stream of a scenario of :data:`SCENARIOS`; ``seed`` draws the permutations and the data order."""
    if scenario == "permuted":
        return digits_stream("permuted", n_tasks=n_tasks, seed=seed)
    return digits_stream("split", n_tasks=n_tasks, seed=seed, task_labels=scenario == "split-task")


def reference_model(stream: TaskStream) -> MLPClassifier:
    """MLPClassifier (hidden 256-256, Adam 1e-3) for ``stream``'s inputs: one head over every class, or one head per
    task on a task-incremental stream."""
    multi_head = stream.scenario == "task-incremental"
    n_features = stream[0].train[0][0].numel()
    return MLPClassifier(n_features, stream.num_classes, head="multihead" if multi_head else "linear")


@dataclass(frozen=True)
class MethodRun:
    """One method's run over a stream.

    Attributes:
        result: the evaluation's matrix and its metrics.
        seconds: the wall time of the task loop (training, task-end work and evaluation; not building the model).
        model: the trained model.
        methods: the method's callbacks, with the state they ended with.
        evaluation: the :class:`~lightning_incremental.ContinualEvaluation` that produced ``result``.
    """

    result: ContinualResult
    seconds: float
    model: LightningModule
    methods: list[Callback]
    evaluation: ContinualEvaluation


def run_method(
    spec: MethodSpec,
    stream: TaskStream,
    *,
    model: Callable[[TaskStream], LightningModule] = reference_model,
    epochs: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    shuffle: bool = True,
    dataloader_kwargs: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    evaluation: ContinualEvaluation | None = None,
    keep_optimizer_state: bool | None = None,
) -> MethodRun:
    """Train a fresh ``model(stream)``, seeded with ``seed``, with fresh callbacks of ``spec`` over every task.

    A cumulative spec (``joint``) trains each task on the union of the tasks so far. A model with an
    :class:`~lightning_incremental.IncrementalClassifier` or a :class:`~lightning_incremental.MultiHeadClassifier`
    gets :class:`~lightning_incremental.GrowHeads`. ``callbacks`` (a progress bar, …) join every Trainer after the
    method's; ``trainer_kwargs`` go to every Trainer (quiet by default: no logger, progress bar, summary or
    checkpoints) and ``dataloader_kwargs`` to every task's training DataLoader. ``evaluation`` defaults to accuracy
    on ``stream``'s test sets, predicted by the method's own ``predict(pl_module, batch)`` where it has one (iCaRL's
    nearest mean of exemplars). The optimizer's state is carried from task to task where the spec says so, unless
    ``keep_optimizer_state`` says otherwise.
    """
    L.seed_everything(seed, verbose=False)
    network = model(stream)
    methods = spec.callbacks(keep_optimizer_state)
    if evaluation is None:
        predict = next((method.predict for method in methods if callable(getattr(method, "predict", None))), None)
        evaluation = ContinualEvaluation(stream, predict=predict)
    growable = any(isinstance(module, IncrementalClassifier | MultiHeadClassifier) for module in network.modules())
    started = time.perf_counter()
    result = fit_tasks(
        network,
        stream.cumulative() if spec.cumulative else stream,
        callbacks=[*([GrowHeads()] if growable else []), *methods, *callbacks, evaluation],
        trainer_kwargs={**QUIET_TRAINER, "max_epochs": epochs, **(trainer_kwargs or {})},
        batch_size=batch_size,
        shuffle=shuffle,
        dataloader_kwargs=dataloader_kwargs,
        keep_optimizer_state=None,  # the methods, or the KeepOptimizerState `spec.callbacks` added, decide
    )
    return MethodRun(result, time.perf_counter() - started, network, methods, evaluation)
