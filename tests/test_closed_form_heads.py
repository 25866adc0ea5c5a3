"""PrototypeHead and RanPACHead: closed-form heads on a frozen backbone, fitted from sufficient statistics."""

from pathlib import Path

import lightning as L
import pytest
import torch
from harness import QUIET, assert_same_state, run_like_torchrun, train_loader, trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_incremental import ContinualEvaluation, FreezeLayers, MLPClassifier, load_task_checkpoint
from lightning_incremental.methods.pretrained import (
    CosinePrototypeClassifier,
    PrototypeHead,
    RandomProjectionRidgeClassifier,
    RanPACHead,
    holdout_mask,
    select_ridge,
)
from lightning_incremental.scenarios import digits_stream

GRID = [1e-6, 1e-4, 1e-2, 1.0, 1e2]  # relative to the mean eigenvalue of the fitted rows' Gram matrix


def frozen_model(stream, seed: int = 0) -> MLPClassifier:
    """16 -> 32 (ReLU) -> classes; the first layer is the frozen backbone, the head's input the 32 features."""
    L.seed_everything(seed, verbose=False)
    model = MLPClassifier(16, stream.num_classes, hidden=(32,))
    model.net[0].requires_grad_(False)
    return model


def fit_tasks_with(model, callbacks, tasks, epochs: int = 2, batch_size: int = 8, **kwargs) -> list[int]:
    """Fit every task with a fresh Trainer; return each fit's optimizer steps."""
    steps = []
    for task in tasks:
        fit = trainer(epochs, callbacks, **kwargs)
        fit.fit(model, train_loader(task, batch_size=batch_size))
        steps.append(fit.global_step)
    return steps


def features_of(model: MLPClassifier, tasks) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input for every training row of ``tasks``, computed in the batches the heads read."""
    features, labels = [], []
    with torch.no_grad():
        for task in tasks:
            for x, y in DataLoader(task.train, batch_size=8):
                features.append(model.net[1](model.net[0](x)))
                labels.append(y)
    return torch.cat(features), torch.cat(labels)


def joint_ridge(h: torch.Tensor, labels: torch.Tensor, held_out: torch.Tensor, classes: int, ridge: float | None):
    """The ridge head fitted at once on explicit rows: lambda chosen by refitting on the kept rows for every
    grid point and measuring the held-out rows' squared error, then solved on every row."""
    h, y = h.double(), F.one_hot(labels, classes).double()
    eye = torch.eye(h.shape[1], dtype=torch.float64)
    errors = []
    if ridge is None:
        fit, val = h[~held_out], h[held_out]
        scale = fit.square().sum().item() / h.shape[1]
        candidates = [g * scale for g in GRID]
        for candidate in candidates:
            w = torch.linalg.solve(fit.T @ fit + candidate * eye, fit.T @ y[~held_out])
            errors.append(((val @ w - y[held_out]) ** 2).sum().item() / len(val))
        ridge = candidates[errors.index(min(errors))]
    return torch.linalg.solve(h.T @ h + ridge * eye, h.T @ y), ridge, errors


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------- the guarantees
@pytest.mark.parametrize("ridge", [None, 0.5])
def test_ridge_head_after_every_task_equals_the_joint_ridge_fit_on_the_tasks_so_far(split_stream, ridge):
    model = frozen_model(split_stream)
    head = RanPACHead(projection_dim=128, ridge=ridge, ridge_grid=GRID, seed=3)
    for t, task in enumerate(split_stream):
        steps = fit_tasks_with(model, [head], [task])
        assert steps == [0]  # a frozen backbone: the fit stops before its first step
        features, labels = features_of(model, split_stream[: t + 1])
        h = model.head.expand(features)
        held_out = holdout_mask(features, 0.2, seed=3)
        expected, expected_ridge, expected_errors = joint_ridge(h, labels, held_out, split_stream.num_classes, ridge)

        assert isinstance(model.head, RandomProjectionRidgeClassifier)
        assert relative_error(model.head.weight, expected) < 1e-5
        assert head.chosen_ridge == pytest.approx(expected_ridge, rel=1e-12)
        if ridge is None:
            assert 0 < held_out.sum() < len(held_out)
            assert head.val_rows == held_out.sum().item()
            assert head.validation_errors == pytest.approx(expected_errors, rel=1e-6)
    assert head.class_counts.tolist() == [48.0] * 6


