"""KeepOptimizerState: the optimizer's state carried from one task (one fit) to the next."""

import copy
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from harness import trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from lightning_incremental import MLPClassifier, fit_tasks, load_task_checkpoint
from lightning_incremental.core import grow_param_state
from lightning_incremental.heads import GrowHeads
from lightning_incremental.optimizer_state import KeepOptimizerState
from lightning_incremental.scenarios import synthetic_stream

STEPS = 4  # optimizer steps per task: 32 rows, batch 8


class Net(L.LightningModule):
    """16 -> 8 -> classes; the optimizer class, its learning rate and an epoch StepLR chosen per task."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
        self.head = nn.Linear(8, classes)
        self.optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam
        self.lr = 1e-2
        self.trainable_only = False  # give the optimizer only the parameters with requires_grad
        self.step_lr = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad] if self.trainable_only else self.parameters()
        optimizer = self.optimizer_class(params, lr=self.lr)
        if not self.step_lr:
            return optimizer
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


class TwoOptimizers(Net):
    """Manual optimization with one optimizer for the body and one for the head (or one for all)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.split = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        for optimizer in optimizers:
            optimizer.step()

    def configure_optimizers(self):
        if not self.split:
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return [torch.optim.Adam(self.body.parameters(), lr=self.lr), torch.optim.Adam(self.head.parameters())]


