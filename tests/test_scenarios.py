"""Task streams: how datasets are cut into tasks, what a task carries, and the errors for bad requests."""

import pytest
import torch
from torch.utils.data import Dataset

from lightning_incremental.scenarios import (
    LabeledTensorDataset,
    digits_stream,
    load_digits,
    permute_inputs,
    regression_stream,
    split_classes,
    synthetic_stream,
    targets_of,
)


def labelled(n_classes: int = 6, per_class: int = 5) -> LabeledTensorDataset:
    labels = torch.arange(n_classes).repeat(per_class)
    return LabeledTensorDataset(torch.randn(len(labels), 4), labels)


def test_split_classes_gives_disjoint_class_groups_with_all_their_samples():
    data = labelled()
    stream = split_classes(data, data, n_tasks=3)
    assert [task.classes for task in stream] == [(0, 1), (2, 3), (4, 5)]
    assert [len(task.train) for task in stream] == [10, 10, 10]
    assert stream.num_classes == 6 and stream.scenario == "class-incremental"
    for task in stream:
        assert set(targets_of(task.train).tolist()) == set(task.classes)
        assert {int(task.test[i][1]) for i in range(len(task.test))} == set(task.classes)


def test_class_order_explicit_and_random_with_seed():
    data = labelled()
    assert split_classes(data, data, 2, class_order=[5, 4, 3, 2, 1, 0])[0].classes == (5, 4, 3)
    first = [task.classes for task in split_classes(data, data, 3, class_order="random", seed=1)]
    again = [task.classes for task in split_classes(data, data, 3, class_order="random", seed=1)]
    assert first == again and sorted(c for group in first for c in group) == [0, 1, 2, 3, 4, 5]
    assert first != [(0, 1), (2, 3), (4, 5)] or first != [
        task.classes for task in split_classes(data, data, 3, class_order="random", seed=2)
    ]


def test_task_labels_travel_in_the_items():
    data = labelled()
    stream = split_classes(data, data, n_tasks=3, task_labels=True)
    _x, y, t = stream[2].train[0]
    assert int(t) == 2 and int(y) in (4, 5) and stream.scenario == "task-incremental"
    batch = next(iter(stream[1].train_dataloader(batch_size=4)))
    assert len(batch) == 3 and batch[2].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_tasks": 7}, r"`n_tasks=7` is impossible with 6 classes"),
        ({"n_tasks": 4}, r"6 classes do not divide into `n_tasks=4` equal tasks; use one of \[1, 2, 3, 6\]"),
        ({"n_tasks": 0}, r"`n_tasks=0` is impossible"),
        ({"n_tasks": 2, "class_order": [0, 1, 2]}, r"`class_order` must list every class"),
        ({"n_tasks": 2, "class_order": "sorted"}, r"`class_order` must be None, 'random' or a sequence"),
    ],
)
def test_split_classes_rejects_impossible_requests(kwargs, message):
    data = labelled()
    with pytest.raises(ValueError, match=message):
        split_classes(data, data, **kwargs)


def test_a_task_without_test_samples_is_an_error():
    train, test = labelled(), LabeledTensorDataset(torch.randn(4, 4), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"Task 2 \(classes \[4, 5\]\) has no samples in the test set"):
        split_classes(train, test, n_tasks=3)


def test_labels_are_read_from_items_when_there_is_no_targets_attribute_and_unlabelled_data_is_refused():
    class Pairs(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(2), i % 2

    class Unlabelled(Pairs):
        def __getitem__(self, i):
            return torch.zeros(2)

    assert targets_of(Pairs()).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="its labels cannot be read"):
        split_classes(Unlabelled(), Unlabelled(), n_tasks=1)


def test_permute_inputs_keeps_task_zero_and_permutes_the_others_consistently():
    data = labelled()
    stream = permute_inputs(data, data, n_tasks=3, seed=0)
    assert stream.scenario == "domain-incremental" and all(task.classes == tuple(range(6)) for task in stream)
    x0, _ = stream[0].train[3]
    x1, _ = stream[1].train[3]
    x2, _ = stream[2].test[3]
    torch.testing.assert_close(x0, data[3][0])
    assert not torch.equal(x1, x0) and torch.equal(x1.sort().values, x0.sort().values)
    permutation = stream[1].train.permutation
    torch.testing.assert_close(stream[1].test[5][0], data[5][0][permutation])  # same permutation in test
    assert not torch.equal(stream[2].train.permutation, permutation) and x2.shape == x0.shape


def test_stream_exposes_test_sets_seen_union_and_the_cumulative_stream():
    stream = synthetic_stream(n_tasks=3)
    assert len(stream) == 3 and [t.index for t in stream] == [0, 1, 2] and stream[1] is list(stream)[1]
    assert [len(test) for test in stream.test_sets] == [64, 64, 64]
    assert len(stream.seen(1)) == 192
    cumulative = stream.cumulative()
    assert [len(task.train) for task in cumulative] == [96, 192, 288]
    assert cumulative[2].test is stream[2].test and cumulative[2].classes == stream[2].classes
    assert cumulative[2].train.task is cumulative[2]


def test_bundled_digits_follow_the_reference_protocol():
    train, test = load_digits()
    assert (len(train), len(test)) == (1437, 360)
    per_class = torch.bincount(torch.cat([train.targets, test.targets]))
    stratified = torch.bincount(test.targets) - 0.2 * per_class
    assert stratified.abs().max() < 1  # every class is split 80/20 up to rounding
    assert float(train.inputs.min()) >= 0.0 and float(train.inputs.max()) == 1.0
    split = digits_stream("split")
    assert [task.classes for task in split] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert sum(len(task.train) for task in split) == 1437
    with pytest.raises(ValueError, match="`scenario` must be 'split' or 'permuted'"):
        digits_stream("rotated")


def stacked(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(inputs), torch.stack(targets)


@pytest.mark.parametrize(
    "layout, expected_centres",
    [
        ("line", [0.0, 6.0, 12.0]),  # distance from the first centre, along one line
        ("diagonal", [-6.0, 0.0, 6.0]),  # signed position along the unit diagonal
    ],
)
def test_regression_stream_centres_the_tasks_where_its_layout_says(layout, expected_centres):
    stream = regression_stream(n_tasks=3, n_features=10, train_per_task=4000, shift=6.0, layout=layout)
    means = [stacked(task.train)[0].mean(0) for task in stream]
    if layout == "line":
        positions = [float((mean - means[0]).norm()) for mean in means]
    else:
        positions = [float(mean.sum() / 10**0.5) for mean in means]
    assert positions == pytest.approx(expected_centres, abs=0.2)


def test_regression_stream_spread_puts_every_centre_at_the_shift_from_the_origin():
    stream = regression_stream(n_tasks=4, train_per_task=4000, shift=8.0, layout="spread")
    norms = [float(stacked(task.train)[0].mean(0).norm()) for task in stream]
    assert norms == pytest.approx([8.0] * 4, abs=0.2)


def test_regression_stream_sines_target_is_the_sum_of_sines_plus_its_noise():
    stream = regression_stream(n_tasks=2, target="sines", noise=0.05, shift=8.0, layout="diagonal")
    x, y = stacked(stream[1].train)
    residual = y - torch.sin(x).sum(-1) / 10**0.5
    assert float(residual.std()) == pytest.approx(0.05, abs=0.01)


@pytest.mark.parametrize("kwargs, message", [({"layout": "circle"}, "`layout`"), ({"target": "cubic"}, "`target`")])
def test_regression_stream_refuses_an_unknown_layout_or_target(kwargs, message):
    with pytest.raises(ValueError, match=message):
        regression_stream(**kwargs)