def test_prototypes_are_the_class_means_of_the_features_and_predict_by_cosine(split_stream):
    model = frozen_model(split_stream)
    head = PrototypeHead()
    fit_tasks_with(model, [head], split_stream[:2])
    features, labels = features_of(model, split_stream[:2])
    means = torch.stack([features[labels == c].mean(0) for c in range(4)])

    assert isinstance(model.head, CosinePrototypeClassifier)
    torch.testing.assert_close(model.head.prototypes[:4], means, rtol=1e-6, atol=1e-6)
    assert model.head.seen.tolist() == [True] * 4 + [False] * 2
    assert head.class_counts.tolist() == [48.0] * 4 + [0.0] * 2
    x = torch.stack([split_stream[0].test[i][0] for i in range(10)])
    with torch.no_grad():
        logits = model(x)
    expected = F.normalize(model.net[1](model.net[0](x)), dim=1) @ F.normalize(means, dim=1).T
    torch.testing.assert_close(logits[:, :4], expected, rtol=1e-5, atol=1e-6)
    assert (logits[:, 4:] == torch.finfo(torch.float32).min).all()  # classes not seen yet never win


def test_both_heads_beat_naive_fine_tuning_by_far_on_class_incremental_digits():
    stream = digits_stream("split")  # 5 tasks of 2 digits, one 10-way head

    def run(callbacks, train_backbone: bool) -> tuple[float, list[int]]:
        L.seed_everything(0, verbose=False)
        model, evaluation = MLPClassifier(64, 10, hidden=(64,), lr=1e-2), ContinualEvaluation(stream)
        model.net[0].requires_grad_(train_backbone)
        steps = fit_tasks_with(model, [*callbacks, evaluation], stream, epochs=1, batch_size=32)
        return evaluation.result().summary()["acc"], steps

    naive, naive_steps = run([], train_backbone=True)
    prototype, prototype_steps = run([PrototypeHead()], train_backbone=False)  # a frozen random backbone
    adapt_once = FreezeLayers(freeze=["net.0.*"], from_task=1)  # train the backbone on task 0, then freeze it
    ranpac, ranpac_steps = run([adapt_once, RanPACHead(projection_dim=256)], train_backbone=True)

    assert min(naive_steps) > 0 and prototype_steps == [0] * 5 and ranpac_steps == [naive_steps[0], 0, 0, 0, 0]
    assert naive < 0.3
    assert prototype > naive + 0.5 and prototype > 0.8, (prototype, naive)
    assert ranpac > naive + 0.6 and ranpac > 0.9, (ranpac, naive)


