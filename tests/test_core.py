"""The shared machinery, pinned down with dummy methods: task boundaries, the training-step chain,
gradient terms, logits capture, state keys and the state's way back from ddp_fork workers."""

import copy

import lightning as L
import pytest
import torch
from harness import QUIET, tiny_model, train_loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_incremental.core import (
    ContinualCallback,
    FeatureCapture,
    ModelInterface,
    add_to_loss,
    logits_producers,
    resolve_submodule,
    split_batch,
)
from lightning_incremental.models import MLPClassifier


class Recorder(ContinualCallback):
    """Records the boundaries it sees and the batches and outputs that pass through its wrapper."""

    def __init__(self, tag: str = "", log: list | None = None) -> None:
        super().__init__()
        self.tag, self.events = tag, log if log is not None else []
        self.starts: list[int] = []
        self.ends: list[int] = []

    def on_task_start(self, trainer, pl_module):
        self.starts.append(self.current_task)

    def on_task_end(self, trainer, pl_module):
        self.ends.append(self.current_task)

    def wrap_training_step(self, trainer, pl_module, batch, step):
        self.events.append(f"{self.tag}:in")
        output = step(batch)
        self.events.append(f"{self.tag}:out")
        return output

    def state_dict(self):
        return {**super().state_dict(), "starts": self.starts, "ends": self.ends}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.starts, self.ends = list(state_dict["starts"]), list(state_dict["ends"])


def test_task_boundaries_count_fits_or_read_the_stream(split_stream):
    model, recorder = tiny_model(split_stream), Recorder()
    for task in (split_stream[0], split_stream[1]):
        trainer(1, [recorder]).fit(model, train_loader(task))
    assert (recorder.starts, recorder.ends, recorder.tasks_completed) == ([0, 1], [0, 1], 2)

    counted, from_stream = Recorder(), Recorder()
    trainer(1, [counted, from_stream]).fit(model, split_stream[2].train_dataloader(batch_size=8))
    assert from_stream.current_task == 2  # the Task's dataloader carries its index
    plain = torch.utils.data.DataLoader(split_stream[2].train.source, batch_size=8)  # no Task behind it
    fresh = Recorder()
    trainer(1, [fresh]).fit(model, plain)
    assert fresh.current_task == 0


def test_wrappers_chain_in_callback_order_and_are_removed_after_fit(split_stream):
    model, log = tiny_model(split_stream), []
    trainer(1, [Recorder("a", log), Recorder("b", log)], limit_train_batches=1).fit(
        model, train_loader(split_stream[0])
    )
    assert log == ["a:in", "b:in", "b:out", "a:out"]
    assert "training_step" not in model.__dict__


def test_wrapper_is_removed_when_the_fit_crashes(split_stream):
    class Crash(Recorder):
        def wrap_training_step(self, trainer, pl_module, batch, step):
            raise RuntimeError("boom")

    model = tiny_model(split_stream)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(1, [Crash()]).fit(model, train_loader(split_stream[0]))
    assert "training_step" not in model.__dict__


class LossPenalty(ContinualCallback):
    """0.5 * c * ||theta||^2 written into the loss."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def wrap_training_step(self, trainer, pl_module, batch, step):
        penalty = 0.5 * self.c * sum((p**2).sum() for p in pl_module.parameters())
        return add_to_loss(step(batch), penalty)


class GradientPenalty(ContinualCallback):
    """The same penalty as a closed-form gradient term c * theta added before the optimizer step."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def add_gradient_terms(self, trainer, pl_module, params, grads, scale):
        torch._foreach_add_(grads, torch._foreach_mul(params, self.c * scale))


class SGDClassifier(MLPClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "trainer_kwargs",
    [{}, {"accumulate_grad_batches": 5}, {"gradient_clip_val": 0.05}, {"precision": "bf16-mixed"}],
    ids=["plain", "accumulate-5-partial-window", "clipping", "bf16-mixed"],
)
def test_gradient_term_equals_the_penalty_written_in_the_loss(split_stream, trainer_kwargs):
    # 96 samples / batch 8 = 12 batches per epoch: with accumulation 5 the last window has 2 batches
    results = []
    for method in (LossPenalty(0.3), GradientPenalty(0.3)):
        L.seed_everything(0, verbose=False)
        model = SGDClassifier(16, 6, hidden=(32,))
        trainer(2, [method], **trainer_kwargs).fit(model, train_loader(split_stream[0]))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(
        results[0], results[1], atol=1e-5 if not trainer_kwargs.get("precision") else 2e-3, rtol=0
    )
    assert not torch.equal(results[0], torch.zeros_like(results[0]))


