"""Updates as jobs: every fit from ``ckpt_path`` trains as documented or is refused with the fix, the task index comes
from the checkpoint (never from the user's DataModule), the evaluation matrix is built from the user's validation
dataloaders and spans jobs, and one method added to a user's Trainer carries the optimizer's state where it helps.

Each "job" here builds its model, DataModule, callbacks and Trainer anew, as a new process would; the example's
LightningCLI processes are run for real in ``test_jobs_cli.py``.
"""

import csv
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from harness import QUIET, run_like_torchrun, weights
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_incremental import (
    AGEM,
    EWC,
    MAS,
    ContinualEvaluation,
    ExperienceReplay,
    KeepOptimizerState,
    LwF,
    MLPClassifier,
    TaskCheckpoint,
    load_task_checkpoint,
)
from lightning_incremental.core import PROGRESS_KEY

N_FEATURES, N_CLASSES = 16, 6
CENTERS = torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(0)) * 3


def rows(task: int, split: int, n: int = 64) -> TensorDataset:
    """Task ``task``'s rows: classes ``2 task`` and ``2 task + 1``, around fixed centers."""
    generator = torch.Generator().manual_seed(100 * task + split)
    targets = 2 * task + torch.randint(0, 2, (n,), generator=generator)
    inputs = CENTERS[targets] + torch.randn(n, N_FEATURES, generator=generator)
    return TensorDataset(inputs, targets)


class UserData(L.LightningDataModule):
    """A user's DataModule: it keeps names of its own (``task``, ``task_id``, ``tasks``, ``stream``)."""

    def __init__(self, task: int) -> None:
        super().__init__()
        self.task, self.task_id, self.tasks, self.stream = task, task, [0, 1, 2], "the user's stream"

    def train_dataloader(self) -> DataLoader:
        return DataLoader(rows(self.task, 0), batch_size=16, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(rows(seen, 1), batch_size=32) for seen in range(self.task + 1)]


class UserModel(MLPClassifier):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__(N_FEATURES, N_CLASSES, hidden=(hidden,), lr=1e-2)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        inputs, targets = batch
        self.log("val_loss", F.cross_entropy(self(inputs), targets), add_dataloader_idx=True)


def job(task, callbacks, ckpt_path=None, model=None, epochs=2, **trainer_kwargs):
    """One update: a new model, DataModule and Trainer; ``fit`` from ``ckpt_path``. Returns the Trainer and model."""
    L.seed_everything(task, verbose=False)
    model = model if model is not None else UserModel()
    checkpointing = any(isinstance(callback, ModelCheckpoint) for callback in callbacks)
    settings = {**QUIET, "enable_checkpointing": checkpointing, **trainer_kwargs}
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, **settings)
    trainer.fit(model, datamodule=UserData(task), ckpt_path=ckpt_path)
    return trainer, model


def methods(folder: Path) -> list:
    return [EWC(), ExperienceReplay(buffer_size=32), ContinualEvaluation(num_classes=N_CLASSES), TaskCheckpoint(folder)]


def test_the_task_end_checkpoint_starts_the_next_task_with_every_method_state(tmp_path):
    first, _ = job(0, methods(tmp_path), epochs=5)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved[PROGRESS_KEY] == {"tasks_completed": 1, "task_in_progress": False}
    assert saved["callbacks"]["EWC"]["tasks_completed"] == 1  # the task end (EWC's Fisher) is in the file
    assert len(saved["callbacks"]["ExperienceReplay"]["shards"][0]["storage"][0]) == 32  # the rows stored at the end
    second, _ = job(1, methods(tmp_path), ckpt_path=tmp_path / "last.ckpt", epochs=5)
    ewc, replay, evaluation = second.callbacks[:3]
    assert second.global_step == 5 * 4  # 5 epochs of 64 rows in batches of 16: the new task trained in full
    assert (ewc.tasks_completed, ewc.current_task, replay.tasks_completed) == (2, 1, 2)
    assert [len(row) for row in evaluation.matrix] == [1, 2]
    assert evaluation.matrix[0] == first.callbacks[2].matrix[0]  # the first job's row came with the checkpoint
    assert min(evaluation.matrix[1]) > 0.9  # the new task learnt, the old one kept
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)[PROGRESS_KEY]["tasks_completed"] == 2


def test_a_checkpoint_saved_before_the_task_end_is_refused_before_any_step(tmp_path):
    epoch_end = ModelCheckpoint(tmp_path, save_last=True)  # Lightning's last.ckpt: the last epoch's end
    job(0, [EWC(), epoch_end])
    model = UserModel()
    model.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"])
    before = weights(model)
    with pytest.raises(RuntimeError, match=r"before its task end.*TaskCheckpoint"):
        job(1, [EWC()], ckpt_path=tmp_path / "last.ckpt", model=model)
    assert all(torch.equal(before[name], value) for name, value in weights(model).items())