def test_two_ddp_processes_fit_the_same_heads_as_one_process(split_stream, tmp_path):
    def run(model_seed: int, **trainer_kwargs) -> dict:
        prototype_model, ridge_model = frozen_model(split_stream, model_seed), frozen_model(split_stream, model_seed)
        prototype, ranpac = PrototypeHead(), RanPACHead(projection_dim=64, ridge_grid=GRID)
        for task in split_stream[:2]:
            for model, head in ((prototype_model, prototype), (ridge_model, ranpac)):
                fit = trainer(1, [head], **trainer_kwargs)
                fit.fit(model, train_loader(task))
        return {
            "world_size": fit.world_size,
            "prototypes": prototype_model.head.prototypes.clone(),
            "weight": ridge_model.head.weight.clone(),
            "ridge": ranpac.chosen_ridge,
            "statistics": {key: value for key, value in ranpac.state_dict()["statistics"].items() if "gram" in key},
        }

    def worker(rank: int, out_dir: Path) -> None:
        torch.save(run(0, strategy="ddp", devices=2), out_dir / f"rank{rank}.pt")

    run_like_torchrun(worker, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = run(0)
    assert rank0["world_size"] == 2 and single["world_size"] == 1
    assert_same_state(rank0, rank1)  # every rank holds the same statistics and heads
    torch.testing.assert_close(rank0["prototypes"], single["prototypes"], rtol=1e-6, atol=1e-7)
    assert rank0["ridge"] == pytest.approx(single["ridge"], rel=1e-9)
    assert relative_error(rank0["weight"], single["weight"]) < 1e-5
    for key, value in single["statistics"].items():
        assert relative_error(rank0["statistics"][key], value) < 1e-9, key


@pytest.mark.parametrize("head_type", [PrototypeHead, RanPACHead])
def test_checkpoint_between_tasks_resumes_as_if_never_stopped(split_stream, tmp_path, head_type):
    arguments = {"projection_dim": 64} if head_type is RanPACHead else {}
    model, head = frozen_model(split_stream), head_type(**arguments)
    first = trainer(1, [head], enable_checkpointing=True, default_root_dir=tmp_path)
    first.fit(model, train_loader(split_stream[0]))
    path = tmp_path / "after_task_0.ckpt"
    first.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["callbacks"][head.state_key]["tasks_completed"] == 1

    restored_model, restored = frozen_model(split_stream, seed=1), head_type(**arguments)
    restored.install(restored_model)  # the fresh model needs the layer before it can take the fitted weights
    load_task_checkpoint(path, restored_model, [restored])
    for m, h in ((model, head), (restored_model, restored)):
        fit_tasks_with(m, [h], [split_stream[1]])
    assert_same_state(restored.state_dict(), head.state_dict())
    assert_same_state(restored_model.state_dict(), model.state_dict())


@pytest.mark.parametrize(
    ("head_type", "arguments", "names"),
    [
        (PrototypeHead, {}, ["class_counts", "class_sums"]),
        (RanPACHead, {"ridge": 1.0}, ["class_counts", "gram", "targets_sum"]),
        (RanPACHead, {}, ["class_counts", "gram", "gram_val", "targets_sum", "targets_val", "val_rows"]),
    ],
)
def test_the_statistics_are_named_states_that_rebuild_the_head_from_a_state_dict(
    split_stream, head_type, arguments, names
):
    arguments = {**arguments, "projection_dim": 16, "ridge_grid": GRID} if head_type is RanPACHead else arguments
    model, head = frozen_model(split_stream), head_type(**arguments)
    fit_tasks_with(model, [head], split_stream[:2])
    assert sorted(head.statistics) == sorted(head.state_dict()["statistics"]) == names
    assert all(value.dtype == torch.float64 and value.device.type == "cpu" for value in head.statistics.values())
    assert head.class_counts.tolist() == [48.0] * 4 + [0.0] * 2

    restored, fresh = head_type(**arguments), frozen_model(split_stream, seed=1)
    restored.load_state_dict(head.state_dict())
    restored.fit_classifier(restored.install(fresh))  # the head again, from the loaded statistics alone
    assert_same_state(restored.state_dict(), head.state_dict())
    assert_same_state(dict(fresh.head.named_buffers()), dict(model.head.named_buffers()))


def test_a_hugging_face_text_model_with_dict_batches_needs_only_a_frozen_encoder():
    transformers = pytest.importorskip("transformers")
    from lightning_incremental.text import TextClassifier, pad_batch

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    model = TextClassifier(transformers.BertModel(config), num_classes=3)
    model.encoder.requires_grad_(False)
    lengths = torch.randint(3, 9, (24,)).tolist()  # padded per batch: the rows differ in length
    rows = [{"input_ids": torch.randint(1, 50, (n,)), "labels": torch.tensor(i % 3)} for i, n in enumerate(lengths)]
    loader = DataLoader(rows, batch_size=8, collate_fn=pad_batch)
    fit = trainer(3, [PrototypeHead()])
    fit.fit(model, loader)

    model.eval()
    with torch.no_grad():
        embeddings = torch.cat([model.embed(b["input_ids"], b["attention_mask"]) for b in loader])
    labels = torch.tensor([i % 3 for i in range(24)])
    assert fit.global_step == 0
    means = torch.stack([embeddings[labels == c].mean(0) for c in range(3)])
    torch.testing.assert_close(model.head.prototypes, means, rtol=1e-5, atol=1e-6)


def test_spawned_workers_need_the_layer_installed_in_the_main_process_first(split_stream):
    model, head = frozen_model(split_stream), RanPACHead(projection_dim=8)
    fork = L.Trainer(callbacks=[head], **{**QUIET, "strategy": "ddp_fork", "devices": 2})
    with pytest.raises(RuntimeError, match=r"call `RanPACHead\(...\).install\(model\)` once before the first fit"):
        head.setup(fork, model, "fit")
    head.install(model)
    head.setup(fork, model, "fit")
    assert isinstance(model.head, RandomProjectionRidgeClassifier) and model.head.projection.shape == (32, 8)


# ---------------------------------------------------------------------------------------------- errors
class _Backbone(L.LightningModule):
    """A model without a layer called head / classifier / fc."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 6))
        self.unused = nn.Linear(8, 6)

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_backbone_whose_features_cannot_be_found_is_refused_with_the_fix(split_stream):
    with pytest.raises(ValueError, match=r"Could not find the head of _Backbone.*Pass `head_module=`.*body\.2"):
        PrototypeHead().install(_Backbone())
    with pytest.raises(ValueError, match=r"`head_module='missing'` is not a submodule"):
        RanPACHead(head_module="missing").install(_Backbone())
    with pytest.raises(ValueError, match=r"pass `in_features=`.*`num_classes=`"):
        PrototypeHead(head_module="body").install(_Backbone())
    with pytest.raises(RuntimeError, match=r"head `unused` did not run"):
        trainer(1, [PrototypeHead(head_module="unused")]).fit(_Backbone(), train_loader(split_stream[0]))
    with pytest.raises(ValueError, match=r"input of the head `body.0` is of shape \[8, 16\], not .*\[8, 8\]"):
        trainer(1, [PrototypeHead(head_module="body.0", in_features=8)]).fit(_Backbone(), train_loader(split_stream[0]))
    assert isinstance(PrototypeHead(head_module="body.2").install(_Backbone()).original, nn.Linear)


def test_targets_that_are_not_class_labels_are_refused(split_stream):
    regression = DataLoader(TensorDataset(torch.randn(16, 16), torch.randn(16)), batch_size=8)
    with pytest.raises(TypeError, match=r"RanPACHead needs class labels.*torch.float32"):
        trainer(1, [RanPACHead(projection_dim=8)]).fit(frozen_model(split_stream), regression)
    out_of_range = DataLoader(TensorDataset(torch.randn(16, 16), torch.full((16,), 9)), batch_size=8)
    with pytest.raises(ValueError, match=r"labels in \[9, 9\] but the head has 6 classes: pass `num_classes=`"):
        trainer(1, [PrototypeHead()]).fit(frozen_model(split_stream), out_of_range)


@pytest.mark.parametrize("setting", [{"max_epochs": 0}, {"limit_train_batches": 0}])
def test_fits_that_skip_the_training_loop_are_refused_naming_the_fix(split_stream, setting):
    kwargs = {**QUIET, "max_epochs": 1, **setting}
    with pytest.raises(ValueError, match=r"Keep the Trainer's usual settings.*ends before its first step"):
        L.Trainer(callbacks=[PrototypeHead()], **kwargs).fit(frozen_model(split_stream), train_loader(split_stream[0]))


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"projection_dim": 0}, ValueError, "`projection_dim` must be a positive integer"),
        ({"activation": "sigmoid"}, ValueError, "`activation` must be one of"),
        ({"ridge": 0.0}, ValueError, "`ridge` must be > 0"),
        ({"ridge_grid": []}, ValueError, "`ridge_grid` must be a non-empty"),
        ({"holdout": 1.0}, ValueError, "`holdout` must be a fraction in"),
        ({"num_classes": 0}, ValueError, "`num_classes` must be a positive integer"),
        ({"in_features": 2.5}, ValueError, "`in_features` must be a positive integer"),
        ({"head_module": 3}, TypeError, "`head_module` must be the dotted name"),
        ({"model_interface": "x"}, TypeError, "`model_interface` must be"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(arguments, error, message):
    with pytest.raises(error, match=message):
        RanPACHead(**arguments)


def test_choosing_the_ridge_without_held_out_rows_asks_for_a_fixed_ridge():
    gram, targets = torch.eye(3, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"0 held-out rows. Pass a fixed `ridge=`"):
        select_ridge(gram, targets, gram * 0, targets, 0.0)
