"""The continual metrics against hand-computed matrices (higher- and lower-is-better), the result object, and
ContinualEvaluation measuring, logging and synchronising the metric matrix of any torchmetrics metric without
changing the training."""

import csv
import importlib
import importlib.abc
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from harness import QUIET, assert_same_weights, run_like_torchrun, tiny_model, train_loader, trainer
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset
from torch.utils.data._utils.collate import default_collate
from torchmetrics import MeanMetric, MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.functional.classification import multiclass_f1_score

from lightning_incremental import ContinualEvaluation, ContinualResult, MLPClassifier, fit_tasks, metrics
from lightning_incremental.scenarios import Task, TaskStream

# rows: after training task i; columns: evaluated on task j
R = torch.tensor(
    [
        [0.90, 0.20, 0.10, 0.30],
        [0.70, 0.80, 0.20, 0.10],
        [0.60, 0.75, 0.95, 0.40],
        [0.50, 0.70, 0.85, 0.90],
    ]
)
B = torch.tensor([0.10, 0.15, 0.05, 0.20])  # accuracies before any training

# a lower-is-better matrix (MSE); task 0's error improves after task 1 (0.10 -> 0.08), then rises to 0.40
E = torch.tensor(
    [
        [0.10, 0.90, 0.80, 0.70],
        [0.08, 0.05, 0.60, 0.90],
        [0.50, 0.20, 0.10, 0.40],
        [0.40, 0.25, 0.30, 0.05],
    ]
)
E_INITIAL = torch.tensor([1.00, 1.20, 0.90, 0.80])  # errors before any training


def test_metric_formulas_on_a_hand_computed_matrix():
    # average metric = mean of the last row
    assert metrics.average_metric(R).item() == pytest.approx((0.5 + 0.7 + 0.85 + 0.9) / 4)
    # average incremental metric: mean over i of mean(R[i, :i+1])
    expected_aia = (0.9 + (0.7 + 0.8) / 2 + (0.6 + 0.75 + 0.95) / 3 + (0.5 + 0.7 + 0.85 + 0.9) / 4) / 4
    assert metrics.average_incremental_metric(R).item() == pytest.approx(expected_aia)
    # BWT = mean_j<3 (R[3, j] - R[j, j]) = ((0.5-0.9) + (0.7-0.8) + (0.85-0.95)) / 3
    assert metrics.backward_transfer(R).item() == pytest.approx(-0.2)
    # FWT = mean_j>=1 (R[j-1, j] - b_j) = ((0.2-0.15) + (0.2-0.05) + (0.4-0.2)) / 3
    assert metrics.forward_transfer(R, B).item() == pytest.approx(0.4 / 3)
    # forgetting = mean_j<3 (max_{l<3} R[l, j] - R[3, j]) = ((0.9-0.5) + (0.8-0.7) + (0.95-0.85)) / 3
    assert metrics.forgetting(R).item() == pytest.approx(0.2)


def test_lower_is_better_metrics_read_negative_transfer_and_positive_forgetting_as_worse():
    # BWT = -mean_j<3 (E[3, j] - E[j, j]) = -((0.40-0.10) + (0.25-0.05) + (0.30-0.10)) / 3: the errors rose
    assert metrics.backward_transfer(E, higher_is_better=False).item() == pytest.approx(-0.7 / 3)
    # forgetting = mean_j<3 (E[3, j] - min_{j<=l<3} E[l, j]): task 0's lowest error is 0.08 (after task 1), not
    # its diagonal 0.10: ((0.40-0.08) + (0.25-0.05) + (0.30-0.10)) / 3
    assert metrics.forgetting(E, higher_is_better=False).item() == pytest.approx(0.72 / 3)
    # FWT = -mean_j>=1 (E[j-1, j] - b_j) = -((0.9-1.2) + (0.6-0.9) + (0.4-0.8)) / 3: lower than untrained errors
    assert metrics.forward_transfer(E, E_INITIAL, higher_is_better=False).item() == pytest.approx(1.0 / 3)
    # the average is the plain mean, whatever the direction
    assert metrics.average_metric(E).item() == pytest.approx((0.40 + 0.25 + 0.30 + 0.05) / 4)
    # lower-is-better E reads exactly as higher-is-better -E
    for function in (metrics.backward_transfer, metrics.forgetting):
        assert function(E, higher_is_better=False).item() == pytest.approx(function(-E).item())


