"""iCaRL: herding picks representative exemplars, the replay buffer holds them split evenly over the classes seen
and shrinking by herding prefix, the training step sees replayed exemplars and LwF's distillation, the nearest
mean of exemplars classifies as by hand, under DDP the exemplars are one global buffer, the state survives a
checkpoint bit for bit, and bad arguments and targets other than class labels are refused with the fix."""

import io
import itertools

import lightning as L
import pytest
import torch
from harness import assert_same_state, assert_same_weights, run_like_torchrun, train_loader, trainer
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_incremental import (
    EWC,
    ContinualEvaluation,
    ExperienceReplay,
    GrowHeads,
    ICaRL,
    MLPClassifier,
    ReplayBuffer,
)
from lightning_incremental.methods.distillation.lwf import distillation_loss
from lightning_incremental.methods.replay.icarl import herding
from lightning_incremental.scenarios import LabeledTensorDataset, regression_stream


def _fit_tasks(model, icarl, tasks, epochs=1, **trainer_kwargs):
    for task in tasks:
        trainer(epochs, [icarl], **trainer_kwargs).fit(model, train_loader(task))


# ---------------------------------------------------------------------------------------------- herding
def test_herding_picks_exemplars_whose_mean_is_closer_to_the_class_mean_than_random_subsets():
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(300, 16, generator=generator) + torch.linspace(0, 2, 16), dim=1)
    class_mean = features.mean(dim=0)
    m = 10
    order = herding(features, m)
    assert order.unique().numel() == m  # no row twice
    herded = float((features[order].mean(dim=0) - class_mean).norm())
    random_errors = torch.tensor(
        [
            float((features[torch.randperm(300, generator=generator)[:m]].mean(dim=0) - class_mean).norm())
            for _ in range(1000)
        ]
    )
    assert herded < float(random_errors.quantile(0.01)), (herded, float(random_errors.quantile(0.01)))
    assert herded < 0.5 * float(random_errors.median())  # 0.074 against a median of 0.19 here
    # every prefix is a good exemplar set of its size: the herded error falls as exemplars are added
    prefix_errors = [float((features[order[:k]].mean(dim=0) - class_mean).norm()) for k in (1, 3, 10)]
    assert prefix_errors == sorted(prefix_errors, reverse=True)


def test_herding_on_a_hand_example():
    features = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # mean 3.25
    assert herding(features, 3).tolist() == [2, 1, 3]  # 2 (d 1.25); 2, 1 (1.5) ; then 10 (13 / 3 = 4.33)
    assert herding(features, 10).tolist() == [2, 1, 3, 0]  # at most every row, once


