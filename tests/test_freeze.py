"""FreezeLayers: the frozen part stays bit-identical, gets no optimizer state, is frozen before the optimizer is
built, from the right task on; BatchNorm in the frozen part; resume; composition; argument errors."""

import re

import pytest
import torch
from harness import tiny_model, train_loader, trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_incremental.methods.distillation import LwF
from lightning_incremental.methods.partial import FreezeLayers
from lightning_incremental.methods.regularization import EWC
from lightning_incremental.models import MLPClassifier


def _plain_loader(task) -> DataLoader:
    """The task's data in a DataLoader that carries no Task: methods can only count fits."""
    return DataLoader([task.train[i] for i in range(len(task.train))], batch_size=8)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


class BNClassifier(MLPClassifier):
    """Linear, BatchNorm, ReLU, Linear: layers ``net.0``, ``net.1``, ``net.3``."""

    def __init__(self) -> None:
        super().__init__(16, 6, hidden=(), lr=1e-2)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 6))


class FilteringClassifier(MLPClassifier):
    """An optimizer over the parameters that require grad, as BaseFinetuning asks; records what it saw."""

    def __init__(self) -> None:
        super().__init__(16, 6, hidden=(32,), lr=1e-2)
        self.optimized: list[list[str]] = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        self.optimized.append([name for name, _ in trainable])
        return torch.optim.Adam([p for _, p in trainable], lr=self.lr)


@pytest.mark.parametrize("companions", [[], [EWC(lambda_=50.0)], [LwF()]], ids=["alone", "with-ewc", "with-lwf"])
def test_training_only_the_head_keeps_a_pretrained_backbone_bit_identical(split_stream, companions):
    model = tiny_model(split_stream)
    methods = [FreezeLayers(train=["net.2.*"], from_task=1), *companions]
    trainer(2, methods).fit(model, train_loader(split_stream[0]))
    pretrained = _weights(model)
    trainer(2, methods).fit(model, train_loader(split_stream[1]))
    after = _weights(model)
    for name in ("net.0.weight", "net.0.bias"):
        assert torch.equal(after[name], pretrained[name]), name
    for name in ("net.2.weight", "net.2.bias"):
        assert (after[name] - pretrained[name]).abs().max() > 1e-3, name
    assert all(p.requires_grad for p in model.parameters())  # teardown gave requires_grad back


def test_frozen_parameters_get_no_optimizer_state(split_stream):
    model = tiny_model(split_stream)  # its configure_optimizers passes all self.parameters() to Adam
    freeze = FreezeLayers(train_last=1, from_task=1)
    trainer(1, [freeze]).fit(model, train_loader(split_stream[0]))
    fit = trainer(1, [freeze])
    fit.fit(model, train_loader(split_stream[1]))
    optimizer = fit.optimizers[0]
    assert sum(len(group["params"]) for group in optimizer.param_groups) == 4  # every parameter is in it
    assert {id(p) for p in optimizer.state} == {id(model.net[2].weight), id(model.net[2].bias)}
    assert int(optimizer.state[model.net[2].weight]["step"]) == 24  # 96 samples / batch 8, both tasks: carried


def test_parameters_are_frozen_before_configure_optimizers(split_stream):
    model = FilteringClassifier()
    freeze = FreezeLayers(freeze=["net.0.*"], from_task=1)
    for task in list(split_stream)[:2]:
        trainer(1, [freeze]).fit(model, train_loader(task))
    assert model.optimized == [
        ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"],
        ["net.2.weight", "net.2.bias"],
    ]


def test_the_freeze_applies_from_task_from_task_on(split_stream):
    model = tiny_model(split_stream)
    freeze = FreezeLayers(freeze_first=1, from_task=2)
    changed = []
    for task in split_stream:
        before = model.net[0].weight.detach().clone()
        trainer(1, [freeze]).fit(model, train_loader(task))
        changed.append(not torch.equal(model.net[0].weight, before))
    assert changed == [True, True, False]


def test_the_task_index_comes_from_counting_fits_without_a_stream(split_stream):
    model, freeze = tiny_model(split_stream), FreezeLayers(freeze_first=1, from_task=1)
    changed = []
    for task in list(split_stream)[:2]:
        before = model.net[0].weight.detach().clone()
        trainer(1, [freeze]).fit(model, _plain_loader(task))
        changed.append(not torch.equal(model.net[0].weight, before))
    assert changed == [True, False]