def test_metrics_of_a_stream_in_progress_use_the_tasks_seen():
    partial = R[:2]  # two of four tasks trained
    assert metrics.average_metric(partial).item() == pytest.approx(0.75)
    assert metrics.backward_transfer(partial).item() == pytest.approx(-0.2)
    assert metrics.forgetting(partial).item() == pytest.approx(0.2)
    assert metrics.forward_transfer(partial, B).item() == pytest.approx(0.05)
    assert math.isnan(metrics.backward_transfer(R[:1]).item())
    assert math.isnan(metrics.forgetting(R[:1]).item())


def test_metrics_reject_malformed_matrices():
    with pytest.raises(ValueError, match="1 <= rows <= columns"):
        metrics.average_metric(torch.ones(3, 2))
    with pytest.raises(ValueError, match="one value per task"):
        metrics.forward_transfer(R, B[:3])


def test_result_summary_table_json_and_plot():
    result = ContinualResult(R.tolist(), B.tolist())
    summary = result.summary()
    assert list(summary) == ["acc", "avg_incremental_acc", "bwt", "fwt", "forgetting"]
    assert summary["bwt"] == pytest.approx(-0.2) and summary["fwt"] == pytest.approx(0.4 / 3, abs=1e-6)
    assert f"{summary['acc']:.4f}" in result.table() and "0.950" in result.table()
    loaded = ContinualResult.from_json(result.to_json())
    assert loaded == result and json.loads(result.to_json())["summary"] == summary
    figure = result.plot()
    assert isinstance(figure, Figure)
    torch.testing.assert_close(torch.tensor(figure.axes[0].images[0].get_array().data), R.double())
    assert figure.axes[0].images[0].get_clim() == (0.0, 1.0)
    assert math.isnan(ContinualResult(R.tolist()).summary()["fwt"])


def test_result_of_a_lower_is_better_metric_names_it_and_follows_its_direction():
    result = ContinualResult(E.tolist(), E_INITIAL.tolist(), metric="mse", higher_is_better=False)
    summary = result.summary()
    assert list(summary) == ["mse", "avg_incremental_mse", "bwt", "fwt", "forgetting"]
    assert summary["mse"] == pytest.approx(0.25) and summary["bwt"] == pytest.approx(-0.7 / 3, abs=1e-6)
    assert summary["forgetting"] == pytest.approx(0.72 / 3, abs=1e-6)
    assert "average mse" in result.table() and "mse (lower is better)" in result.table()
    loaded = ContinualResult.from_json(result.to_json())
    assert loaded == result and loaded.metric == "mse" and loaded.higher_is_better is False
    assert loaded.summary() == summary
    assert result.plot().axes[0].images[0].get_clim() == (0.0, 1.0)  # every error within [0, 1]
    image = ContinualResult((4 * E).tolist(), metric="mse", higher_is_better=False).plot().axes[0].images[0]
    assert image.get_clim() == pytest.approx((0.2, 3.6))  # errors above 1: the matrix's own range
    assert image.get_cmap().name == "viridis_r"  # the better (lower) values get the colour of high accuracy