def test_a_mid_task_checkpoint_resumes_the_task_and_ends_it_once(tmp_path):
    every_epoch = ModelCheckpoint(tmp_path, filename="{epoch}", save_top_k=-1)
    uninterrupted, _ = job(0, [EWC(), every_epoch], epochs=3)
    resumed, _ = job(0, [EWC()], ckpt_path=tmp_path / "epoch=0.ckpt", epochs=3)
    assert resumed.global_step == uninterrupted.global_step == 12
    assert resumed.callbacks[0].tasks_completed == 1
    assert resumed.callbacks[0].current_task == 0


def test_a_mid_task_checkpoint_refuses_a_method_that_was_not_in_its_fit(tmp_path):
    job(0, [EWC(), ModelCheckpoint(tmp_path, filename="{epoch}", save_top_k=-1)], epochs=3)
    with pytest.raises(RuntimeError, match=r"resumes task 0 in its middle.*no MAS"):
        job(0, [EWC(), MAS()], ckpt_path=tmp_path / "epoch=0.ckpt", epochs=3)


def test_a_method_added_at_a_later_update_joins_at_that_task(tmp_path):
    job(0, [EWC(), TaskCheckpoint(tmp_path)])
    second, _ = job(1, [EWC(), MAS(), TaskCheckpoint(tmp_path)], ckpt_path=tmp_path / "last.ckpt")
    ewc, mas = second.callbacks[:2]
    assert (mas.current_task, mas.tasks_completed) == (ewc.current_task, ewc.tasks_completed) == (1, 2)


def test_a_method_left_out_of_a_later_update_is_dropped_with_lightnings_warning(tmp_path):
    job(0, [EWC(), MAS(), TaskCheckpoint(tmp_path)])
    with pytest.warns(UserWarning, match="callbacks used to create the checkpoint"):
        second, _ = job(1, [EWC(), TaskCheckpoint(tmp_path)], ckpt_path=tmp_path / "last.ckpt")
    assert second.callbacks[0].tasks_completed == 2


def test_a_checkpoint_of_another_model_is_refused_before_any_step(tmp_path):
    job(0, [EWC(), TaskCheckpoint(tmp_path)])
    saved = (tmp_path / "last.ckpt").read_bytes()
    with pytest.raises(RuntimeError, match="size mismatch"):  # Lightning's strict load, before the loops start
        job(1, [EWC(), TaskCheckpoint(tmp_path)], ckpt_path=tmp_path / "last.ckpt", model=UserModel(hidden=8))
    assert (tmp_path / "last.ckpt").read_bytes() == saved  # the update to retry with the right model is intact


def test_a_finished_fit_without_methods_starts_the_first_task_from_its_weights(tmp_path):
    job(0, [ModelCheckpoint(tmp_path, save_last=True)])
    first, _ = job(1, [EWC()], ckpt_path=tmp_path / "last.ckpt")
    assert first.global_step == 8
    assert (first.callbacks[0].tasks_completed, first.callbacks[0].current_task) == (1, 0)


