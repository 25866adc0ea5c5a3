"""Data that ships with the installed packages: nothing here downloads anything."""

import gzip
import struct
from pathlib import Path
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


FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL_HINT = "apt-get install dataset-fashion-mnist"


def _read_idx(path: Path) -> torch.Tensor:
    """The uint8 array of a gzipped idx file (``idx1``: labels, ``idx3``: images), with its stored shape."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()}).")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    values = torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8)
    expected = 1
    for size in shape:
        expected *= size
    if values.numel() != expected:
        raise ValueError(f"{path} holds {values.numel()} values, its header says {shape} ({expected}).")
    return values.reshape(shape)


def _stratified_subsample(labels: torch.Tensor, size: int | None, generator: torch.Generator) -> torch.Tensor:
    """Ascending indices of ``size`` rows drawn at random, as evenly over the classes as they allow (all if None)."""
    if size is None:
        return torch.arange(len(labels))
    if not 0 < size <= len(labels):
        raise ValueError(f"A subsample size must be in [1, {len(labels)}], got {size}.")
    order = torch.randperm(len(labels), generator=generator)
    classes = labels.unique().tolist()
    by_class = {c: order[labels[order] == c] for c in classes}
    quota = {c: size // len(classes) + (rank < size % len(classes)) for rank, c in enumerate(classes)}
    for c in classes:
        if quota[c] > len(by_class[c]):
            raise ValueError(f"{size} rows spread evenly take {quota[c]} of class {c}, which has {len(by_class[c])}.")
    return torch.cat([by_class[c][: quota[c]] for c in classes]).sort().values


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_ROOT,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> tuple[LabeledTensorDataset, LabeledTensorDataset]:
    """Fashion-MNIST from the idx files of the Debian package ``dataset-fashion-mnist``: pixels / 255, flattened.

    As :func:`load_digits`, the inputs are float32 in [0, 1], one row of 784 features (28x28) per image, the labels
    0 … 9 (T-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot); 60,000 train and
    10,000 test images in full. ``train_size`` and ``test_size`` draw a subsample of each split, as evenly over the
    classes as it divides (``train_size=3000``: 300 per class), with ``seed``; the rows keep the files' order. The
    files are read from ``root`` (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``); nothing is downloaded, and
    missing files raise a ``FileNotFoundError`` that says how to install them.

    Example (needs the package; ``tests/test_fashion_mnist.py`` checks it)::

        train, test = load_fashion_mnist(train_size=3000, test_size=1000)
        len(train), len(test), tuple(train[0][0].shape)  # (3000, 1000, (784,))
    """
    root = Path(root)
    files = {
        (split, part): root / f"{prefix}-{part}-ubyte.gz"
        for split, prefix in (("train", "train"), ("test", "t10k"))
        for part in ("images-idx3", "labels-idx1")
    }
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed: {', '.join(missing)} missing. Install the Debian package with "
            f"`{FASHION_MNIST_INSTALL_HINT}` (it puts the idx files in {FASHION_MNIST_ROOT}), or pass `root=` the "
            "folder that holds them. Nothing is downloaded at run time."
        )
    generator = torch.Generator().manual_seed(seed)

    def split(name: str, size: int | None) -> LabeledTensorDataset:
        images, labels = _read_idx(files[name, "images-idx3"]), _read_idx(files[name, "labels-idx1"])
        if len(images) != len(labels):
            raise ValueError(f"The {name} split has {len(images)} images but {len(labels)} labels.")
        keep = _stratified_subsample(labels, size, generator)
        return LabeledTensorDataset(images[keep].reshape(len(keep), -1).float() / 255.0, labels[keep].long())

    return split("train", train_size), split("test", test_size)


def fashion_mnist_stream(
    kind: Literal["split", "permuted"] = "permuted",
    n_tasks: int = 5,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    subsample_seed: int = 0,
    task_labels: bool = False,
    root: str | Path = FASHION_MNIST_ROOT,
) -> TaskStream:
    """A stream of Fashion-MNIST (:func:`load_fashion_mnist`), built as :func:`digits_stream` builds the digits'.

    ``"permuted"``: all ten classes, task 0 unpermuted, tasks 1… a fixed random pixel permutation each, drawn with
    ``seed`` (domain-incremental). ``"split"``: classes (0, 1), (2, 3), … one pair per task (class-incremental, or
    task-incremental with ``task_labels=True``). The subsample (``train_size``, ``test_size``) is drawn with
    ``subsample_seed``, so that as on the digits the data stay fixed while ``seed`` changes the stream.
    """
    if kind not in ("split", "permuted"):
        raise ValueError(f"`kind` must be 'split' or 'permuted', got {kind!r}.")
    train, test = load_fashion_mnist(root, train_size, test_size, subsample_seed)
    if kind == "split":
        stream = split_classes(train, test, n_tasks=n_tasks, seed=seed, task_labels=task_labels)
    else:
        stream = permute_inputs(train, test, n_tasks=n_tasks, seed=seed)
    stream.name = f"fashion-mnist-{stream.name}"
    return stream