# ---------------------------------------------------------------------------------------------- memory
def test_exemplars_per_class_are_buffer_size_over_classes_seen_and_shrink_by_herding_prefix(split_stream):
    L.seed_everything(0, verbose=False)
    model, icarl = MLPClassifier(16, 6, hidden=(16,), lr=1e-2), ICaRL(buffer_size=20)
    counts, snapshots = [], []
    for task in split_stream:
        _fit_tasks(model, icarl, [task])
        counts.append({c: len(rows[0]) for c, rows in zip(icarl.classes, icarl.exemplars, strict=True)})
        snapshots.append({c: rows[0].clone() for c, rows in zip(icarl.classes, icarl.exemplars, strict=True)})
        for c, rows in zip(icarl.classes, icarl.exemplars, strict=True):
            assert rows[1].tolist() == [c] * len(rows[1])  # labels travel with their rows
            train = split_stream[c // 2].train
            inputs = torch.stack([train[i][0] for i in range(len(train))])
            assert all((inputs == row).all(dim=1).any() for row in rows[0])  # real training rows, in their dtype
            assert rows[0].dtype == inputs.dtype
        # the replay buffer holds exactly these rows, each with its class and its place in the herding order
        size = len(icarl.buffer)
        assert size == sum(counts[-1].values())
        groups, positions = icarl.buffer.groups[:size], icarl.buffer.extras["position"][:size]
        assert groups.tolist() == sorted(groups.tolist())  # class after class, each in herding order
        for c, n in counts[-1].items():
            assert positions[groups == c].tolist() == list(range(n))
    assert counts == [{0: 10, 1: 10}, dict.fromkeys(range(4), 5), dict.fromkeys(range(6), 3)]  # 20 // 6 = 3
    for before, after in itertools.pairwise(snapshots):
        for c, rows in after.items():
            if c in before:  # an old class keeps the prefix of its herding order
                torch.testing.assert_close(rows, before[c][: len(rows)], atol=0, rtol=0)
    assert tuple(icarl.class_means.shape) == (6, 16)
    torch.testing.assert_close(icarl.class_means.norm(dim=1), torch.ones(6))


def test_a_class_seen_again_is_herded_anew_over_its_exemplars_and_its_new_rows(permuted_stream):
    L.seed_everything(0, verbose=False)
    model, icarl = MLPClassifier(16, 4, hidden=(16,), lr=1e-2), ICaRL(buffer_size=20)  # 4 classes: 5 each
    _fit_tasks(model, icarl, [permuted_stream[0]])
    before = [rows[0].clone() for rows in icarl.exemplars]
    _fit_tasks(model, icarl, [permuted_stream[1]])  # the same 4 classes again, permuted
    task = permuted_stream[1].train
    inputs, labels = torch.stack([task[i][0] for i in range(len(task))]), task.targets
    model.eval()
    for c, rows in zip(icarl.classes, icarl.exemplars, strict=True):
        candidates = torch.cat([before[c], inputs[labels == c]])  # its exemplars (in herding order), then new rows
        with torch.no_grad():
            features = F.normalize(model.net[:-1](candidates), dim=1)  # the input of the last Linear
        torch.testing.assert_close(rows[0], candidates[herding(features, 5)], atol=0, rtol=0)
        assert rows[1].tolist() == [c] * 5


def test_training_step_sees_replayed_exemplars_and_pays_the_distillation_on_old_classes(split_stream):
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    losses: list[float] = []

    class Recording(MLPClassifier):
        def training_step(self, batch, batch_idx):
            seen.append((batch[0].clone(), batch[1].clone()))
            return super().training_step(batch, batch_idx)

    class LossOf(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.seed_everything(0, verbose=False)
    model = Recording(16, 6, hidden=(8,), lr=0.0)  # fixed weights: every term can be recomputed
    icarl = ICaRL(buffer_size=12, alpha=0.7, temperature=2.0, ratio=0.5)
    _fit_tasks(model, icarl, [split_stream[0]])
    old_model = icarl.old_model  # replaced at the end of the next task
    with torch.no_grad():
        old_model.net[-1].bias += torch.tensor([1.0, -1.0, 5.0, 5.0, 5.0, 5.0])  # only columns 0, 1 count
    seen.clear()
    trainer(1, [icarl, LossOf()]).fit(model, train_loader(split_stream[1]))
    current = list(train_loader(split_stream[1]))
    assert len(seen) == len(current) == len(losses)
    with torch.no_grad():
        for (x, y), (x_now, y_now), loss in zip(seen, current, losses, strict=True):
            assert len(x) == len(x_now) + 4  # ratio 0.5 of a batch of 8
            torch.testing.assert_close(x[:8], x_now, atol=0, rtol=0)
            torch.testing.assert_close(y[:8], y_now, atol=0, rtol=0)
            assert set(y[8:].tolist()) <= {0, 1} and x.dtype == x_now.dtype  # exemplars of the old classes
            new, old = model(x), old_model(x)
            expected = F.cross_entropy(new, y) + 0.7 * distillation_loss(new[:, [0, 1]], old[:, [0, 1]], 2.0)
            assert loss == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize(
    "stack",
    [("grow", "icarl"), ("icarl", "grow"), ("replay", "icarl", "ewc"), ("ewc", "icarl", "replay")],
    ids=lambda stack: "+".join(stack),
)
def test_icarl_stacks_with_growing_heads_and_other_methods_in_either_order(split_stream, stack):
    build = {
        "grow": GrowHeads,
        "icarl": lambda: ICaRL(buffer_size=12),
        "replay": lambda: ExperienceReplay(buffer_size=12),
        "ewc": lambda: EWC(lambda_=10.0),
    }
    methods = {name: build[name]() for name in stack}
    L.seed_everything(0, verbose=False)
    head = "incremental" if "grow" in stack else "linear"
    model = MLPClassifier(16, 0 if head == "incremental" else 6, hidden=(16,), head=head, lr=1e-2)
    for task in list(split_stream)[:2]:  # the old model has 2 logits while the grown model has 4
        trainer(1, list(methods.values())).fit(model, train_loader(task))
    icarl = methods["icarl"]
    assert icarl.classes == [0, 1, 2, 3] and len(icarl.buffer) == 12
    assert icarl.old_model is not None and torch.isfinite(icarl.class_means).all()


# ---------------------------------------------------------------------------------------------- NME
def test_nearest_mean_of_exemplars_equals_the_hand_computation():
    model = MLPClassifier(2, 3, hidden=(2,), lr=0.0)  # features: relu(x), the input of the last Linear
    with torch.no_grad():
        model.net[0].weight.copy_(torch.eye(2))
        model.net[0].bias.zero_()
    data = LabeledTensorDataset(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]), torch.tensor([0, 0, 1]))
    icarl = ICaRL(buffer_size=4)  # 2 per class: every row is kept
    trainer(1, [icarl]).fit(model, DataLoader(data, batch_size=3))
    # class 0: mean of (1, 0) and (0.7071, 0.7071) = (0.8536, 0.3536), normalised (0.9239, 0.3827); class 1: (0, 1)
    torch.testing.assert_close(icarl.class_means, torch.tensor([[0.9239, 0.3827], [0.0, 1.0]]), atol=1e-4, rtol=0)
    # x = (1, 0.2), normalised (0.9806, 0.1961): distance 0.1950 to class 0, 1.2680 to class 1; class 2 unseen
    scores = icarl.predict(model.eval(), (torch.tensor([[1.0, 0.2]]), torch.tensor([0])))
    assert scores.shape == (1, 3)
    torch.testing.assert_close(scores[0, :2], torch.tensor([-0.1950, -1.2680]), atol=1e-3, rtol=0)
    assert scores[0, 2] == float("-inf")


