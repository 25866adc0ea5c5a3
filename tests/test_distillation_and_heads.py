"""LwF's distillation term and its heads; the growing classifier heads and the callback that grows them."""

import lightning as L
import pytest
import torch
from harness import train_loader, trainer
from torch.nn import functional as F

from lightning_incremental import load_task_checkpoint
from lightning_incremental.heads import GrowHeads, IncrementalClassifier
from lightning_incremental.methods.distillation import LwF, distillation_loss
from lightning_incremental.methods.regularization import EWC
from lightning_incremental.models import MLPClassifier
from lightning_incremental.scenarios import synthetic_stream


# ---------------------------------------------------------------------------------------------- LwF
def test_distillation_gradient_is_temperature_times_the_probability_gap():
    new = torch.tensor([[1.0, -0.5, 2.0], [0.0, 0.3, -1.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 1.0], [2.0, -1.0, 0.0]])
    temperature = 2.0
    distillation_loss(new, old, temperature).backward()
    expected = temperature * (F.softmax(new / temperature, -1) - F.softmax(old / temperature, -1)) / len(new)
    torch.testing.assert_close(new.grad, expected.detach())


def _losses_of_one_epoch(model, callbacks, loader):
    losses = []

    class _Loss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer(1, [*callbacks, _Loss()]).fit(model, loader)
    return losses


def test_lwf_adds_alpha_times_the_distillation_over_the_old_classes_only(split_stream):
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(16, 6, hidden=(8,), lr=0.0)  # fixed weights: every term can be recomputed
    lwf = LwF(alpha=0.7, temperature=2.0)
    trainer(1, [lwf]).fit(model, train_loader(split_stream[0]))
    assert lwf.old_tasks == [[0, 1]]
    old_model = lwf.old_model  # replaced at the end of the next task
    with torch.no_grad():
        old_model.net[-1].bias += torch.tensor([1.0, -1.0, 5.0, 5.0, 5.0, 5.0])  # only columns 0, 1 count
    losses = _losses_of_one_epoch(model, [lwf], train_loader(split_stream[1]))
    expected = []
    with torch.no_grad():
        for x, y in train_loader(split_stream[1]):
            new, old = model(x), old_model(x)
            kd = distillation_loss(new[:, [0, 1]], old[:, [0, 1]], 2.0)
            expected.append(float(F.cross_entropy(new, y) + 0.7 * kd))
    assert losses == pytest.approx(expected, abs=1e-5)


def test_lwf_distils_each_old_head_separately_with_task_labels_and_everything_in_a_domain_stream():
    lwf = LwF()
    lwf.old_tasks = [[0, 1], [2, 3]]
    x = torch.zeros(2, 4)
    heads = lwf._heads((x, torch.zeros(2), torch.ones(2, dtype=torch.long)), num_outputs=6)
    assert [h.tolist() for h in heads] == [[0, 1], [2, 3]]
    assert [h.tolist() for h in lwf._heads((x, torch.zeros(2)), num_outputs=6)] == [[0, 1, 2, 3]]
    lwf.old_tasks = [[0, 1, 2, 3, 4, 5]]  # a domain-incremental task has every class
    assert lwf._heads((x, torch.zeros(2)), num_outputs=6) == [slice(None)]


def test_lwf_keeps_one_frozen_copy_and_it_does_not_move_during_the_next_task(split_stream):
    L.seed_everything(0, verbose=False)
    model, lwf = MLPClassifier(16, 6, hidden=(8,), lr=1e-2), LwF()
    trainer(1, [lwf]).fit(model, train_loader(split_stream[0]))
    first_copy = lwf.old_model
    frozen = {k: v.clone() for k, v in first_copy.state_dict().items()}
    trainer(1, [lwf]).fit(model, train_loader(split_stream[1]))
    assert all(torch.equal(frozen[k], v) for k, v in first_copy.state_dict().items())
    assert not any(p.requires_grad for p in lwf.old_model.parameters()) and not lwf.old_model.training
    assert lwf.old_model is not first_copy  # replaced at the task end: one copy, never one per task
    assert not any(torch.equal(model.net[0].weight, p) for p in first_copy.parameters())


def test_lwf_checkpoint_restores_the_old_model(split_stream, tmp_path):
    L.seed_everything(0, verbose=False)
    model, lwf = MLPClassifier(16, 6, hidden=(8,)), LwF()
    fit = trainer(1, [lwf])
    fit.fit(model, train_loader(split_stream[0]))
    fit.save_checkpoint(tmp_path / "task0.ckpt")
    restored = LwF()
    fresh = MLPClassifier(16, 6, hidden=(8,))
    load_task_checkpoint(tmp_path / "task0.ckpt", fresh, [restored])
    x, outputs = torch.randn(5, 16), []

    class _OldOutputs(L.Callback):  # the restored old model, as the next task sees it
        def on_train_start(self, trainer, pl_module):
            outputs.append((restored.old_model(x), [list(c) for c in restored.old_tasks]))

    trainer(1, [restored, _OldOutputs()], max_steps=1).fit(fresh, train_loader(split_stream[1]))
    torch.testing.assert_close(outputs[0][0], lwf.old_model(x), atol=0, rtol=0)
    assert outputs[0][1] == [[0, 1]]


