"""WeightMerging: the interpolation and the running average against hand-computed weights, BatchNorm buffers,
the first task, argument errors."""

import pytest
import torch
from harness import tiny_model, train_loader, trainer
from lightning.pytorch import Callback
from torch import nn

from lightning_incremental.methods.fusion import WeightMerging
from lightning_incremental.models import MLPClassifier


class TrainedWeights(Callback):
    """Placed before WeightMerging: records the weights at the end of every task, before the merge."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_end(self, trainer, pl_module) -> None:
        self.weights.append({name: t.detach().clone() for name, t in pl_module.state_dict().items()})


class BNClassifier(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(16, 6, hidden=(), lr=1e-2)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 6))


def _run(model: nn.Module, merge: WeightMerging, tasks) -> tuple[list[dict], list[dict]]:
    """The trained (pre-merge) and the final (merged) weights of every task."""
    trained, merged = TrainedWeights(), []
    for task in tasks:
        trainer(1, [trained, merge]).fit(model, train_loader(task))
        merged.append({name: t.detach().clone() for name, t in model.state_dict().items()})
    return trained.weights, merged


def test_the_first_task_keeps_its_trained_weights(split_stream):
    for mode in ("interpolate", "average"):
        trained, merged = _run(tiny_model(split_stream), WeightMerging(mode=mode), [split_stream[0]])
        assert all(torch.equal(merged[0][name], trained[0][name]) for name in trained[0]), mode


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.25])
def test_interpolation_matches_the_hand_computed_weights(split_stream, alpha):
    trained, merged = _run(tiny_model(split_stream), WeightMerging(alpha=alpha), list(split_stream)[:2])
    old, new = merged[0], trained[1]  # the weights at the start of task 1 and after training it
    for name in old:
        expected = (1 - alpha) * old[name].double() + alpha * new[name].double()
        if alpha in (0.0, 1.0):  # the endpoints are exact
            assert torch.equal(merged[1][name], old[name] if alpha == 0 else new[name]), name
        torch.testing.assert_close(merged[1][name].double(), expected, atol=1e-7, rtol=0)
        assert alpha in (0.0, 1.0) or not torch.equal(old[name], new[name])  # the merge had work to do


def test_the_running_average_is_the_mean_of_the_post_task_weights(split_stream):
    merge = WeightMerging(mode="average")
    trained, merged = _run(tiny_model(split_stream), merge, split_stream)
    for k in range(1, 4):
        for name in trained[0]:
            mean = torch.stack([trained[i][name].double() for i in range(k)]).mean(0)
            torch.testing.assert_close(merged[k - 1][name].double(), mean, atol=1e-6, rtol=0)
    assert merge.averaged_tasks == 3
    assert not torch.equal(merged[2]["net.0.weight"], trained[2]["net.0.weight"])


def test_batchnorm_statistics_are_merged_and_the_batch_count_is_the_new_one(split_stream):
    trained, merged = _run(BNClassifier(), WeightMerging(alpha=0.5), list(split_stream)[:2])
    for name in ("net.1.running_mean", "net.1.running_var", "net.1.weight"):
        torch.testing.assert_close(merged[1][name], (merged[0][name] + trained[1][name]) / 2, atol=1e-6, rtol=1e-6)
        assert not torch.equal(merged[1][name], trained[1][name])
    assert int(merged[0]["net.1.num_batches_tracked"]) == 12
    assert int(merged[1]["net.1.num_batches_tracked"]) == int(trained[1]["net.1.num_batches_tracked"]) == 24


def test_a_model_that_changes_shape_during_a_task_is_an_error(split_stream):
    class GrowHead(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            pl_module.net[2] = nn.Linear(32, 7)

    model, merge = tiny_model(split_stream), WeightMerging()
    trainer(1, [merge]).fit(model, train_loader(split_stream[0]))
    with pytest.raises(RuntimeError, match=r"tensors changed during the task \(net\.2\.bias, net\.2\.weight\)"):
        trainer(1, [GrowHead(), merge]).fit(model, train_loader(split_stream[1]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, r"`alpha` must be in \[0, 1\]"),
        ({"alpha": 1.5}, r"`alpha` must be in \[0, 1\]"),
        ({"alpha": float("nan")}, r"`alpha` must be in \[0, 1\]"),
        ({"mode": "mean"}, "`mode` must be 'interpolate' or 'average', got 'mean'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightMerging(**kwargs)