def test_evaluation_records_initial_accuracy_a_row_per_task_and_logs_them_on_one_step_axis(split_stream, tmp_path):
    model, evaluation = tiny_model(split_stream), ContinualEvaluation(split_stream)
    logger = CSVLogger(tmp_path, name="run")  # one logger shared by the three tasks' Trainers
    for task in split_stream:
        trainer(2, [evaluation], logger=logger, log_every_n_steps=1).fit(model, train_loader(task))
    result = evaluation.result()
    assert len(result.initial) == 3 and len(result.matrix) == 3
    assert all(result.matrix[t][t] >= 0.6 for t in range(3))
    assert result.matrix[2][0] < result.matrix[0][0]  # naive fine-tuning forgets
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(steps)  # the training rows of later Trainers continue the axis instead of restarting
    cl_rows = [row for row in rows if row.get("cl/acc")]
    # 96 rows a task, batch 8, 2 epochs: 24 optimizer steps a task
    assert [int(row["step"]) for row in cl_rows] == [24, 48, 72]
    assert [int(row["cl/task"]) for row in cl_rows] == [0, 1, 2]
    assert evaluation.log_step == 72
    last_task_rows = [int(row["step"]) for row in rows if row.get("train_loss")][-24:]
    assert min(last_task_rows) >= 48 and max(last_task_rows) <= 72
    assert float(cl_rows[-1]["cl/acc"]) == pytest.approx(result.summary()["acc"], abs=1e-6)
    assert float(cl_rows[-1]["cl/bwt"]) == pytest.approx(result.summary()["bwt"], abs=1e-6)
    assert float(cl_rows[-1]["cl/acc_task_0"]) == pytest.approx(result.matrix[2][0], abs=1e-6)


def test_evaluation_does_not_change_the_training(split_stream):
    """A shuffled loader draws its seed from the global RNG at every ``iter``: evaluation passes must not."""

    def train(callbacks: list) -> dict[str, torch.Tensor]:
        model = tiny_model(split_stream)  # seeds the global RNG
        for task in list(split_stream)[:2]:
            trainer(1, callbacks).fit(model, task.train_dataloader(batch_size=8, shuffle=True))
        return {name: value.detach().clone() for name, value in model.state_dict().items()}

    evaluation = ContinualEvaluation(split_stream)
    assert_same_weights(train([evaluation]), train([]), atol=0.0)
    assert len(evaluation.matrix) == 2 and evaluation.initials is not None


def test_task_incremental_evaluation_masks_logits_to_the_task_classes(split_stream):
    model = tiny_model(split_stream)
    class_incremental, task_incremental = (
        ContinualEvaluation(split_stream),
        ContinualEvaluation(split_stream, task_incremental=True),
    )
    for task in split_stream:
        trainer(2, [class_incremental, task_incremental]).fit(model, train_loader(task))
    old_tasks_class_il = class_incremental.matrix[-1][:2]
    old_tasks_task_il = task_incremental.matrix[-1][:2]
    assert all(t >= c for t, c in zip(old_tasks_task_il, old_tasks_class_il, strict=True))
    assert sum(old_tasks_task_il) > sum(old_tasks_class_il) + 0.2
    assert task_incremental.matrix[-1][2] == pytest.approx(class_incremental.matrix[-1][2], abs=0.1)


def scores_collection(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
    )


def test_a_metric_collection_gives_one_matrix_per_metric_and_the_primary_drives_the_result(split_stream):
    model = tiny_model(split_stream)
    accuracy = ContinualEvaluation(split_stream)
    scores = ContinualEvaluation(split_stream, scores_collection(split_stream.num_classes), primary="f1")
    for task in list(split_stream)[:2]:
        trainer(1, [accuracy, scores]).fit(model, train_loader(task))
    assert set(scores.matrices) == {"acc", "f1"} and scores.matrix is scores.matrices["f1"]
    assert scores.matrices["acc"] == accuracy.matrix and scores.initials["acc"] == accuracy.result().initial
    model.eval()
    with torch.no_grad():
        test_sets = [default_collate([task.test[i] for i in range(len(task.test))]) for task in split_stream]
        expected = [multiclass_f1_score(model(x), y, num_classes=6).item() for x, y in test_sets]
    assert scores.matrices["f1"][-1] == pytest.approx(expected, abs=1e-6)
    result = scores.result()
    assert result.metric == "f1" and result.higher_is_better and result.matrix == scores.matrices["f1"]
    assert result.summary()["f1"] == pytest.approx(sum(expected[:2]) / 2, abs=1e-6)
    assert scores.results()["acc"].summary()["acc"] == accuracy.result().summary()["acc"]


