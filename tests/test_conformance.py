"""The conformance suite: every registered method, on a 3-task stream with a tiny model, with the optimizer's
state carried across tasks where its catalog entry carries it (``MethodSpec.callbacks()``), must

- learn (the last task's accuracy far above chance) and keep a checkpoint-safe state;
- run under bf16-mixed and with gradient accumulation;
- run with 2 DDP processes, every rank ending with the same weights and the same method state;
- see tuple, list and dict batches as the same data (the same final weights for all three);
- resume from a checkpoint saved mid-way through the second task, in a new Trainer with new callback
  instances, and end with the weights and the accuracy matrix of the run that was never interrupted;
- the same from a checkpoint saved between the second and third task (``load_task_checkpoint``);
- run on a user's own DataModule and datasets whose attributes ``task``, ``task_id``, ``stream`` and ``tasks`` are the
  user's: never read, never changed, each fit counted as the next task.

A method joins by adding its ``MethodSpec`` to the catalog: nothing here names a method.
"""

import copy
import io
from pathlib import Path

import lightning as L
import pytest
import torch
from harness import (
    assert_same_state,
    assert_same_weights,
    run_like_torchrun,
    run_method,
    stream_for,
    tiny_model,
    train_loader,
    trainer,
    weights,
)
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_incremental import ContinualEvaluation, load_task_checkpoint
from lightning_incremental.catalog import registry

METHODS = list(registry().values())
LEARNT = 0.6  # "far above chance": the split stream has 6 classes, chance is 0.17


@pytest.fixture(params=METHODS, ids=[spec.name for spec in METHODS])
def spec(request):
    return request.param


def test_learns_each_task_and_keeps_a_safe_state(spec, split_stream):
    run = run_method(spec, split_stream)
    assert len(run.result.matrix) == 3
    diagonal = [run.result.matrix[t][t] for t in range(3)]
    assert min(diagonal) >= LEARNT, f"each task should be learnt right after training it: {diagonal}"
    assert all(0.0 <= acc <= 1.0 for row in run.result.matrix for acc in row)
    for callback in [*run.methods, run.evaluation]:
        buffer = io.BytesIO()
        torch.save(callback.state_dict(), buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)  # raises on anything but tensors, numbers, lists and dicts


@pytest.mark.parametrize(
    "trainer_kwargs",
    [{"precision": "bf16-mixed"}, {"accumulate_grad_batches": 2}],
    ids=["bf16-mixed", "accumulate-2"],
)
def test_precision_and_accumulation(spec, split_stream, trainer_kwargs):
    run = run_method(spec, split_stream, **trainer_kwargs)
    assert run.result.matrix[-1][-1] >= LEARNT
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_batch_structures_give_the_same_training(spec, split_stream):
    runs = {style: run_method(spec, split_stream, style=style) for style in ("list", "tuple", "dict")}
    for style in ("tuple", "dict"):
        assert_same_weights(weights(runs["list"].model), weights(runs[style].model), atol=1e-5)
        torch.testing.assert_close(runs[style].result.matrix, runs["list"].result.matrix, atol=1e-6, rtol=0)


