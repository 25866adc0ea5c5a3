"""Any Lightning model, any loss: the model interface, and what methods do with regression models, (logits, features)
outputs, ignored labels, skipped batches, manual optimization, compiled models and the user's own DataLoader."""

import lightning as L
import pytest
import torch
from harness import QUIET, tiny_model, train_loader, trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_incremental import DER, EWC, MAS, SI, ExperienceReplay, KeepOptimizerState, LwF, ModelInterface
from lightning_incremental.core.interface import per_sample_nll


# ---------------------------------------------------------------------------------------------- the interface
def test_the_interface_reads_tuples_named_dicts_and_hugging_face_style_dicts():
    interface, x, y = ModelInterface(), torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    assert interface.inputs((x, y)) is x and interface.targets([x, y]) is y
    assert interface.inputs({"image": x, "label": y}) is x and interface.targets({"image": x, "label": y}) is y
    hf = {"input_ids": torch.ones(4, 5, dtype=torch.long), "attention_mask": torch.ones(4, 5), "labels": y}
    assert sorted(interface.inputs(hf)) == ["attention_mask", "input_ids"] and interface.targets(hf) is y
    named = ModelInterface(input_key="pixels", target_key="digit")
    assert named.inputs({"pixels": x, "digit": y}) is x and named.targets({"pixels": x, "digit": y}) is y


def test_the_interface_finds_logits_in_tensors_tuples_and_objects_with_logits():
    interface, logits = ModelInterface(), torch.randn(2, 3)

    class Output:
        def __init__(self):
            self.logits, self.loss = logits, torch.tensor(0.0)

    assert interface.logits(logits) is logits
    assert interface.logits((logits, torch.randn(2, 8))) is logits
    assert interface.logits({"logits": logits}) is logits and interface.logits(Output()) is logits
    with pytest.raises(TypeError, match=r"ModelInterface\(logits=lambda outputs: \.\.\.\)"):
        interface.logits("not logits")


def test_the_likelihood_follows_the_targets():
    interface = ModelInterface()
    assert interface.likelihood_of(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])) == "categorical"
    assert interface.likelihood_of(torch.zeros(4, 1), torch.randn(4)) == "gaussian"
    assert interface.likelihood_of(torch.zeros(4, 3), torch.tensor([[0.0, 1.0, 1.0]] * 4)) == "bernoulli"
    assert interface.likelihood_of(torch.zeros(4, 5, 7), torch.zeros(4, 5, dtype=torch.long)) == "categorical"
    assert ModelInterface(likelihood="gaussian").likelihood_of(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])) == (
        "gaussian"
    )


def test_per_sample_negative_log_likelihoods_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    expected = -F.log_softmax(logits, -1)[[0, 1], [0, 1]]
    torch.testing.assert_close(per_sample_nll(logits, torch.tensor([0, 1]), "categorical"), expected)
    # token level: the mean over the row's tokens whose label is not -100; a row without any gives 0
    tokens = torch.zeros(2, 3, 4)
    labels = torch.tensor([[1, -100, 2], [-100, -100, -100]])
    log4, log2 = torch.tensor(4.0).log().item(), torch.tensor(2.0).log().item()
    torch.testing.assert_close(per_sample_nll(tokens, labels, "categorical"), torch.tensor([log4, 0.0]))
    gaussian = per_sample_nll(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), "gaussian")
    torch.testing.assert_close(gaussian, torch.tensor([2.5]))
    bernoulli = per_sample_nll(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), "bernoulli")
    torch.testing.assert_close(bernoulli, torch.tensor([2 * log2]))
    with pytest.raises(ValueError, match="integer class labels"):
        per_sample_nll(torch.zeros(2, 3), torch.tensor([0.5, 1.5]), "categorical")


