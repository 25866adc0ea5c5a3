"""Data that ships with the installed packages: nothing here downloads anything."""

from typing import Literal

import torch

from lightning_incremental.scenarios import stream as streams
from lightning_incremental.scenarios.stream import LabeledTensorDataset, TaskStream, permute_inputs, split_classes


def load_digits(test_size: float = 0.2, random_state: int = 0) -> tuple[LabeledTensorDataset, LabeledTensorDataset]:
    """scikit-learn's bundled 8x8 digits: a stratified train/test split, pixels / 16, flattened to 64 features.

    With the defaults this is the split of the reference protocol (``docs/architecture.md``): 1437 train, 360 test.

    >>> train, test = load_digits()
    >>> len(train), len(test), tuple(train[0][0].shape), float(train.inputs.max())
    (1437, 360, (64,), 1.0)
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=test_size, stratify=digits.target, random_state=random_state
    )

    def as_dataset(x, y) -> LabeledTensorDataset:
        return LabeledTensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))

    return as_dataset(x_train, y_train), as_dataset(x_test, y_test)


def digits_stream(
    scenario: Literal["split", "permuted"] = "split",
    n_tasks: int = 5,
    seed: int = 0,
    task_labels: bool = False,
) -> TaskStream:
    """The reference streams of ``docs/architecture.md`` on the bundled digits.

    ``"split"``: classes (0, 1), (2, 3), … one pair per task (class-incremental, or task-incremental with
    ``task_labels=True``). ``"permuted"``: all ten classes, task 0 unpermuted, tasks 1… a fixed random pixel
    permutation each (domain-incremental).

    >>> [task.classes for task in digits_stream("split")][:2]
    [(0, 1), (2, 3)]
    """
    train, test = load_digits()
    if scenario == "split":
        return split_classes(train, test, n_tasks=n_tasks, seed=seed, task_labels=task_labels)
    if scenario == "permuted":
        return permute_inputs(train, test, n_tasks=n_tasks, seed=seed)
    raise ValueError(f"`scenario` must be 'split' or 'permuted', got {scenario!r}.")


def synthetic_stream(
    scenario: Literal["split", "permuted"] = "split",
    n_tasks: int = 3,
    classes_per_task: int = 2,
    n_features: int = 16,
    train_per_class: int = 48,
    test_per_class: int = 32,
    noise: float = 0.6,
    seed: int = 0,
    task_labels: bool = False,
) -> TaskStream:
    """A small stream of Gaussian clusters, one per class, for fast tests and examples.

    ``"split"`` has ``n_tasks * classes_per_task`` classes; ``"permuted"`` has ``classes_per_task`` classes
    and permutes the features per task.

    >>> stream = synthetic_stream(n_tasks=3, classes_per_task=2)
    >>> len(stream), stream.num_classes, len(stream[0].train), len(stream[0].test)
    (3, 6, 96, 64)
    """
    n_classes = n_tasks * classes_per_task if scenario == "split" else classes_per_task
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, n_features, generator=generator) * 1.5

    def sample(per_class: int) -> LabeledTensorDataset:
        labels = torch.arange(n_classes).repeat_interleave(per_class)
        labels = labels[torch.randperm(len(labels), generator=generator)]  # no class-sorted batches
        inputs = centers[labels] + noise * torch.randn(len(labels), n_features, generator=generator)
        return LabeledTensorDataset(inputs, labels)

    train, test = sample(train_per_class), sample(test_per_class)
    if scenario == "split":
        return split_classes(train, test, n_tasks=n_tasks, task_labels=task_labels)
    if scenario == "permuted":
        return permute_inputs(train, test, n_tasks=n_tasks, seed=seed)
    raise ValueError(f"`scenario` must be 'split' or 'permuted', got {scenario!r}.")


def regression_stream(
    n_tasks: int = 3,
    n_features: int = 10,
    train_per_task: int = 256,
    test_per_task: int = 128,
    shift: float = 4.0,
    noise: float = 0.05,
    seed: int = 0,
    layout: Literal["line", "spread", "diagonal"] = "line",
    target: Literal["sincos", "sines"] = "sincos",
) -> TaskStream:
    """A drifting regression stream: one target function, inputs around a different centre in each task.

    The same function in every task, plus Gaussian noise: ``target="sincos"`` is
    ``y = sin(x . w / sqrt(d)) + 0.5 * cos(x . v / sqrt(d))`` (random ``w``, ``v``), ``"sines"`` is
    ``y = sum_i sin(x_i) / sqrt(d)``. Inputs are standard normal around the task's centre: with ``layout="line"``
    task ``t`` is centred at ``t * shift`` along a fixed random direction; ``"spread"`` puts each centre at distance
    ``shift`` from the origin in a random direction of its own; ``"diagonal"`` centres the tasks at
    ``(t - (n_tasks - 1) / 2) * shift`` along the unit diagonal. A domain-incremental stream of real-valued
    targets, on which :class:`~lightning_incremental.models.MLPRegressor` is measured. Items are ``(x, y)`` with ``y`` a
    float scalar.

    >>> stream = regression_stream(n_tasks=3)
    >>> len(stream), stream.scenario, stream[0].train[0][1].dtype
    (3, 'domain-incremental', torch.float32)
    """
    if layout not in ("line", "spread", "diagonal"):
        raise ValueError(f"`layout` must be 'line', 'spread' or 'diagonal', got {layout!r}.")
    if target not in ("sincos", "sines"):
        raise ValueError(f"`target` must be 'sincos' or 'sines', got {target!r}.")
    generator = torch.Generator().manual_seed(seed)
    w, v = torch.randn(n_features, generator=generator), torch.randn(n_features, generator=generator)
    direction = torch.nn.functional.normalize(torch.randn(n_features, generator=generator), dim=0)
    scale = n_features**0.5
    if layout == "line":
        centres = [task * shift * direction for task in range(n_tasks)]
    elif layout == "spread":
        centres = list(shift * torch.nn.functional.normalize(torch.randn(n_tasks, n_features, generator=generator)))
    else:
        centres = [(task - (n_tasks - 1) / 2) * shift * torch.ones(n_features) / scale for task in range(n_tasks)]

    def function(x: torch.Tensor) -> torch.Tensor:
        if target == "sines":
            return torch.sin(x).sum(-1) / scale
        return torch.sin(x @ w / scale) + 0.5 * torch.cos(x @ v / scale)

    def sample(task: int, n: int) -> LabeledTensorDataset:
        x = torch.randn(n, n_features, generator=generator) + centres[task]
        return LabeledTensorDataset(x, function(x) + noise * torch.randn(n, generator=generator))

    tasks = [
        streams.Task(index, (), streams.TaskDataset(sample(index, train_per_task)), sample(index, test_per_task))
        for index in range(n_tasks)
    ]
    return TaskStream(tasks, "domain-incremental", num_classes=0, name="regression")