def test_ddp_evaluation_of_a_collection_equals_single_process_evaluation(split_stream, tmp_path):
    model = tiny_model(split_stream)
    trainer(1).fit(model, train_loader(split_stream[0]))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    single = ContinualEvaluation(split_stream, scores_collection(split_stream.num_classes))
    trainer(1, [single], limit_train_batches=0).fit(model, train_loader(split_stream[1]))

    def worker(rank: int, out_dir: Path) -> None:
        replica = tiny_model(split_stream)
        replica.load_state_dict(torch.load(out_dir / "weights.pt", weights_only=True))
        evaluation = ContinualEvaluation(split_stream, scores_collection(split_stream.num_classes))
        trainer(1, [evaluation], limit_train_batches=0, strategy="ddp", devices=2).fit(
            replica, train_loader(split_stream[1])
        )
        torch.save(evaluation.matrices, out_dir / f"matrices{rank}.pt")

    run_like_torchrun(worker, tmp_path)
    for rank in (0, 1):
        # counts summed over both shards: macro F1 of the whole test sets, not a mean of the shards' F1
        assert torch.load(tmp_path / f"matrices{rank}.pt") == single.matrices


class Regressor(L.LightningModule):
    """The issue's model: 4 -> 16 -> 1 with ReLU, trained with MSE."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-2)


def regression_stream(num_classes: int = 0) -> TaskStream:
    """One target function, inputs around a different centre in each task (float targets of shape [N])."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(4, generator=generator)

    def sample(centre: float, n: int) -> TensorDataset:
        x = centre + 0.5 * torch.randn(n, 4, generator=generator)
        return TensorDataset(x, torch.sin(x) @ weights)

    tasks = [Task(t, (), sample(1.5 * t, 64), sample(1.5 * t, 32)) for t in range(3)]
    return TaskStream(tasks, "domain-incremental", num_classes=num_classes, name="regression")


def mse_on_every_task(model: nn.Module, stream: TaskStream) -> list[float]:
    with torch.no_grad():
        return [F.mse_loss(model(task.test.tensors[0]).squeeze(-1), task.test.tensors[1]).item() for task in stream]


def test_mse_matrix_of_a_regression_stream_with_lower_is_better_transfer(tmp_path):
    stream = regression_stream()
    L.seed_everything(0, verbose=False)
    model = Regressor()
    untrained = mse_on_every_task(model, stream)
    evaluation = ContinualEvaluation(stream, metric=MeanSquaredError())
    rows = []
    for task in stream:
        trainer(4, [evaluation]).fit(model, task.train_dataloader(batch_size=16, shuffle=False))
        rows.append(mse_on_every_task(model, stream))
    result = evaluation.result()
    assert result.metric == "MeanSquaredError" and result.higher_is_better is False
    assert result.initial == pytest.approx(untrained, rel=1e-5)
    for row, expected in zip(result.matrix, rows, strict=True):
        assert row == pytest.approx(expected, rel=1e-5)  # predictions [B, 1] squeezed onto the targets [B]
    assert all(result.matrix[t][t] < result.initial[t] for t in range(3))  # training lowered each task's error
    matrix = torch.tensor(result.matrix)
    summary = result.summary()
    assert summary["forgetting"] == pytest.approx(metrics.forgetting(matrix, higher_is_better=False).item(), abs=1e-6)
    drifted = [result.matrix[2][j] - min(result.matrix[row][j] for row in range(j, 2)) for j in range(2)]
    assert summary["forgetting"] == pytest.approx(sum(drifted) / 2, abs=1e-6)
    assert summary["bwt"] == pytest.approx(
        -sum(result.matrix[2][j] - result.matrix[j][j] for j in range(2)) / 2, abs=1e-6
    )
    assert summary["forgetting"] > 0 and summary["bwt"] < 0  # naive fine-tuning on a drifting stream forgets


