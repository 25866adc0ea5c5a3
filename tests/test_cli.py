"""The command line: the main job's table, its files, and errors for unknown names."""

import csv
import json

import pytest

from lightning_incremental.cli import main


def test_main_job_on_split_digits_prints_and_writes_the_same_numbers(tmp_path, capsys):
    assert main(["--methods", "naive", "joint", "--output", str(tmp_path)]) == 0  # the reference protocol
    table = capsys.readouterr().out
    document = json.loads((tmp_path / "results.json").read_text())
    naive, joint = document["methods"]["naive"], document["methods"]["joint"]
    assert joint["acc"] >= 0.95  # the cumulative upper bound
    assert naive["bwt"] < -0.8 and naive["forgetting"] > 0.8  # fine-tuning forgets
    assert len(naive["matrix"]) == 5 and document["config"]["epochs"] == 10
    for name, entry in document["methods"].items():
        row = next(line for line in table.splitlines() if f" {name} " in line)
        for column in ("acc", "avg_incremental_acc", "bwt", "fwt", "forgetting"):
            assert f"{entry[column]:.4f}" in row
    with open(tmp_path / "results.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert float(rows["naive"]["acc"]) == naive["acc"] and float(rows["joint"]["bwt"]) == joint["bwt"]
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "heatmap_split_naive.png",
        "heatmap_split_joint.png",
        "average_accuracy_split.png",
    }
    assert (tmp_path / "logs" / "split-naive").is_dir()


def test_permuted_and_task_incremental_scenarios_run(tmp_path):
    for scenario in ("permuted", "split-task"):
        main(["--scenario", scenario, "--methods", "naive", "--epochs", "1", "--tasks", "5", "--output", str(tmp_path)])
        entry = json.loads((tmp_path / "results.json").read_text())["methods"]["naive"]
        assert entry["acc"] > 0.2 and len(entry["matrix"]) == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "naive", "ewcc"], "unknown method(s) 'ewcc'; choose from naive, joint"),
        (["--scenario", "rotated"], "unknown scenario 'rotated'; choose from split, split-task, permuted"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (
            ["--tasks", "3"],
            "--tasks 3: 10 classes do not divide into `n_tasks=3` equal tasks; use one of [1, 2, 5, 10]",
        ),
    ],
)
def test_unknown_names_and_bad_values_list_the_valid_choices(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