def test_ddp_two_processes_agree(spec, split_stream, tmp_path):
    def worker(rank: int, out_dir: Path) -> None:
        model = tiny_model(split_stream)
        methods = spec.callbacks()
        evaluation = ContinualEvaluation(split_stream)
        for task in stream_for(spec, split_stream):
            fit = trainer(2, [*methods, evaluation], strategy="ddp", devices=2)
            fit.fit(model, train_loader(task))
        torch.save(
            {
                "weights": model.state_dict(),
                "matrix": evaluation.matrix,
                "methods": [callback.state_dict() for callback in methods],
            },
            out_dir / f"rank{rank}.pt",
        )

    run_like_torchrun(worker, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_weights(rank0["weights"], rank1["weights"], atol=0)
    assert rank0["matrix"] == rank1["matrix"]
    assert rank0["matrix"][-1][-1] >= LEARNT
    assert_same_state(rank0["methods"], rank1["methods"])


class _Crash(Callback):
    """Stops the fit with an exception at the start of the given epoch, as a killed job would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyError("simulated crash")


def test_resume_mid_task_matches_the_uninterrupted_run(spec, split_stream, tmp_path):
    uninterrupted = run_method(spec, split_stream)
    tasks = list(stream_for(spec, split_stream))
    # crash in task 1, where every method has state from task 0; closed-form heads train only on task 0 (later
    # fits end before their first step), so their only mid-task state is task 0's
    crashed = 0 if spec.family == "pretrained" else 1

    model = tiny_model(split_stream)
    methods, evaluation = spec.callbacks(), ContinualEvaluation(split_stream)
    for task in tasks[:crashed]:
        trainer(2, [*methods, evaluation]).fit(model, train_loader(task))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True)
    crashing = trainer(2, [*methods, evaluation, checkpoint, _Crash(epoch=1)], enable_checkpointing=True)
    with pytest.raises(KeyError, match="simulated crash"):
        crashing.fit(model, train_loader(tasks[crashed]))

    # a new process: a new model object, new callback instances, everything else from the checkpoint
    model = tiny_model(split_stream, seed=123)
    methods, evaluation = spec.callbacks(), ContinualEvaluation(split_stream)
    fits = [trainer(2, [*methods, evaluation]) for _ in tasks[crashed:]]
    fits[0].fit(model, train_loader(tasks[crashed]), ckpt_path=tmp_path / "epoch=0.ckpt")
    for fit, task in zip(fits[1:], tasks[crashed + 1 :], strict=True):
        fit.fit(model, train_loader(task))

    assert_same_weights(weights(uninterrupted.model), weights(model))
    assert evaluation.matrix == uninterrupted.result.matrix


def test_resume_between_tasks_matches_the_uninterrupted_run(spec, split_stream, tmp_path):
    uninterrupted = run_method(spec, split_stream)
    tasks = list(stream_for(spec, split_stream))

    model = tiny_model(split_stream)
    methods, evaluation = spec.callbacks(), ContinualEvaluation(split_stream)
    for task in tasks[:2]:
        fit = trainer(2, [*methods, evaluation])
        fit.fit(model, train_loader(task))
    fit.save_checkpoint(tmp_path / "after_task_1.ckpt")

    model = tiny_model(split_stream, seed=123)
    methods, evaluation = spec.callbacks(), ContinualEvaluation(split_stream)
    load_task_checkpoint(tmp_path / "after_task_1.ckpt", model, [*methods, evaluation])
    trainer(2, [*methods, evaluation]).fit(model, train_loader(tasks[2]))

    assert_same_weights(weights(uninterrupted.model), weights(model))
    assert evaluation.matrix == uninterrupted.result.matrix


USER_NAMES = ("task", "task_id", "stream", "tasks")


class _UserData(L.LightningDataModule):
    """A user's DataModule over a plain ``TensorDataset``: both keep names of their own that the library must not read
    (ints where the library once expected a task) nor change."""

    def __init__(self, rows: TensorDataset, number: int) -> None:
        super().__init__()
        self.task, self.task_id, self.stream, self.tasks = 7 + number, 40 + number, "the user's stream", [5, 3]
        self.rows = rows
        rows.task, rows.task_id, rows.stream, rows.tasks = 3 - number, 9, ["not", "a", "stream"], [2, 2]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=8, shuffle=False)


def test_a_user_datamodule_with_names_of_its_own_runs_as_tasks(spec, split_stream):
    model, methods = tiny_model(split_stream), spec.callbacks()
    for number, task in enumerate(list(stream_for(spec, split_stream))[:2]):
        rows = TensorDataset(*(torch.stack(column) for column in zip(*task.train, strict=True)))
        data = _UserData(rows, number)
        kept = [(o, n, getattr(o, n), copy.deepcopy(getattr(o, n))) for o in (data, rows) for n in USER_NAMES]
        trainer(2, methods).fit(model, datamodule=data)
        for owner, name, value, copied in kept:
            assert getattr(owner, name) is value and value == copied, (
                f"the user's {type(owner).__name__}.{name} changed"
            )

    # each fit of the user's data is the next task: two tasks done, the second (index 1) the current one
    assert [(method.tasks_completed, method.current_task) for method in methods] == [(2, 1)] * len(methods)
    inputs, targets = (torch.stack(column) for column in zip(*split_stream[1].test, strict=True))
    model.eval()
    with torch.no_grad():
        accuracy = (model(inputs).argmax(-1) == targets).float().mean().item()
    assert accuracy >= LEARNT, f"the last task should be learnt: accuracy {accuracy:.2f} on its test rows"