@pytest.mark.parametrize(
    ("build", "message"),
    [(lambda: LwF(alpha=-1.0), "alpha"), (lambda: LwF(temperature=0.0), "temperature")],
)
def test_lwf_bad_arguments_name_the_argument(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_lwf_names_the_logits_module_it_cannot_find_before_the_first_step(split_stream):
    model, lwf = MLPClassifier(16, 6, hidden=(8,)), LwF(logits_module="classifier")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"`logits_module='classifier'` is not a submodule.*net\.2"):
        trainer(1, [lwf]).fit(model, train_loader(split_stream[0]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- heads
def test_incremental_classifier_keeps_old_rows_and_takes_the_size_of_a_checkpoint_it_loads():
    head = IncrementalClassifier(3, 2)
    old = {name: t.detach().clone() for name, t in head.state_dict().items()}
    head.grow(4)
    head.grow(3)  # never shrinks
    assert head.num_classes == 4 and torch.equal(head.weight[:2], old["weight"])
    fresh = IncrementalClassifier(3, 0)
    fresh.load_state_dict(head.state_dict())
    assert torch.equal(fresh.weight, head.weight) and torch.equal(fresh.bias, head.bias)
    fresh.load_state_dict(old)  # an earlier, smaller state: the head is that state again
    assert fresh.num_classes == 2 and torch.equal(fresh.weight, old["weight"])


def test_lwf_resumed_between_tasks_keeps_the_smaller_old_model_of_a_grown_head(tmp_path):
    stream = synthetic_stream(n_tasks=2, classes_per_task=2)
    L.seed_everything(0, verbose=False)
    model, lwf = MLPClassifier(16, 0, hidden=(8,), head="incremental"), LwF()
    fit = trainer(1, [GrowHeads(), lwf])
    fit.fit(model, train_loader(stream[0]))
    fit.save_checkpoint(tmp_path / "task0.ckpt")
    fresh, restored = MLPClassifier(16, 0, hidden=(8,), head="incremental"), LwF()
    load_task_checkpoint(tmp_path / "task0.ckpt", fresh, [GrowHeads(), restored])
    x, seen = torch.randn(5, 16), []

    class _OldOutputs(L.Callback):  # the next task's old model: task 0's two classes in a grown model's copy
        def on_train_start(self, trainer, pl_module):
            seen.append((pl_module.head.num_classes, restored.old_model(x)))

    trainer(1, [GrowHeads(), restored, _OldOutputs()], max_steps=2).fit(fresh, train_loader(stream[1]))
    assert seen[0][0] == 4 and seen[0][1].shape == (5, 2)
    torch.testing.assert_close(seen[0][1], lwf.old_model(x), atol=0, rtol=0)


def test_grow_heads_adds_classes_the_optimizer_trains_and_ewc_pads_their_importance():
    stream = synthetic_stream(n_tasks=2, classes_per_task=2)
    L.seed_everything(0, verbose=False)
    model, ewc = MLPClassifier(16, 0, hidden=(8,), lr=1e-2, head="incremental"), EWC(lambda_=10.0)
    trainer(1, [GrowHeads(), ewc]).fit(model, train_loader(stream[0]))
    assert model.head.num_classes == 2 and tuple(ewc.importance["net.2.weight"].shape) == (2, 8)
    grown = []

    class _GrownRows(L.Callback):
        def on_train_start(self, trainer, pl_module):
            grown.append(pl_module.head.weight[2:].detach().clone())
            optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
            grown.append(id(pl_module.head.weight) in optimized)

    trainer(1, [GrowHeads(), ewc, _GrownRows()]).fit(model, train_loader(stream[1]))
    assert model.head.num_classes == 4 and grown[1]  # the optimizer holds the grown parameter
    assert ((model.head.weight[2:] - grown[0]).abs().sum(dim=1) > 0).all()  # and trained the new rows
    assert tuple(ewc.importance["net.2.weight"].shape) == (4, 8)


def test_multi_head_training_leaves_the_other_heads_untouched():
    stream = synthetic_stream(n_tasks=2, classes_per_task=2, task_labels=True)
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(16, stream.num_classes, hidden=(8,), lr=1e-2, head="multihead")
    trainer(1, [GrowHeads()]).fit(model, train_loader(stream[0]))
    head0 = {k: v.clone() for k, v in model.head.heads["0"].state_dict().items()}
    trainer(1, [GrowHeads()]).fit(model, train_loader(stream[1]))
    assert sorted(model.head.heads) == ["0", "1"] and model.head.heads["1"].classes.tolist() == [2, 3]
    assert all(torch.equal(head0[k], v) for k, v in model.head.heads["0"].state_dict().items())
    fresh = MLPClassifier(16, stream.num_classes, hidden=(8,), head="multihead")
    fresh.load_state_dict(model.state_dict())  # the heads are rebuilt from the checkpoint
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), model(x))


def test_grow_heads_explains_what_it_needs(split_stream):
    with pytest.raises(ValueError, match="no IncrementalClassifier or MultiHeadClassifier"):
        trainer(1, [GrowHeads()]).fit(MLPClassifier(16, 6, hidden=(8,)), train_loader(split_stream[0]))
    plain = torch.utils.data.DataLoader(list(split_stream[0].train), batch_size=8)
    with pytest.raises(ValueError, match=r"task\.train_dataloader"):
        trainer(1, [GrowHeads()]).fit(MLPClassifier(16, 0, hidden=(8,), head="incremental"), plain)