def test_before_the_first_task_ends_predict_gives_the_logits_and_evaluation_uses_nme(split_stream):
    L.seed_everything(0, verbose=False)
    model, icarl = MLPClassifier(16, 6, hidden=(16,), lr=1e-2), ICaRL(buffer_size=30)
    x = torch.randn(4, 16)
    torch.testing.assert_close(icarl.predict(model, (x, torch.zeros(4))), model(x).detach(), atol=0, rtol=0)
    evaluation = ContinualEvaluation(split_stream, predict=icarl.predict)
    for task in split_stream:
        trainer(2, [icarl, evaluation]).fit(model, train_loader(task))
    assert evaluation.result().summary()["acc"] > 0.8
    scores = icarl.predict(model.eval(), (x, torch.zeros(4)))
    assert torch.isfinite(scores).all() and scores.shape == (4, 6)


# ---------------------------------------------------------------------------------------------- state
def test_state_round_trip_is_bit_for_bit(split_stream):
    L.seed_everything(0, verbose=False)
    model, icarl = MLPClassifier(16, 6, hidden=(16,), lr=1e-2), ICaRL(buffer_size=20)
    _fit_tasks(model, icarl, list(split_stream)[:2])
    state = icarl.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = ICaRL(buffer_size=20)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_state(state, restored.state_dict())
    assert restored.classes == [0, 1, 2, 3] and [len(rows[0]) for rows in restored.exemplars] == [5, 5, 5, 5]
    x = torch.randn(5, 16)
    torch.testing.assert_close(restored.predict(model, (x, None)), icarl.predict(model, (x, None)), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"buffer_size": 0}, "buffer_size"),
        ({"buffer_size": -5}, "buffer_size"),
        ({"buffer_size": 2.5}, "buffer_size"),
        ({"alpha": -1.0}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"ratio": 0.0}, "ratio"),
        ({"replay_batch_size": 0}, "replay_batch_size"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ICaRL(**kwargs)


def test_unusable_setups_fail_with_the_argument_and_the_fix(split_stream):
    model = MLPClassifier(16, 6, hidden=(8,))
    with pytest.raises(ValueError, match=r"`feature_module='classifier'` is not a submodule.*net\.2"):
        trainer(1, [ICaRL(feature_module="classifier")]).fit(model, train_loader(split_stream[0]))
    unlabelled = DataLoader(torch.randn(16, 16), batch_size=8)
    with pytest.raises(ValueError, match="ICaRL keeps exemplars per class and needs the class label of every row"):
        trainer(1, [ICaRL()]).fit(model, unlabelled)
    with pytest.raises(ValueError, match=r"`buffer_size=1` leaves no exemplar for 2 classes"):
        trainer(1, [ICaRL(buffer_size=1)]).fit(model, train_loader(split_stream[0]))


@pytest.mark.parametrize(
    ("loader", "described"),
    [
        (lambda: regression_stream(n_tasks=1)[0].train_dataloader(batch_size=8), r"torch\.float32 of shape \[8\]"),
        (
            lambda: DataLoader(
                LabeledTensorDataset(torch.randn(16, 10), torch.randint(0, 2, (16, 3))), batch_size=8
            ),  # multi-label: several 0/1 labels per row
            r"torch\.int64 of shape \[8, 3\]",
        ),
    ],
    ids=["regression", "multi-label"],
)
def test_targets_other_than_class_labels_are_refused_before_the_first_optimizer_step(loader, described):
    model = MLPClassifier(10, 3, hidden=(8,))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    fit = trainer(1, [ICaRL()])
    with pytest.raises(ValueError, match=rf"ICaRL needs one integer class label per row.*{described}") as error:
        fit.fit(model, loader())
    message = str(error.value)
    assert "ExperienceReplay or DER" in message and "`y.long()`" in message  # the fixes
    assert "model_interface=ModelInterface(target_key=...)" in message  # the argument
    assert fit.global_step == 0
    assert_same_weights(weights, model.state_dict(), atol=0)


# ---------------------------------------------------------------------------------------------- DDP
def test_under_ddp_the_exemplars_are_one_global_buffer_of_which_each_rank_holds_a_share(split_stream, tmp_path):
    def worker(rank, out_dir):
        L.seed_everything(0, verbose=False)
        model, icarl = MLPClassifier(16, 6, hidden=(16,), lr=1e-2), ICaRL(buffer_size=20)
        for task in list(split_stream)[:2]:
            trainer(1, [icarl], strategy="ddp", devices=2).fit(model, train_loader(task))
        local = [rows[0] for rows in icarl.exemplars]
        torch.save({"local": local, "state": icarl.state_dict()}, out_dir / f"rank{rank}.pt")

    run_like_torchrun(worker, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_state(rank0["state"], rank1["state"])  # the class means, the old model, every rank's share
    assert rank0["state"]["classes"] == [0, 1, 2, 3]
    whole = ReplayBuffer.pooled(rank0["state"]["shards"], capacity=20)  # the checkpoint holds every exemplar
    labels = whole.storage[1][: len(whole)]
    assert [int((labels == c).sum()) for c in range(4)] == [5, 5, 5, 5]
    rows = whole.storage[0][: len(whole)]
    assert sum(map(len, rank0["local"])) == sum(map(len, rank1["local"])) == 10  # each rank holds half
    for c in range(4):  # between them the ranks hold every exemplar of every class once, each about half
        held = torch.cat([rank0["local"][c], rank1["local"][c]])
        assert sorted(map(tuple, held.tolist())) == sorted(map(tuple, rows[labels == c].tolist()))
        assert sorted([len(rank0["local"][c]), len(rank1["local"][c])]) == [2, 3]