class Probe(L.Callback):
    """Copies of the first optimizer's state by parameter name: at the start, after the first step, at the end."""

    def __init__(self) -> None:
        self.at: dict[str, dict[str, dict]] = {}

    def _record(self, key: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        self.at[key] = {
            name: copy.deepcopy(dict(optimizer.state[p]))
            for name, p in pl_module.named_parameters()
            if optimizer.state[p]
        }
        self.at[key + " lr"] = optimizer.param_groups[0]["lr"]

    def on_train_start(self, trainer, pl_module):
        self._record("start", trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            self._record("first step", trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._record("end", trainer, pl_module)


def data(seed: int, classes: range = range(4), rows: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(list(classes)).repeat(rows // len(classes))
    return TensorDataset(torch.randn(rows, 16, generator=generator), labels)


def loader(dataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def fit(model, dataset, callbacks=(), epochs: int = 1, **kwargs) -> L.Trainer:
    fitted = trainer(epochs, callbacks, **kwargs)
    fitted.fit(model, loader(dataset))
    return fitted


def net(seed: int = 0) -> Net:
    L.seed_everything(seed, verbose=False)
    return Net()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- the carried state
def test_adam_continues_from_the_last_task_as_in_one_long_fit():
    two_tasks, keep, probe = net(), KeepOptimizerState(), Probe()
    fit(two_tasks, data(1), [keep])
    fit(two_tasks, data(2), [keep, probe])
    one_fit, long_probe = net(), Probe()
    fit(one_fit, ConcatDataset([data(1), data(2)]), [long_probe])

    after_first = probe.at["first step"]["body.0.weight"]
    assert after_first["step"].item() == STEPS + 1
    torch.testing.assert_close(after_first["exp_avg"], _state_after_step(STEPS + 1)["exp_avg"], atol=0, rtol=0)
    for name, p in weights(one_fit).items():  # the two tasks are the long fit, bit for bit
        torch.testing.assert_close(weights(two_tasks)[name], p, atol=0, rtol=0)
    assert probe.at["end"]["head.weight"]["step"].item() == long_probe.at["end"]["head.weight"]["step"].item() == 8


def _state_after_step(step: int) -> dict[str, torch.Tensor]:
    """Adam's state of ``body.0.weight`` after ``step`` steps of one fit over both tasks' data."""
    model, recorded = net(), {}

    class AtStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == step:
                recorded.update(copy.deepcopy(trainer.optimizers[0].state[pl_module.body[0].weight]))

    fit(model, ConcatDataset([data(1), data(2)]), [AtStep()])
    return recorded


@pytest.mark.parametrize("keep", [True, False])
def test_fit_tasks_carries_the_state_by_default_and_not_when_told(keep):
    stream, probe = synthetic_stream(n_tasks=2, train_per_class=16), Probe()
    model = MLPClassifier(16, stream.num_classes, hidden=(8,))
    quiet = {"max_epochs": 1, "logger": False, "enable_progress_bar": False, "enable_checkpointing": False}
    fit_tasks(model, stream, [probe], trainer_kwargs=quiet, batch_size=8, keep_optimizer_state=keep)
    steps_per_task = 2 * 16 // 8  # two classes of 16 rows, batches of 8
    assert probe.at["first step"]["net.0.weight"]["step"].item() == (steps_per_task + 1 if keep else 1)


def test_fit_tasks_uses_the_callers_own_keep_optimizer_state():
    stream, keep = synthetic_stream(n_tasks=2, train_per_class=16), KeepOptimizerState()
    quiet = {"max_epochs": 1, "logger": False, "enable_progress_bar": False, "enable_checkpointing": False}
    fit_tasks(MLPClassifier(16, stream.num_classes, hidden=(8,)), stream, [keep], trainer_kwargs=quiet, batch_size=8)
    assert keep.optimizers and keep.optimizers[0]["params"]["net.0.weight"]["state"]["step"].item() == 8


def test_without_the_callback_adam_restarts_at_every_task():
    model, probe = net(), Probe()
    fit(model, data(1))
    fit(model, data(2), [probe])
    assert probe.at["first step"]["body.0.weight"]["step"].item() == 1


def test_the_new_optimizers_hyperparameters_are_kept():
    model, keep, probe = net(), KeepOptimizerState(), Probe()
    fit(model, data(1), [keep])
    model.lr = 0.5
    fit(model, data(2), [keep, probe])
    assert probe.at["start lr"] == 0.5
    assert probe.at["start"]["body.0.weight"]["step"].item() == STEPS


def test_sgd_momentum_is_carried():
    model, keep, probe = net(), KeepOptimizerState(), Probe()
    model.optimizer_class = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)
    end_of_first = Probe()
    fit(model, data(1), [keep, end_of_first])
    fit(model, data(2), [keep, probe])
    torch.testing.assert_close(
        probe.at["start"]["head.weight"]["momentum_buffer"], end_of_first.at["end"]["head.weight"]["momentum_buffer"]
    )
    assert probe.at["start"]["head.weight"]["momentum_buffer"].abs().sum() > 0


def test_a_grown_head_gets_its_old_state_padded_and_new_rows_start_at_zero():
    stream = synthetic_stream(n_tasks=2)  # classes (0, 1) then (2, 3); 96 rows a task, 6 steps of 16
    L.seed_everything(0, verbose=False)
    model, keep, first, second = (
        MLPClassifier(16, 0, hidden=(8,), head="incremental"),
        KeepOptimizerState(),
        Probe(),
        Probe(),
    )
    for task, probe in zip(stream, (first, second), strict=True):
        trainer(1, [GrowHeads(), keep, probe]).fit(model, task.train_dataloader(batch_size=16, shuffle=False))
    old, grown = first.at["end"]["net.2.weight"], second.at["start"]["net.2.weight"]
    assert grown["exp_avg"].shape == (4, 8) and grown["step"].item() == 6
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(grown[key][:2], old[key], atol=0, rtol=0)
        assert grown[key][2:].abs().sum().item() == 0.0
    torch.testing.assert_close(
        second.at["start"]["net.2.bias"]["exp_avg"][:2], first.at["end"]["net.2.bias"]["exp_avg"]
    )
    assert second.at["end"]["net.2.weight"]["exp_avg"][2:].abs().sum() > 0  # the new rows trained from there


def test_grow_param_state_pads_moments_and_keeps_the_step():
    state = {"step": torch.tensor(5.0), "exp_avg": torch.full((2, 3), 2.0), "exp_avg_sq": torch.full((2, 3), 4.0)}
    grown = grow_param_state(state, torch.Size([2, 3]), torch.Size([4, 3]))
    assert grown["step"].item() == 5.0
    assert grown["exp_avg"].sum().item() == 12.0 and grown["exp_avg_sq"][2:].abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="cannot pad the optimizer state 'row_var'"):
        grow_param_state({"row_var": torch.ones(2, 1)}, torch.Size([2, 3]), torch.Size([4, 3]))


@pytest.mark.parametrize("trainable_only", [True, False], ids=["absent-from-optimizer", "requires-grad-false"])
def test_frozen_parameters_are_left_alone_and_get_their_state_back(trainable_only):
    model, keep, first, frozen, back = net(), KeepOptimizerState(), Probe(), Probe(), Probe()
    model.trainable_only = trainable_only
    fit(model, data(1), [keep, first])
    model.body.requires_grad_(False)
    fit(model, data(2), [keep, frozen])
    assert "body.0.weight" not in frozen.at["end"] and frozen.at["end"]["head.weight"]["step"].item() == 2 * STEPS
    kept = keep.optimizers[0]["params"]["body.0.weight"]["state"]
    torch.testing.assert_close(kept["exp_avg"], first.at["end"]["body.0.weight"]["exp_avg"], atol=0, rtol=0)
    model.body.requires_grad_(True)
    fit(model, data(3), [keep, back])
    assert back.at["start"]["body.0.weight"]["step"].item() == STEPS  # task 1's, untouched by task 2
    torch.testing.assert_close(
        back.at["start"]["body.0.weight"]["exp_avg_sq"], first.at["end"]["body.0.weight"]["exp_avg_sq"]
    )
    assert back.at["start"]["head.weight"]["step"].item() == 2 * STEPS


def test_a_renamed_parameter_keeps_its_state_by_identity():
    model, keep, first, second = net(), KeepOptimizerState(), Probe(), Probe()
    fit(model, data(1), [keep, first])
    model.body = nn.Sequential(model.body)  # the same parameters, now named body.0.0.*
    fit(model, data(2), [keep, second])
    assert second.at["start"]["body.0.0.weight"]["step"].item() == STEPS
    torch.testing.assert_close(
        second.at["start"]["body.0.0.weight"]["exp_avg"], first.at["end"]["body.0.weight"]["exp_avg"]
    )
    assert set(keep.optimizers[0]["params"]) == {"body.0.0.weight", "body.0.0.bias", "head.weight", "head.bias"}


# ---------------------------------------------------------------------------------------------- schedulers
@pytest.mark.parametrize("schedulers", [True, False])
def test_the_scheduler_continues_only_when_asked(schedulers):
    model, keep, probe = net(), KeepOptimizerState(schedulers=schedulers), Probe()
    model.step_lr = True  # halves the lr at every epoch end
    fit(model, data(1), [keep], epochs=2)
    second = fit(model, data(2), [keep, probe], epochs=2)
    assert probe.at["start"]["head.weight"]["step"].item() == 2 * STEPS  # Adam's state is carried either way
    scheduler = second.lr_scheduler_configs[0].scheduler
    if schedulers:
        assert probe.at["start lr"] == pytest.approx(1e-2 / 4) and scheduler.last_epoch == 4
        assert second.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 / 16)
    else:
        assert probe.at["start lr"] == pytest.approx(1e-2) and scheduler.last_epoch == 2
        assert second.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_between_tasks_carries_the_state_to_a_new_process(tmp_path):
    model, keep = net(), KeepOptimizerState()
    first = fit(model, data(1), [keep])
    path = tmp_path / "after_task_0.ckpt"
    first.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"]["KeepOptimizerState"]
    assert set(state["optimizers"][0]["params"]) == {"body.0.weight", "body.0.bias", "head.weight", "head.bias"}

    restored_model, restored = Net(), KeepOptimizerState()
    load_task_checkpoint(path, restored_model, [restored])
    fit(model, data(2), [keep])
    probe = Probe()
    fit(restored_model, data(2), [restored, probe])
    assert probe.at["first step"]["body.0.weight"]["step"].item() == STEPS + 1
    for name, p in weights(model).items():
        torch.testing.assert_close(weights(restored_model)[name], p, atol=0, rtol=0)


def test_a_fit_resumed_mid_task_ends_as_the_uninterrupted_one(tmp_path):
    model, keep = net(), KeepOptimizerState()
    fit(model, data(1), [keep])
    before_second = copy.deepcopy(model)
    every_epoch = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(model, data(2), [keep, every_epoch], epochs=2, enable_checkpointing=True)
    fit(model, data(3), [keep])

    resumed, resumed_keep = before_second, KeepOptimizerState()  # a new process: state from the checkpoint
    trainer(2, [resumed_keep]).fit(resumed, loader(data(2)), ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    probe = Probe()
    fit(resumed, data(3), [resumed_keep, probe])
    assert probe.at["start"]["body.0.weight"]["step"].item() == 3 * STEPS
    for name, p in weights(model).items():
        torch.testing.assert_close(weights(resumed)[name], p, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_carries_the_same_state_as_one_process_with_the_whole_batch(tmp_path):
    ddp_model, ddp_keep = net(), KeepOptimizerState()
    for seed in (1, 2):  # each rank: 16 rows in 2 steps of 8
        trainer(1, [ddp_keep, _SaveState(tmp_path)], strategy="ddp_fork", devices=2).fit(ddp_model, loader(data(seed)))
    # Lightning's DistributedSampler shuffles training data (seed PL_GLOBAL_SEED + epoch) and deals the order to
    # the ranks in turn: step k of the two ranks together is rows order[16k : 16k + 16], one batch of 16
    order = torch.randperm(32, generator=torch.Generator().manual_seed(int(os.environ["PL_GLOBAL_SEED"]))).tolist()
    one_model, one_keep = net(), KeepOptimizerState()
    for seed in (1, 2):
        trainer(1, [one_keep]).fit(one_model, DataLoader(data(seed), batch_size=16, sampler=order))

    for rank in (0, 1):  # every rank started task 2 from the carried state, and they agree
        started = torch.load(tmp_path / f"rank{rank}_task1.pt", weights_only=True)
        assert started["body.0.weight"]["step"].item() == 2
        torch.testing.assert_close(started, torch.load(tmp_path / "rank0_task1.pt", weights_only=True), atol=0, rtol=0)
    carried = ddp_keep.optimizers[0]["params"]  # came back from the workers to this process
    expected = one_keep.optimizers[0]["params"]
    for name in expected:
        assert carried[name]["state"]["step"].item() == 4
        torch.testing.assert_close(
            carried[name]["state"]["exp_avg"], expected[name]["state"]["exp_avg"], atol=1e-6, rtol=1e-5
        )


class _SaveState(L.Callback):
    """Every rank writes its optimizer state at the start of every task after the first."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_start(self, trainer, pl_module):
        optimizer, names = trainer.optimizers[0], dict(pl_module.named_parameters())
        state = {name: dict(optimizer.state[p]) for name, p in names.items() if optimizer.state[p]}
        if state:
            torch.save(state, self.directory / f"rank{trainer.global_rank}_task1.pt")


# ---------------------------------------------------------------------------------------------- bad input
def test_schedulers_must_be_a_bool():
    with pytest.raises(TypeError, match="`schedulers` must be True or False"):
        KeepOptimizerState(schedulers="yes")


def test_a_different_optimizer_class_is_refused_until_reset():
    model, keep = net(), KeepOptimizerState()
    fit(model, data(1), [keep])
    model.optimizer_class = torch.optim.SGD
    with pytest.raises(
        ValueError, match=r"Optimizer 0 is torch.optim.sgd.SGD in this task but was torch.optim.adam.Adam.*`reset\(\)`"
    ):
        fit(model, data(2), [keep])
    keep.reset()
    fit(model, data(2), [keep])
    assert keep.optimizers[0]["type"] == "torch.optim.sgd.SGD"


def test_a_shape_that_changed_without_growing_is_refused_until_reset():
    model, keep = net(), KeepOptimizerState()
    fit(model, data(1), [keep])
    model.head = nn.Linear(8, 3)  # fewer classes: not a growth
    with pytest.raises(ValueError, match=r"'head.weight' had shape \(4, 8\).*has \(3, 8\).*reset\('head.weight'\)"):
        fit(model, data(2, classes=range(3), rows=30), [keep])
    keep.reset("head.weight", "head.bias")
    probe = Probe()
    fit(model, data(2, classes=range(3), rows=30), [keep, probe])
    assert probe.at["start"]["body.0.weight"]["step"].item() == STEPS and "head.weight" not in probe.at["start"]


def test_a_grown_parameter_whose_state_cannot_be_padded_is_refused():
    model, keep = net(), KeepOptimizerState()
    model.optimizer_class = torch.optim.Adafactor  # factored second moments: (rows, 1) and (1, columns)
    fit(model, data(1), [keep])
    model.head = nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"'head.weight' grew, but .*'row_var'.*reset\('head.weight'\)"):
        fit(model, data(2, classes=range(6), rows=36), [keep])


def test_a_different_number_of_optimizers_is_refused():
    model, keep = TwoOptimizers(), KeepOptimizerState()
    fit(model, data(1), [keep])
    assert [sorted(entry["params"]) for entry in keep.optimizers] == [
        ["body.0.bias", "body.0.weight"],
        ["head.bias", "head.weight"],
    ]
    model.split = False
    with pytest.raises(ValueError, match=r"state of 2 optimizer\(s\).*returned 1 now.*same order"):
        fit(model, data(2), [keep])


def test_a_parameter_outside_the_module_is_refused():
    model, keep = net(), KeepOptimizerState()
    stray = nn.Parameter(torch.zeros(3))
    model.optimizer_class = lambda params, lr: torch.optim.Adam([*params, stray], lr=lr)
    with pytest.raises(ValueError, match=r"parameter of shape \(3,\) that is not a parameter of Net.*Register it"):
        fit(model, data(1), [keep])


def test_a_different_number_of_schedulers_is_refused_when_they_are_carried():
    model, keep = net(), KeepOptimizerState(schedulers=True)
    model.step_lr = True
    fit(model, data(1), [keep])
    model.step_lr = False
    with pytest.raises(ValueError, match=r"carries 1 LR scheduler\(s\).*returned 0 now.*schedulers=False"):
        fit(model, data(2), [keep])


def test_reset_of_an_unknown_name_lists_the_carried_ones():
    model, keep = net(), KeepOptimizerState()
    fit(model, data(1), [keep])
    with pytest.raises(ValueError, match=r"No carried optimizer state for \['head.wieght'\].*'head.weight'"):
        keep.reset("head.wieght")
