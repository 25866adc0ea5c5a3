"""The class-incremental heads grow by class: a regression stream, float or multi-label targets, and class counts
or head classes that are not integers are refused with the fix, before any optimizer step, never truncated."""

import re

import numpy as np
import pytest
import torch
from harness import trainer
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from lightning_incremental import GrowHeads, IncrementalClassifier, MLPClassifier, MultiHeadClassifier
from lightning_incremental.scenarios import regression_stream

FIX = r"for real-valued \(regression\) targets use a fixed output layer such as nn\.Linear.*\(`y\.long\(\)`\)"


def test_grow_heads_refuses_a_regression_stream_in_setup_before_the_model_changes():
    stream = regression_stream(n_tasks=1)
    model = MLPClassifier(10, 0, hidden=(8,), head="incremental")
    fit = trainer(1, [GrowHeads()])
    with pytest.raises(
        ValueError, match=r"`GrowHeads` grows the heads to the task's classes, but task 0 has classes \[\]"
    ):
        fit.fit(model, stream[0].train_dataloader(batch_size=8))
    assert model.head.num_classes == 0 and fit.global_step == 0


@pytest.mark.parametrize(
    ("relabel", "described"),
    [
        (lambda y: y.float(), r"torch\.float32 of shape \[8\]"),  # class indices stored as floats, or regression
        (lambda y: F.one_hot(y, 6), r"torch\.int64 of shape \[8, 6\]"),  # multi-label (multi-hot) targets
    ],
    ids=["float", "multi-hot"],
)
def test_grow_heads_refuses_targets_that_are_not_class_labels_at_the_first_batch(split_stream, relabel, described):
    def collate(items):
        x, y = default_collate(items)
        return x, relabel(y)

    model = MLPClassifier(16, 0, hidden=(8,), head="incremental")
    backbone = model.net[0].weight.detach().clone()
    fit = trainer(1, [GrowHeads()])
    with pytest.raises(
        ValueError, match=rf"needs one integer class label per row, but the targets are {described}"
    ) as error:
        fit.fit(model, DataLoader(split_stream[0].train, batch_size=8, collate_fn=collate))
    assert re.search(FIX, str(error.value)) and "model_interface=ModelInterface(target_key=...)" in str(error.value)
    assert fit.global_step == 0  # no optimizer step was taken
    torch.testing.assert_close(model.net[0].weight, backbone, atol=0, rtol=0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: IncrementalClassifier(4, 2.5),
        lambda: IncrementalClassifier(4, 2).grow(3.0),
        lambda: IncrementalClassifier(4, True),
        lambda: MultiHeadClassifier(4, 6.0),
        lambda: MultiHeadClassifier(4, 6).add_head(0, [0.5, 1.5]),  # once truncated to classes [0, 1]
        lambda: MultiHeadClassifier(4, 6).add_head(0, torch.tensor([0.0, 1.0])),
    ],
    ids=["count", "grow", "bool", "multihead-count", "head-classes", "float-tensor-classes"],
)
def test_heads_refuse_class_counts_and_classes_that_are_not_integers(build):
    with pytest.raises(ValueError, match=f"(not integer class labels|must be a whole number of classes).*{FIX}"):
        build()


def test_heads_take_integer_classes_of_any_integer_type():
    head = IncrementalClassifier(4, np.int64(2))
    head.grow(torch.tensor(5))
    assert head.num_classes == 5 and isinstance(head.num_classes, int)
    multi = MultiHeadClassifier(4, 6)
    multi.add_head(0, torch.tensor([2, 3]))
    multi.add_head(1, np.array([4, 5]))
    assert [h.classes.tolist() for h in multi.heads.values()] == [[2, 3], [4, 5]]
