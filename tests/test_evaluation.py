"""The continual metrics against hand-computed matrices, the result object, and ContinualEvaluation
measuring, logging and synchronising the accuracy matrix."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from harness import QUIET, run_like_torchrun, tiny_model, train_loader, trainer
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure

from lightning_incremental import ContinualEvaluation, ContinualResult, fit_tasks, metrics

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


def test_metric_formulas_on_a_hand_computed_matrix():
    # ACC = mean of the last row
    assert metrics.average_accuracy(R).item() == pytest.approx((0.5 + 0.7 + 0.85 + 0.9) / 4)
    # average incremental accuracy: mean over i of mean(R[i, :i+1])
    expected_aia = (0.9 + (0.7 + 0.8) / 2 + (0.6 + 0.75 + 0.95) / 3 + (0.5 + 0.7 + 0.85 + 0.9) / 4) / 4
    assert metrics.average_incremental_accuracy(R).item() == pytest.approx(expected_aia)
    # BWT = mean_j<3 (R[3, j] - R[j, j]) = ((0.5-0.9) + (0.7-0.8) + (0.85-0.95)) / 3
    assert metrics.backward_transfer(R).item() == pytest.approx(-0.2)
    # FWT = mean_j>=1 (R[j-1, j] - b_j) = ((0.2-0.15) + (0.2-0.05) + (0.4-0.2)) / 3
    assert metrics.forward_transfer(R, B).item() == pytest.approx(0.4 / 3)
    # forgetting = mean_j<3 (max_{l<3} R[l, j] - R[3, j]) = ((0.9-0.5) + (0.8-0.7) + (0.95-0.85)) / 3
    assert metrics.forgetting(R).item() == pytest.approx(0.2)


def test_metrics_of_a_stream_in_progress_use_the_tasks_seen():
    partial = R[:2]  # two of four tasks trained
    assert metrics.average_accuracy(partial).item() == pytest.approx(0.75)
    assert metrics.backward_transfer(partial).item() == pytest.approx(-0.2)
    assert metrics.forgetting(partial).item() == pytest.approx(0.2)
    assert metrics.forward_transfer(partial, B).item() == pytest.approx(0.05)
    assert math.isnan(metrics.backward_transfer(R[:1]).item())
    assert math.isnan(metrics.forgetting(R[:1]).item())


def test_metrics_reject_malformed_matrices():
    with pytest.raises(ValueError, match="1 <= rows <= columns"):
        metrics.average_accuracy(torch.ones(3, 2))
    with pytest.raises(ValueError, match="one accuracy per task"):
        metrics.forward_transfer(R, B[:3])


def test_result_summary_table_json_and_plot():
    result = ContinualResult(R.tolist(), B.tolist())
    summary = result.summary()
    assert summary["bwt"] == pytest.approx(-0.2) and summary["fwt"] == pytest.approx(0.4 / 3, abs=1e-6)
    assert f"{summary['acc']:.4f}" in result.table() and "0.950" in result.table()
    loaded = ContinualResult.from_json(result.to_json())
    assert loaded.matrix == result.matrix and json.loads(result.to_json())["summary"] == summary
    figure = result.plot()
    assert isinstance(figure, Figure)
    torch.testing.assert_close(torch.tensor(figure.axes[0].images[0].get_array().data), R.double())
    assert math.isnan(ContinualResult(R.tolist()).summary()["fwt"])


def test_evaluation_records_initial_accuracy_a_row_per_task_and_logs_them(split_stream, tmp_path):
    model, evaluation = tiny_model(split_stream), ContinualEvaluation(split_stream)
    logger = CSVLogger(tmp_path, name="run")
    for task in split_stream:
        trainer(2, [evaluation], logger=logger).fit(model, train_loader(task))
    result = evaluation.result()
    assert len(result.initial) == 3 and len(result.matrix) == 3
    assert all(result.matrix[t][t] >= 0.6 for t in range(3))
    assert result.matrix[2][0] < result.matrix[0][0]  # naive fine-tuning forgets
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("cl/acc")]
    assert [int(row["step"]) for row in rows] == [0, 1, 2]
    assert float(rows[-1]["cl/acc"]) == pytest.approx(result.summary()["acc"], abs=1e-6)
    assert float(rows[-1]["cl/bwt"]) == pytest.approx(result.summary()["bwt"], abs=1e-6)
    assert float(rows[-1]["cl/acc_task_0"]) == pytest.approx(result.matrix[2][0], abs=1e-6)


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


def test_ddp_evaluation_equals_single_process_evaluation(split_stream, tmp_path):
    model = tiny_model(split_stream)
    trainer(1).fit(model, train_loader(split_stream[0]))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    single = ContinualEvaluation(split_stream)
    trainer(1, [single], limit_train_batches=0).fit(model, train_loader(split_stream[1]))

    def worker(rank: int, out_dir: Path) -> None:
        replica = tiny_model(split_stream)
        replica.load_state_dict(torch.load(out_dir / "weights.pt", weights_only=True))
        evaluation = ContinualEvaluation(split_stream)
        trainer(1, [evaluation], limit_train_batches=0, strategy="ddp", devices=2).fit(
            replica, train_loader(split_stream[1])
        )
        torch.save(evaluation.matrix, out_dir / f"matrix{rank}.pt")

    run_like_torchrun(worker, tmp_path)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"matrix{rank}.pt") == single.matrix  # counts summed over both shards


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


def test_evaluation_rejects_bad_arguments(split_stream):
    with pytest.raises(TypeError, match="`stream` must be a TaskStream"):
        ContinualEvaluation([1, 2])
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        ContinualEvaluation(split_stream, batch_size=0)