def test_default_accuracy_on_a_regression_stream_names_the_fix_before_training():
    with pytest.raises(ValueError, match=r"metric=torchmetrics.MeanSquaredError\(\)"):
        ContinualEvaluation(regression_stream(num_classes=0))
    stream = regression_stream(num_classes=10)  # a stream that claims classes but holds float targets
    L.seed_everything(0, verbose=False)
    model = Regressor()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    for evaluate_initial in (True, False):
        evaluation = ContinualEvaluation(stream, evaluate_initial=evaluate_initial)
        with pytest.raises(ValueError, match=r"floating point .*metric=torchmetrics.MeanSquaredError\(\)"):
            trainer(1, [evaluation]).fit(model, stream[0].train_dataloader(batch_size=16))
        assert_same_weights(model.state_dict(), before, atol=0.0)  # it failed before the first step
        assert model.training


class TupleOutputClassifier(MLPClassifier):
    """A model whose forward returns ``(logits, features)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net[:-1](x.flatten(1))
        return self.net[-1](features), features


def test_predictions_come_from_the_model_interface_or_the_predict_hook(split_stream):
    def as_dicts(items: list) -> dict[str, torch.Tensor]:
        x, y = default_collate(items)
        return {"x": x, "y": y}

    plain = tiny_model(split_stream)
    tupled = TupleOutputClassifier(16, 6, hidden=(32,))
    tupled.load_state_dict(plain.state_dict())
    reference = ContinualEvaluation(split_stream, evaluate_initial=False)
    trainer(1, [reference], limit_train_batches=0).fit(plain, train_loader(split_stream[0]))
    from_dicts = ContinualEvaluation(split_stream, collate_fn=as_dicts, evaluate_initial=False)
    always_class_0 = ContinualEvaluation(
        split_stream, predict=lambda module, batch: F.one_hot(torch.zeros_like(batch[1]), 6).float()
    )
    trainer(1, [from_dicts, always_class_0], limit_train_batches=0).fit(tupled, train_loader(split_stream[0]))
    assert from_dicts.matrix == reference.matrix  # dict batches, logits read from (logits, features)
    class_0_share = (split_stream[0].test.targets == 0).float().mean().item()
    assert always_class_0.matrix == [[pytest.approx(class_0_share), 0.0, 0.0]]  # the metric got predict's output


class TokenTagger(L.LightningModule):
    """A Hugging Face-style token classifier: ``model(input_ids=..., attention_mask=...)`` with ``.logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.head = nn.Embedding(5, 8), nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.embedding(input_ids)) * attention_mask[..., None])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        return F.cross_entropy(logits.movedim(-1, 1), batch["labels"], ignore_index=-100)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_token_level_accuracy_of_a_hugging_face_style_model_skips_ignored_labels():
    generator = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 5, (12, 6), generator=generator), torch.randint(0, 3, (12, 6), generator=generator)
    labels[:, 4:] = -100  # padding
    rows = [{"input_ids": i, "attention_mask": torch.ones(6), "labels": y} for i, y in zip(ids, labels, strict=True)]
    stream = TaskStream([Task(0, (0, 1, 2), rows, rows)], "class-incremental", num_classes=3)
    L.seed_everything(0, verbose=False)
    model = TokenTagger()
    evaluation = ContinualEvaluation(stream, batch_size=5)
    trainer(1, [evaluation], limit_train_batches=0).fit(model, stream[0].train_dataloader(batch_size=4))
    with torch.no_grad():
        predicted = model(ids, torch.ones(12, 6)).logits.argmax(-1)
    kept = labels != -100
    expected = (predicted[kept] == labels[kept]).float().mean().item()
    assert evaluation.matrix == [[pytest.approx(expected)]] and evaluation.result().initial == [pytest.approx(expected)]