def test_state_keys_are_distinct_and_restored_to_the_right_instance(split_stream, tmp_path):
    first, second = Recorder(), Recorder()
    assert first.state_key != second.state_key  # Lightning checks this when the Trainer is built
    model = tiny_model(split_stream)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    fit = trainer(1, [first, second, checkpoint], enable_checkpointing=True)
    fit.fit(model, train_loader(split_stream[0]))
    assert (first.state_key, second.state_key) == ("Recorder", "Recorder#1")
    first.starts.append(99)  # make the two states differ, then save
    fit.save_checkpoint(tmp_path / "saved.ckpt")

    restored_first, restored_second = Recorder(), Recorder()
    trainer(1, [restored_first, restored_second]).fit(
        tiny_model(split_stream), train_loader(split_stream[0]), ckpt_path=tmp_path / "saved.ckpt"
    )
    # the checkpoint was saved after the task ended, so the new fit starts the next task
    assert restored_first.starts == [0, 99, 0] and restored_second.starts == [0, 0]


def test_the_logits_module_and_the_classifier_layer_are_found_by_identity_and_failures_explained(split_stream):
    model = tiny_model(split_stream)
    batch = next(iter(train_loader(split_stream[0])))
    producers = logits_producers(model, batch, ModelInterface())
    # the outermost producer is the logits module, the innermost the classifier layer; no shape test involved
    assert [name for name, _, _ in producers] == ["net.2", "net"] and producers[0][2].shape == (8, 32)

    features, logits = FeatureCapture().forward(model, batch, ModelInterface())
    torch.testing.assert_close(logits, model(batch[0]))
    torch.testing.assert_close(features, model.net[1](model.net[0](batch[0])))

    with pytest.raises(ValueError, match=r"`logits_module='classifier'` is not a submodule.*'net.0'"):
        resolve_submodule(model, "classifier", "logits_module")

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Identity()

        def forward(self, x):
            return self.scale(x.sum(1)) + 1  # no submodule returns the model's output itself

    with pytest.raises(RuntimeError, match="Pass `logits_module=` naming one of"):
        logits_producers(Flat(), (torch.ones(8, 3), torch.zeros(8)), ModelInterface())


def test_batch_without_labels_gets_a_clear_error():
    with pytest.raises(ValueError, match="needs labelled batches"):
        split_batch([torch.zeros(4, 2)])
    with pytest.raises(KeyError, match=r"Pass `model_interface=ModelInterface\(target_key=...\)`"):
        split_batch({"x": torch.zeros(4, 2)})
    assert split_batch({"pixels": torch.zeros(1), "cls": torch.ones(1)}, "pixels", "cls")[1].item() == 1


class _HeavyRecorder(Recorder):
    """A state far larger than a pipe's 64 KiB buffer, built in the workers: a replay buffer's size."""

    def on_task_end(self, trainer, pl_module):
        super().on_task_end(trainer, pl_module)
        self.ballast = torch.full((100_000,), float(self.current_task))

    def state_dict(self):
        return {**super().state_dict(), "ballast": self.ballast}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.ballast = state_dict["ballast"]


def test_ddp_fork_carries_method_state_back_to_the_main_process(split_stream):
    model, recorder = tiny_model(split_stream), _HeavyRecorder()
    for task in split_stream:
        trainer(1, [recorder], strategy="ddp_fork", devices=2).fit(model, train_loader(task))
    assert recorder.tasks_completed == 3
    assert recorder.starts == [0, 1, 2] and recorder.ends == [0, 1, 2]
    assert recorder.ballast.shape == (100_000,) and recorder.ballast.unique().tolist() == [2.0]


def test_state_survives_deepcopy_free_of_the_wrapper(split_stream):
    model, recorder = tiny_model(split_stream), Recorder()
    trainer(1, [recorder], limit_train_batches=1).fit(model, train_loader(split_stream[0]))
    clone = copy.deepcopy(model)
    assert "training_step" not in clone.__dict__
    assert QUIET["logger"] is False


def test_a_reused_trainer_with_raised_max_epochs_runs_the_next_task(split_stream):
    from lightning_incremental import ContinualEvaluation

    model, recorder, evaluation = tiny_model(split_stream), Recorder(), ContinualEvaluation(split_stream)
    fit = trainer(1, [recorder, evaluation])
    for task in split_stream:
        fit.fit(model, train_loader(task))
        fit.fit_loop.max_epochs += 1
    assert recorder.starts == [0, 1, 2] and recorder.ends == [0, 1, 2]
    assert len(evaluation.matrix) == 3 and evaluation.matrix[2][2] >= 0.6
