"""Incremental updates as jobs (examples/incremental_jobs): three ``python main.py fit`` processes, each starting from
the ``last.ckpt`` the previous one left, train the same model as the same three tasks run in one process, and the
checkpoint carries the metric matrix and the task count across the processes."""

import csv
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "incremental_jobs"
CONFIG = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
TASKS = 3
EPOCHS, TRAIN_ROWS, BATCH = 3, 96, 16  # 3 epochs of 6 batches per update: seconds, and the old tasks measurably kept
TINY = ["--trainer.max_epochs", str(EPOCHS), "--data.max_train_rows", str(TRAIN_ROWS), "--data.batch_size", str(BATCH)]
METHODS = ("EWC", "ExperienceReplay", "ContinualEvaluation")


def load_example():
    spec = importlib.util.spec_from_file_location("incremental_jobs_main", EXAMPLE / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_update(task: int, workdir: Path) -> None:
    """One update as a scheduler runs it: ``python main.py fit --config config.yaml --data.task <task>``, from the
    last checkpoint after the first; relative paths of the config (checkpoints/, logs/) land in ``workdir``."""
    command = [sys.executable, str(EXAMPLE / "main.py"), "fit", "--config", str(EXAMPLE / "config.yaml")]
    command += ["--data.task", str(task), *TINY, "--trainer.enable_model_summary", "false"]
    if task > 0:
        command += ["--ckpt_path", str(workdir / "checkpoints" / "last.ckpt")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(EXAMPLE.parents[1])}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"update {task} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def instantiate(spec: dict):
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def run_in_one_process(workdir: Path):
    """The same three updates as one Python loop with the same callback instances: each update reseeds the global
    RNG as LightningCLI does, then builds a fresh model (drawing its initial weights, as the process does) that
    takes the weights of the last update, as Lightning's restore of ``--ckpt_path`` does."""
    example = load_example()
    callbacks = [
        instantiate(spec) for spec in CONFIG["trainer"]["callbacks"] if spec["class_path"].rsplit(".", 1)[1] in METHODS
    ]
    trainer_args = {key: value for key, value in CONFIG["trainer"].items() if key not in ("callbacks", "logger")}
    trainer_args.update(
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=workdir,
    )
    model = None
    for task in range(TASKS):
        L.seed_everything(CONFIG["seed_everything"], workers=True, verbose=False)
        fresh = example.DigitsClassifier(**CONFIG["model"])
        if model is not None:
            fresh.load_state_dict(model.state_dict())
        model = fresh
        data = example.DigitsUpdates(
            **{**CONFIG["data"], "task": task, "max_train_rows": TRAIN_ROWS, "batch_size": BATCH}
        )
        L.Trainer(**trainer_args, callbacks=callbacks).fit(model, datamodule=data)
    return model, callbacks[-1]


# the one-process run has no TaskCheckpoint, so its first fit says replay replayed nothing
@pytest.mark.filterwarnings("ignore:ExperienceReplay replayed nothing")
def test_three_update_processes_from_last_ckpt_train_as_one_process_and_carry_the_matrix(tmp_path):
    jobs, reference = tmp_path / "jobs", tmp_path / "one_process"
    jobs.mkdir()
    reference.mkdir()
    for task in range(TASKS):
        run_update(task, jobs)
    checkpoint = torch.load(jobs / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    model, evaluation = run_in_one_process(reference)

    # The weights after the third update are those of the one-process run.
    weights = model.state_dict()
    assert checkpoint["state_dict"].keys() == weights.keys()
    difference = max((checkpoint["state_dict"][name] - weights[name]).abs().max().item() for name in weights)
    assert difference < 1e-6, f"max abs weight difference {difference:.3e}"

    # Every method's state in the checkpoint counts three finished tasks, the last one task 2.
    for name in METHODS:
        assert checkpoint["callbacks"][name]["tasks_completed"] == TASKS, name
        assert checkpoint["callbacks"][name]["current_task"] == TASKS - 1, name

    # The matrix spans the three processes: row t evaluates the validation loaders of tasks 0..t.
    matrix = checkpoint["callbacks"]["ContinualEvaluation"]["matrices"]["acc"]
    assert [len(row) for row in matrix] == [1, 2, 3]
    assert matrix == evaluation.matrix
    assert all(0.0 <= value <= 1.0 for row in matrix for value in row)
    assert matrix[0][0] > 0.9  # the first update learned task 0
    # The replay buffer and EWC's state, carried by the checkpoint, keep tasks 0 and 1 after the third process
    # (0.948 and 0.787 measured; fine-tuning alone, the same runs without the methods, ends at 0.0 on both).
    assert matrix[2][0] > 0.5 and matrix[2][1] > 0.5

    # The last update logged its row to its own logger: cl/acc_task_<j> and their average cl/acc.
    with open(jobs / "logs" / "updates" / f"version_{TASKS - 1}" / "metrics.csv") as metrics_file:
        rows = [row for row in csv.DictReader(metrics_file) if row.get("cl/acc")]
    assert len(rows) == 1
    logged = [float(rows[0][f"cl/acc_task_{j}"]) for j in range(TASKS)]
    assert max(abs(value - expected) for value, expected in zip(logged, matrix[2], strict=True)) < 1e-6
    assert abs(float(rows[0]["cl/acc"]) - sum(matrix[2]) / TASKS) < 1e-6
