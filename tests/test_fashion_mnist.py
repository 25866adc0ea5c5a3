"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: read locally, subsampled deterministically, cut
into streams; a missing package is refused with the command that installs it."""

import gzip
import struct

import pytest
import torch

from lightning_incremental.scenarios import fashion_mnist_stream, load_fashion_mnist
from lightning_incremental.scenarios.datasets import FASHION_MNIST_ROOT

FILES = [f"{p}-{part}-ubyte.gz" for p in ("train", "t10k") for part in ("images-idx3", "labels-idx1")]
installed = pytest.mark.skipif(
    not all((FASHION_MNIST_ROOT / name).is_file() for name in FILES),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)


@installed
def test_the_full_splits_hold_60000_and_10000_flattened_images_in_the_unit_interval_with_6000_and_1000_per_class():
    train, test = load_fashion_mnist()
    assert tuple(train.inputs.shape) == (60000, 784) and tuple(test.inputs.shape) == (10000, 784)
    assert train.inputs.dtype == torch.float32 and train.targets.dtype == torch.int64
    assert float(train.inputs.min()) == 0.0 and float(train.inputs.max()) == 1.0
    assert train.targets.bincount().tolist() == [6000] * 10 and test.targets.bincount().tolist() == [1000] * 10


@installed
def test_a_subsample_is_class_balanced_and_the_same_for_the_same_seed():
    train, test = load_fashion_mnist(train_size=1005, test_size=200, seed=3)
    assert (len(train), len(test)) == (1005, 200)
    assert train.targets.bincount().tolist() == [101] * 5 + [100] * 5
    assert test.targets.bincount().tolist() == [20] * 10 and train.targets.unique().tolist() == list(range(10))
    again, _ = load_fashion_mnist(train_size=1005, test_size=200, seed=3)
    other, _ = load_fashion_mnist(train_size=1005, test_size=200, seed=4)
    assert torch.equal(train.inputs, again.inputs) and torch.equal(train.targets, again.targets)
    assert not torch.equal(train.inputs, other.inputs)


@installed
def test_the_permuted_stream_keeps_every_class_and_permutes_the_784_pixels_of_tasks_after_the_first():
    stream = fashion_mnist_stream("permuted", n_tasks=3, seed=0, train_size=500, test_size=100)
    assert (len(stream), stream.num_classes) == (3, 10)
    assert (stream.scenario, stream.name) == ("domain-incremental", "fashion-mnist-permuted")
    assert [(len(task.train), len(task.test)) for task in stream] == [(500, 100)] * 3
    first, second = stream[0].train[0][0], stream[1].train[0][0]
    assert first.shape == (784,) and not torch.equal(first, second)
    assert torch.equal(first.sort().values, second.sort().values)


@installed
def test_the_split_stream_holds_two_classes_a_task():
    stream = fashion_mnist_stream("split", n_tasks=5, train_size=1000, test_size=500)
    assert [task.classes for task in stream] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert [len(task.train) for task in stream] == [200] * 5 and stream.scenario == "class-incremental"


def test_a_missing_dataset_is_refused_with_the_command_that_installs_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(root=tmp_path)


def test_the_idx_files_are_read_with_their_stored_shape(tmp_path):
    images = torch.arange(2 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(2, 28, 28)
    for prefix, labels in (("train", [3, 7]), ("t10k", [9, 0])):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as file:
            file.write(struct.pack(">HBB3I", 0, 8, 3, 2, 28, 28) + images.numpy().tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as file:
            file.write(struct.pack(">HBBI", 0, 8, 1, 2) + bytes(labels))
    train, test = load_fashion_mnist(root=tmp_path)
    assert tuple(train.inputs.shape) == (2, 784) and tuple(test.inputs.shape) == (2, 784)
    assert train.targets.tolist() == [3, 7] and test.targets.tolist() == [9, 0]
    assert train.inputs[0, 255].item() == 1.0 and train.inputs[0, 1].item() == pytest.approx(1 / 255)