# ---------------------------------------------------------------------------------------------- regression
class Regressor(L.LightningModule):
    """The reference regression model: Linear(10, 20) -> ReLU -> Linear(20, 1), trained with MSE."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _regression_tasks(n_tasks=2, n=64):
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(10, generator=generator)
    tasks = []
    for t in range(n_tasks):
        x = torch.randn(n, 10, generator=generator) + 3.0 * t
        tasks.append(DataLoader(TensorDataset(x, torch.sin(x @ weights / 3)), batch_size=16))
    return tasks


@pytest.mark.parametrize(
    "build",
    [EWC, SI, MAS, LwF, ExperienceReplay, DER, lambda: DER(alpha=0.3, beta=1.0)],
    ids=["ewc", "si", "mas", "lwf", "replay", "der", "derpp"],
)
def test_every_method_acts_on_a_regression_model(build):
    torch.manual_seed(0)
    model, method = Regressor(), build()
    for loader in _regression_tasks():
        trainer(1, [method]).fit(model, loader)
    torch.manual_seed(0)
    naive = Regressor()
    for loader in _regression_tasks():
        trainer(1, []).fit(naive, loader)
    moved = sum((a - b).abs().sum() for a, b in zip(model.parameters(), naive.parameters(), strict=True))
    assert moved > 1e-4  # the method changed training: not a silent no-op


def test_ewc_fisher_on_a_regression_model_is_the_gaussian_one():
    model, ewc = Regressor(), EWC(lambda_=1.0)
    loader = _regression_tasks(1)[0]
    trainer(1, [ewc]).fit(model, loader)
    x, y = loader.dataset.tensors
    expected = torch.zeros_like(model.net[2].bias)
    for i in range(len(x)):  # per-sample gradient of 0.5 * (f(x) - y)^2 w.r.t. the last bias: f(x) - y
        expected += (model(x[i : i + 1]).squeeze() - y[i]).detach().square()
    torch.testing.assert_close(ewc.importance["net.2.bias"], expected / len(x), rtol=1e-4, atol=1e-6)


def test_lwf_distils_a_regression_model_with_mse():
    model, lwf = Regressor(), LwF(alpha=1.0)
    first, second = _regression_tasks()
    trainer(1, [lwf]).fit(model, first)
    batch = next(iter(second))
    interface = ModelInterface()
    assert lwf._mode(interface, model(batch[0]), batch) == "mse"


# ---------------------------------------------------------------------------------------------- model outputs
class TupleOutput(L.LightningModule):
    """forward returns (logits, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU()), nn.Linear(32, 6)

    def forward(self, x):
        features = self.body(x)
        return self.head(features), features

    def training_step(self, batch, batch_idx):
        logits, _ = self(batch[0])
        return F.cross_entropy(logits, batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("build", [EWC, MAS, LwF, DER], ids=["ewc", "mas", "lwf", "der"])
def test_a_forward_returning_logits_and_features_works(split_stream, build):
    model, method = TupleOutput(), build()
    for task in split_stream[:2]:
        trainer(1, [method]).fit(model, train_loader(task))
    assert method.tasks_completed == 2


def test_ewc_ignores_labels_of_minus_100(split_stream):
    class Ignoring(TupleOutput):
        def training_step(self, batch, batch_idx):
            labels = batch[1].clone()
            labels[::2] = -100
            return F.cross_entropy(self(batch[0])[0], labels, ignore_index=-100)

    dataset = split_stream[0].train
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    y[::2] = -100
    model, ewc = Ignoring(), EWC()
    trainer(1, [ewc]).fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    assert all(torch.isfinite(v).all() for v in ewc.importance.values())


def test_a_training_step_returning_none_skips_the_batch_for_every_method(split_stream):
    class Skipping(TupleOutput):
        def training_step(self, batch, batch_idx):
            return None if batch_idx % 2 else super().training_step(batch, batch_idx)

    model, methods = Skipping(), [LwF(), DER(buffer_size=16), ExperienceReplay(buffer_size=16)]
    for task in split_stream[:2]:
        trainer(1, methods).fit(model, train_loader(task))
    assert [m.tasks_completed for m in methods] == [2, 2, 2]


# ---------------------------------------------------------------------------------------------- refusals
class ManualOptimization(TupleOutput):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


@pytest.mark.parametrize("build", [LwF, DER], ids=["lwf", "der"])
def test_loss_term_methods_refuse_manual_optimization_before_training(split_stream, build):
    model = ManualOptimization()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="manual optimization"):
        trainer(1, [build()]).fit(model, train_loader(split_stream[0]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradient_methods_work_under_manual_optimization(split_stream):
    model, ewc = ManualOptimization(), EWC()
    for task in split_stream[:2]:
        trainer(1, [ewc]).fit(model, train_loader(task))
    assert ewc.tasks_completed == 2 and ewc.importance


def test_a_reused_trainer_that_would_train_nothing_is_refused(split_stream):
    model, ewc = tiny_model(split_stream), EWC()
    fit = trainer(1, [ewc])
    fit.fit(model, train_loader(split_stream[0]))
    with pytest.raises(RuntimeError, match=r"would train nothing.*new Trainer for every task"):
        fit.fit(model, train_loader(split_stream[1]))


# ---------------------------------------------------------------------------------------------- random stream
def test_ewc_with_lambda_zero_reproduces_naive_fine_tuning(split_stream):
    weights = []
    for callbacks in ([KeepOptimizerState()], [EWC(lambda_=0.0)]):  # EWC carries the optimizer's state itself
        L.seed_everything(0, verbose=False)
        model = tiny_model(split_stream)
        for task in split_stream:
            L.Trainer(max_epochs=2, callbacks=list(callbacks), **QUIET).fit(
                model, task.train_dataloader(batch_size=8, shuffle=True)
            )
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


# ---------------------------------------------------------------------------------------------- user's own data
def test_lwf_infers_a_tasks_classes_from_the_labels_of_the_users_own_dataloader(split_stream):
    model, lwf = tiny_model(split_stream), LwF()
    for task in split_stream[:2]:
        dataset = task.train
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
        trainer(1, [lwf]).fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    assert lwf.old_tasks == [list(split_stream[0].classes), list(split_stream[1].classes)]