def test_fit_tasks_runs_the_loop_with_the_given_evaluation_last(split_stream):
    evaluation = ContinualEvaluation(split_stream)
    result = fit_tasks(
        tiny_model(split_stream),
        split_stream,
        callbacks=[evaluation],
        trainer_kwargs={**QUIET, "max_epochs": 2},
        batch_size=8,
    )
    assert result.matrix == evaluation.matrix and len(result.matrix) == 3
    assert min(result.matrix[t][t] for t in range(3)) >= 0.6
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        fit_tasks(tiny_model(split_stream), split_stream, batch_size=0)


def test_state_round_trip_and_a_state_of_other_metrics_is_refused(split_stream):
    evaluation = ContinualEvaluation(split_stream, scores_collection(6), primary="f1")
    evaluation.matrices = {"acc": [[0.9, 0.1, 0.0]], "f1": [[0.8, 0.1, 0.0]]}
    evaluation.initials, evaluation.log_step = {"acc": [0.2, 0.1, 0.3], "f1": [0.1, 0.1, 0.2]}, 24
    restored = ContinualEvaluation(split_stream, scores_collection(6), primary="f1")
    restored.load_state_dict(evaluation.state_dict())
    assert restored.results() == evaluation.results() and restored.log_step == 24
    with pytest.raises(ValueError, match=r"holds the matrices of \['acc', 'f1'\].*measures \['acc'\]"):
        ContinualEvaluation(split_stream).load_state_dict(evaluation.state_dict())


def test_evaluation_rejects_bad_arguments(split_stream):
    with pytest.raises(TypeError, match="`stream` must be a TaskStream"):
        ContinualEvaluation([1, 2])
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        ContinualEvaluation(split_stream, batch_size=0)
    with pytest.raises(TypeError, match="`metric` must be a torchmetrics Metric or MetricCollection"):
        ContinualEvaluation(split_stream, metric="accuracy")
    with pytest.raises(ValueError, match=r"`primary` must name one of the metrics \['acc', 'f1'\], got 'auc'"):
        ContinualEvaluation(split_stream, scores_collection(6), primary="auc")
    with pytest.raises(ValueError, match=r"'MeanMetric' \(MeanMetric\) does not say whether higher is better"):
        ContinualEvaluation(split_stream, metric=MeanMetric())  # an aggregate: its direction is not known
    with pytest.raises(TypeError, match="`predict` must be a callable"):
        ContinualEvaluation(split_stream, predict="nearest-mean")
    with pytest.raises(TypeError, match=r"`model_interface` must be a lightning_incremental\.ModelInterface"):
        ContinualEvaluation(split_stream, model_interface=lambda batch: batch)
    with pytest.raises(ValueError, match="`metric` must be one of"):
        ContinualEvaluation(split_stream).result("f1")


def test_importing_the_package_loads_no_plotting_library():
    """The package is imported again with matplotlib refused; lightning and torchmetrics stay imported (torchmetrics
    imports matplotlib itself whenever it is installed), so only the package's own imports are tested."""

    class RefuseMatplotlib(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name.partition(".")[0] == "matplotlib":
                raise ImportError(f"{name} was imported")

    def ours(name: str) -> bool:
        return name.partition(".")[0] in ("matplotlib", "lightning_incremental")

    saved = dict(sys.modules)
    finder = RefuseMatplotlib()
    for name in [name for name in sys.modules if ours(name)]:
        del sys.modules[name]
    sys.meta_path.insert(0, finder)
    try:
        package = importlib.import_module("lightning_incremental")
        assert package.ContinualEvaluation is not ContinualEvaluation  # really imported again
        assert not any(name.partition(".")[0] == "matplotlib" for name in sys.modules)
    finally:
        sys.meta_path.remove(finder)
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
