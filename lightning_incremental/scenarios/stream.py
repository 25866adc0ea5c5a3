"""Task streams: a dataset cut into a sequence of tasks (experiences).

- :func:`split_classes` — each task holds a disjoint group of classes (class-incremental with one head,
  task-incremental when the task label travels in the batch as ``(x, y, t)``).
- :func:`permute_inputs` — every task holds all classes with its own fixed permutation of the input
  features (domain-incremental); task 0 is the unpermuted data.

Any map-style dataset whose items are ``(x, y, ...)`` works; labels are read from ``.targets`` when the
dataset has it (torchvision's datasets, :class:`LabeledTensorDataset`), else by indexing every item once.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

Scenario = Literal["class-incremental", "task-incremental", "domain-incremental"]


class LabeledTensorDataset(Dataset):
    """Inputs and targets held as tensors; items are ``(x, y)`` and ``.targets`` is ``y``.

    Integer class labels are kept as int64; real-valued targets (regression) keep their floating dtype.

    >>> data = LabeledTensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 1], dtype=torch.int32))
    >>> len(data), data.targets.tolist(), data.targets.dtype
    (3, [0, 1, 1], torch.int64)
    >>> LabeledTensorDataset(torch.zeros(2, 2), torch.tensor([0.5, 1.5])).targets.dtype
    torch.float32
    """

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"`inputs` has {len(inputs)} rows but `targets` has {len(targets)}.")
        self.inputs = inputs
        self.targets = targets if targets.is_floating_point() else targets.long()

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]


def targets_of(dataset: Dataset) -> Tensor:
    """The integer label of every item of ``dataset``, as a 1-d tensor.

    >>> targets_of(Subset(LabeledTensorDataset(torch.zeros(4, 1), torch.tensor([3, 1, 2, 0])), [2, 0])).tolist()
    [2, 3]
    """
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([targets_of(part) for part in dataset.datasets])
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).long().reshape(-1)
    labels = []
    for index in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(
                f"{type(dataset).__name__} has no `.targets` and its items are not (x, y) pairs, so its labels "
                "cannot be read. Give the dataset a `.targets` attribute or return (x, y) from `__getitem__`."
            )
        labels.append(int(item[1]))
    return torch.tensor(labels, dtype=torch.long)


class TaskDataset(Dataset):
    """The items of one task: a subset of a dataset, optionally permuted and carrying the task label."""

    def __init__(
        self,
        source: Dataset,
        indices: Sequence[int] | None = None,
        permutation: Tensor | None = None,
        task_label: int | None = None,
    ) -> None:
        self.source = source if indices is None else Subset(source, list(indices))
        self.permutation = permutation
        self.task_label = task_label
        self.task: Task | None = None  # set by the Task that owns this dataset

    @property
    def targets(self) -> Tensor:
        return targets_of(self.source)

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.source[index]
        if self.permutation is None and self.task_label is None:
            return item
        x, y, *rest = item
        if self.permutation is not None:
            x = x.reshape(-1)[self.permutation].reshape(x.shape)
        if self.task_label is not None:
            rest = [torch.tensor(self.task_label), *rest]
        return (x, y, *rest)


@dataclass(eq=False)
class Task:
    """One task of a stream: its index, its classes, its train and test sets.

    ``label`` is the task label that travels in the batch (``(x, y, t)``) in task-incremental use.
    """

    index: int
    classes: tuple[int, ...]
    train: Dataset
    test: Dataset
    label: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.train, TaskDataset):
            self.train.task = self

    def train_dataloader(self, batch_size: int = 32, shuffle: bool = True, **kwargs: Any) -> DataLoader:
        """A DataLoader over the task's training set; methods read the task's metadata through it."""
        return DataLoader(self.train, batch_size=batch_size, shuffle=shuffle, **kwargs)

    def test_dataloader(self, batch_size: int = 256, **kwargs: Any) -> DataLoader:
        """A DataLoader over the task's test set, in order."""
        return DataLoader(self.test, batch_size=batch_size, shuffle=False, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Task(index={self.index}, classes={list(self.classes)}, train={len(self.train)}, "  # type: ignore[arg-type]
            f"test={len(self.test)})"  # type: ignore[arg-type]
        )


@dataclass(eq=False)
class TaskStream(Sequence[Task]):
    """An ordered sequence of tasks; iterate it and fit one task at a time.

    Attributes:
        tasks: the tasks in training order.
        scenario: ``"class-incremental"``, ``"task-incremental"`` or ``"domain-incremental"``.
        num_classes: the number of classes over the whole stream (the size of a single head).
    """

    tasks: list[Task]
    scenario: Scenario
    num_classes: int
    name: str = "stream"

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    @overload
    def __getitem__(self, index: int) -> Task: ...

    @overload
    def __getitem__(self, index: slice) -> "TaskStream": ...

    def __getitem__(self, index: int | slice) -> "Task | TaskStream":
        """A task, or for a slice the stream of those tasks (``stream[:2]``: the first two)."""
        if isinstance(index, slice):
            return TaskStream(self.tasks[index], self.scenario, self.num_classes, name=self.name)
        return self.tasks[index]

    @property
    def test_sets(self) -> list[Dataset]:
        """The test set of every task, in task order."""
        return [task.test for task in self.tasks]

    def seen(self, index: int) -> Dataset:
        """The union of the training sets of tasks ``0..index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"`index` must be in [0, {len(self) - 1}], got {index}.")
        return ConcatDataset([task.train for task in self.tasks[: index + 1]])

    def cumulative(self) -> "TaskStream":
        """The joint-training upper bound as a stream: task ``t`` trains on the union of tasks ``0..t``.

        Test sets, classes and indices are those of this stream, so its accuracy matrix is comparable.
        """
        tasks = [
            Task(
                task.index,
                task.classes,
                TaskDataset(self.seen(position)),
                task.test,
                task.label,
            )
            for position, task in enumerate(self.tasks)
        ]
        return TaskStream(tasks, self.scenario, self.num_classes, name=f"{self.name}-cumulative")


def split_classes(
    train: Dataset,
    test: Dataset,
    n_tasks: int,
    class_order: Sequence[int] | Literal["random"] | None = None,
    seed: int = 0,
    task_labels: bool = False,
) -> TaskStream:
    """Split a labelled dataset into ``n_tasks`` tasks of disjoint, equally many classes.

    Args:
        train: the training set; items ``(x, y, ...)``.
        test: the test set, same classes.
        n_tasks: how many tasks; must divide the number of classes.
        class_order: the order in which classes arrive: ``None`` for ascending (tasks ``(0, 1), (2, 3), …``),
            ``"random"`` for an order shuffled with ``seed``, or an explicit sequence of every class.
        seed: the seed of the ``"random"`` class order.
        task_labels: append the task index to every item, ``(x, y, t)``: task-incremental use.

    >>> x, y = torch.randn(40, 2), torch.arange(40) % 4
    >>> stream = split_classes(LabeledTensorDataset(x, y), LabeledTensorDataset(x, y), n_tasks=2)
    >>> [task.classes for task in stream], stream.scenario
    ([(0, 1), (2, 3)], 'class-incremental')
    """
    train_targets, test_targets = targets_of(train), targets_of(test)
    classes = sorted(set(train_targets.tolist()) | set(test_targets.tolist()))
    if class_order is None:
        order = classes
    elif isinstance(class_order, str):
        if class_order != "random":
            raise ValueError(f"`class_order` must be None, 'random' or a sequence of classes, got {class_order!r}.")
        generator = torch.Generator().manual_seed(seed)
        order = [classes[i] for i in torch.randperm(len(classes), generator=generator).tolist()]
    else:
        order = [int(c) for c in class_order]
        if sorted(order) != classes:
            raise ValueError(
                f"`class_order` must list every class of the dataset exactly once: the dataset has {classes}, "
                f"`class_order` is {order}."
            )
    if not 1 <= n_tasks <= len(classes):
        raise ValueError(
            f"`n_tasks={n_tasks}` is impossible with {len(classes)} classes: a task needs at least one class. "
            f"Use 1 <= n_tasks <= {len(classes)}."
        )
    if len(classes) % n_tasks:
        divisors = [d for d in range(1, len(classes) + 1) if len(classes) % d == 0]
        raise ValueError(
            f"{len(classes)} classes do not divide into `n_tasks={n_tasks}` equal tasks; use one of {divisors}."
        )
    per_task = len(classes) // n_tasks
    tasks = []
    for index in range(n_tasks):
        task_classes = tuple(order[index * per_task : (index + 1) * per_task])
        wanted = torch.tensor(task_classes)
        parts = []
        for name, source, targets in (("train", train, train_targets), ("test", test, test_targets)):
            indices = torch.nonzero(torch.isin(targets, wanted)).flatten().tolist()
            if not indices:
                raise ValueError(f"Task {index} (classes {list(task_classes)}) has no samples in the {name} set.")
            parts.append(TaskDataset(source, indices, task_label=index if task_labels else None))
        tasks.append(Task(index, task_classes, parts[0], parts[1], label=index if task_labels else None))
    scenario: Scenario = "task-incremental" if task_labels else "class-incremental"
    return TaskStream(tasks, scenario, num_classes=len(classes), name="split")


def permute_inputs(train: Dataset, test: Dataset, n_tasks: int, seed: int = 0) -> TaskStream:
    """Domain-incremental stream: task ``t > 0`` applies its own fixed permutation of the input features.

    Task 0 is the unpermuted data; every task holds every class.

    >>> x, y = torch.arange(12.0).reshape(3, 4), torch.tensor([0, 1, 0])
    >>> stream = permute_inputs(LabeledTensorDataset(x, y), LabeledTensorDataset(x, y), n_tasks=2)
    >>> stream[0].train[0][0].tolist(), sorted(stream[1].train[0][0].tolist())
    ([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0])
    """
    if n_tasks < 1:
        raise ValueError(f"`n_tasks` must be at least 1, got {n_tasks}.")
    if len(train) == 0 or len(test) == 0:  # type: ignore[arg-type]
        raise ValueError("`train` and `test` must not be empty.")
    classes = tuple(sorted(set(targets_of(train).tolist())))
    n_features = train[0][0].numel()
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for index in range(n_tasks):
        permutation = None if index == 0 else torch.randperm(n_features, generator=generator)
        tasks.append(
            Task(
                index,
                classes,
                TaskDataset(train, permutation=permutation),
                TaskDataset(test, permutation=permutation),
            )
        )
    return TaskStream(tasks, "domain-incremental", num_classes=len(classes), name="permuted")
