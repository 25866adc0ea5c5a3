"""Task streams (scenarios) and the bundled data they are built from."""

from lightning_incremental.scenarios.datasets import (
    digits_stream,
    fashion_mnist_stream,
    load_digits,
    load_fashion_mnist,
    regression_stream,
    synthetic_stream,
)
from lightning_incremental.scenarios.stream import (
    LabeledTensorDataset,
    Task,
    TaskDataset,
    TaskStream,
    permute_inputs,
    split_classes,
    targets_of,
)

__all__ = [
    "LabeledTensorDataset",
    "Task",
    "TaskDataset",
    "TaskStream",
    "digits_stream",
    "fashion_mnist_stream",
    "load_digits",
    "load_fashion_mnist",
    "permute_inputs",
    "regression_stream",
    "split_classes",
    "synthetic_stream",
    "targets_of",
]