@pytest.mark.parametrize("train_bn", [False, True])
def test_batchnorm_in_the_frozen_part(split_stream, train_bn):
    model = BNClassifier()
    freeze = FreezeLayers(freeze_first=2, from_task=1, train_bn=train_bn)  # net.0 and the BatchNorm net.1
    trainer(1, [freeze]).fit(model, train_loader(split_stream[0]))
    pretrained = _weights(model)
    trainer(1, [freeze]).fit(model, train_loader(split_stream[1]))
    after = _weights(model)
    assert torch.equal(after["net.0.weight"], pretrained["net.0.weight"])
    bn_state = ["net.1.weight", "net.1.bias", "net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"]
    unchanged = [torch.equal(after[name], pretrained[name]) for name in bn_state]
    assert unchanged == [not train_bn] * 5
    assert model.net[1].training  # its mode is given back at teardown


def test_selection_by_pattern_regex_type_and_position():
    model = BNClassifier()
    assert FreezeLayers.layers(model) == ["net.0", "net.1", "net.3"]
    assert FreezeLayers(freeze=re.compile(r"net\.[03]\.weight")).frozen_names(model) == ["net.0.weight", "net.3.weight"]
    assert FreezeLayers(freeze="*.bias").frozen_names(model) == ["net.0.bias", "net.1.bias", "net.3.bias"]
    assert FreezeLayers(freeze_modules=nn.Linear).frozen_names(model) == [
        "net.0.weight",
        "net.0.bias",
        "net.3.weight",
        "net.3.bias",
    ]
    # net.0 and net.1 frozen: the BatchNorm is frozen by default (train_bn=False), trains with train_bn=True
    assert FreezeLayers(train_last=1, train_bn=True).frozen_names(model) == ["net.0.weight", "net.0.bias"]
    assert FreezeLayers(train=["net.3.*"], train_bn=False).frozen_names(model) == [
        "net.0.weight",
        "net.0.bias",
        "net.1.weight",
        "net.1.bias",
    ]


class _Crash(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise KeyError("simulated crash")


def test_resume_mid_task_without_a_stream_freezes_before_the_optimizer_is_restored(split_stream, tmp_path):
    """Plain DataLoaders: only the checkpoint knows that task 1 is under way; a filtering optimizer must match."""
    loaders = [_plain_loader(task) for task in split_stream]

    def fresh() -> tuple[FilteringClassifier, FreezeLayers]:
        torch.manual_seed(0)
        return FilteringClassifier(), FreezeLayers(train_last=1, from_task=1)

    model, freeze = fresh()
    for loader in loaders[:2]:
        trainer(2, [freeze]).fit(model, loader)
    uninterrupted = _weights(model)

    model, freeze = fresh()
    trainer(2, [freeze]).fit(model, loaders[0])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True)
    with pytest.raises(KeyError, match="simulated crash"):
        trainer(2, [freeze, checkpoint, _Crash()], enable_checkpointing=True).fit(model, loaders[1])
    assert all(p.requires_grad for p in model.parameters())  # released on the exception

    model, freeze = fresh()
    trainer(2, [freeze]).fit(model, loaders[1], ckpt_path=tmp_path / "epoch=0.ckpt")
    assert model.optimized[-1] == ["net.2.weight", "net.2.bias"]
    resumed = _weights(model)
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"freeze": ["net.0.*"], "from_task": -1}, ValueError, "`from_task` must be an integer >= 0"),
        ({"freeze_first": -2}, ValueError, "`freeze_first` must be an integer >= 0"),
        ({}, ValueError, "needs a selection"),
        ({"freeze": ["net.0.*"], "train_last": 1}, ValueError, "not both"),
        ({"freeze": [3]}, TypeError, "`freeze` takes name patterns"),
        ({"freeze_modules": ("Linear",)}, TypeError, "`freeze_modules` takes nn.Module subclasses"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        FreezeLayers(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"freeze": ["backbone.*"]},
            r"`freeze` pattern 'backbone\.\*' matches no parameter of MLPClassifier; "
            r"its parameter names are like: net\.0\.weight",
        ),
        ({"train": [re.compile("head.*")]}, r"`train` pattern 'head\.\*' matches no parameter"),
        ({"freeze_modules": nn.Conv2d}, r"no Conv2d with parameters; its layers are net\.0 \(Linear\)"),
        ({"freeze_first": 3}, r"`freeze_first=3` but MLPClassifier has 2 layers .*: net\.0, net\.2"),
        ({"freeze": ["*"]}, "freezes every trainable parameter"),
        ({"train": ["*"]}, "freezes no trainable parameter"),
    ],
)
def test_a_selection_that_does_not_fit_the_model_fails_at_the_first_fit(split_stream, kwargs, match):
    model = tiny_model(split_stream)
    with pytest.raises(ValueError, match=match):
        trainer(1, [FreezeLayers(**kwargs, from_task=1)]).fit(model, train_loader(split_stream[0]))