def test_the_evaluation_is_logged_to_the_users_logger_and_equals_the_accuracy_on_each_validation_set(tmp_path):
    evaluation = ContinualEvaluation(num_classes=N_CLASSES, evaluate_initial=False)
    trainer, model = job(1, [evaluation], logger=CSVLogger(tmp_path, name="job"))
    model.eval()
    with torch.no_grad():
        expected = [
            (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean().item()
            for data in (rows(0, 1), rows(1, 1))
        ]
    assert evaluation.matrix == [pytest.approx(expected, abs=1e-6)]
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
        logged = [row for row in csv.DictReader(file) if row.get("cl/acc")]
    assert float(logged[-1]["cl/acc_task_1"]) == pytest.approx(expected[1], abs=1e-6)


def test_the_evaluation_without_validation_data_is_refused_at_fit_start(tmp_path):
    with pytest.raises(ValueError, match=r"validation dataloaders.*has none"):
        job(0, [ContinualEvaluation(num_classes=N_CLASSES)], limit_val_batches=0)


def test_a_first_update_with_replay_does_not_warn_that_it_replayed_nothing(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job(0, [ExperienceReplay(buffer_size=16), TaskCheckpoint(tmp_path)])
    assert not [w for w in caught if "replayed nothing" in str(w.message)]
    with pytest.warns(UserWarning, match="replayed nothing"):
        job(0, [ExperienceReplay(buffer_size=16)])


def adam_steps(trainer) -> float:
    optimizer = trainer.optimizers[0]
    return max(state["step"].item() for state in optimizer.state.values())


@pytest.mark.parametrize(
    ("callbacks", "carried"),
    [
        (lambda: [LwF()], True),  # LwF's measured best: carried
        (lambda: [ExperienceReplay(buffer_size=16), AGEM()], False),  # A-GEM loses with it: it wins
        (lambda: [ExperienceReplay(buffer_size=16), AGEM(), KeepOptimizerState()], True),  # the user decides
        (lambda: [LwF(), KeepOptimizerState(carry=False)], False),
    ],
    ids=["lwf-alone", "against-wins", "keep-decides", "carry-false"],
)
def test_the_methods_carry_the_optimizer_state_where_it_helps_unless_the_user_decides(callbacks, carried):
    instances, model = callbacks(), UserModel()
    for task in range(2):
        trainer, _ = job(task, instances, model=model, epochs=1)
    assert adam_steps(trainer) == (8 if carried else 4)


def test_lwf_alone_trains_as_lwf_with_keep_optimizer_state(tmp_path):
    runs = []
    for callbacks in ([LwF()], [LwF(), KeepOptimizerState()]):
        L.seed_everything(0)
        model = UserModel()
        for task in range(3):
            job(task, callbacks, model=model, epochs=1)
        runs.append(weights(model))
    assert all(torch.allclose(runs[0][name], runs[1][name], atol=1e-6) for name in runs[0])


def test_the_optimizer_state_a_method_carries_travels_in_the_checkpoint(tmp_path):
    job(0, [LwF(), TaskCheckpoint(tmp_path)], epochs=1)
    second, _ = job(1, [LwF(), TaskCheckpoint(tmp_path)], ckpt_path=tmp_path / "last.ckpt", epochs=1)
    assert adam_steps(second) == 8


def test_load_task_checkpoint_refuses_a_checkpoint_saved_before_the_task_end(tmp_path):
    job(0, [EWC(), ModelCheckpoint(tmp_path, save_last=True)])
    with pytest.raises(ValueError, match="before its task end"):
        load_task_checkpoint(tmp_path / "last.ckpt", UserModel(), [EWC()])


def test_updates_under_ddp_start_the_next_task_on_every_rank_with_the_same_state(tmp_path):
    def worker(rank: int, out_dir: Path) -> None:
        for task in range(2):
            ckpt_path = out_dir / "last.ckpt" if task else None
            trainer, model = job(task, methods(out_dir), ckpt_path=ckpt_path, epochs=10, strategy="ddp", devices=2)
        ewc, replay, evaluation = trainer.callbacks[:3]
        progress = (ewc.tasks_completed, ewc.current_task, replay.tasks_completed)
        state = {"weights": model.state_dict(), "matrix": evaluation.matrix, "progress": progress}
        torch.save({**state, "rows": len(replay.buffer)}, out_dir / f"rank{rank}.pt")

    run_like_torchrun(worker, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert rank0["progress"] == rank1["progress"] == (2, 1, 2)
    assert all(torch.equal(rank0["weights"][name], rank1["weights"][name]) for name in rank0["weights"])
    assert rank0["matrix"] == rank1["matrix"] and [len(row) for row in rank0["matrix"]] == [1, 2]
    assert min(rank0["matrix"][1]) > 0.9
    assert rank0["rows"] + rank1["rows"] == 32  # one global buffer of 32 rows, a share per rank


def test_a_fresh_fit_beside_another_runs_task_end_is_refused_at_setup(tmp_path):
    job(0, [EWC(), TaskCheckpoint(tmp_path)])
    saved = (tmp_path / "last.ckpt").read_bytes()
    with pytest.raises(FileExistsError, match="ckpt_path="):
        job(0, [EWC(), TaskCheckpoint(tmp_path)])
    assert (tmp_path / "last.ckpt").read_bytes() == saved


def test_the_evaluation_refuses_fewer_validation_loaders_than_tasks_at_the_task_start(tmp_path):
    job(0, [ContinualEvaluation(num_classes=N_CLASSES), TaskCheckpoint(tmp_path)])
    job(1, [ContinualEvaluation(num_classes=N_CLASSES), TaskCheckpoint(tmp_path)], ckpt_path=tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=r"task 2 .* 2 validation dataloader"):  # task 1's data: 2 loaders
        job(1, [ContinualEvaluation(num_classes=N_CLASSES), TaskCheckpoint(tmp_path)], ckpt_path=tmp_path / "last.ckpt")
