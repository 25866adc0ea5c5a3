"""EWC, online EWC, SI, MAS and L2Anchor: the penalty's gradient, the importances, grown heads, task-free
consolidation, logging and argument errors."""

import copy
import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from harness import run_like_torchrun, train_loader, trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F

from lightning_incremental.core import ContinualCallback, add_to_loss
from lightning_incremental.core.per_sample import per_sample_grad_sums
from lightning_incremental.methods.regularization import EWC, MAS, SI, L2Anchor
from lightning_incremental.models import MLPClassifier

METHODS = {
    "ewc": lambda: EWC(lambda_=50.0),
    "online_ewc": lambda: EWC(lambda_=50.0, mode="online", decay=0.5),
    "si": lambda: SI(lambda_=5.0),
    "mas": lambda: MAS(lambda_=5.0),
    "l2": lambda: L2Anchor(lambda_=0.5),
}


class SGDClassifier(MLPClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class PenaltyInLoss(ContinualCallback):
    """The same quadratic penalty written into the loss, for autograd to differentiate."""

    def __init__(self, lambda_: float, importance: dict, anchor: dict) -> None:
        super().__init__()
        self.lambda_, self.importance, self.anchor = lambda_, importance, anchor

    def wrap_training_step(self, trainer, pl_module, batch, step):
        penalty = sum(
            (self.importance[n].to(p) * (p - self.anchor[n].to(p)).square()).sum()
            for n, p in pl_module.named_parameters()
        )
        return add_to_loss(step(batch), 0.5 * self.lambda_ * penalty)


def _second_task_both_ways(method_name, stream, trainer_kwargs):
    """Task 0 with the method; then task 1 from the same point with the hook and with the loss term."""
    L.seed_everything(0, verbose=False)
    model, method = SGDClassifier(16, 6, hidden=(32,)), METHODS[method_name]()
    trainer(1, [method]).fit(model, train_loader(stream[0]))
    twin = copy.deepcopy(model)
    in_loss = PenaltyInLoss(method.lambda_, dict(method.importance), dict(method.anchor))
    trainer(2, [method], **trainer_kwargs).fit(model, train_loader(stream[1]))
    trainer(2, [in_loss], **trainer_kwargs).fit(twin, train_loader(stream[1]))
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    return flat(model), flat(twin)


@pytest.mark.parametrize("method_name", list(METHODS))
@pytest.mark.parametrize(
    "trainer_kwargs",
    [{}, {"precision": "bf16-mixed"}, {"accumulate_grad_batches": 2}, {"gradient_clip_val": 0.1}],
    ids=["32-true", "bf16-mixed", "accumulate-2", "clipping"],
)
def test_hook_gradient_equals_the_gradient_of_the_penalty_in_the_loss(method_name, trainer_kwargs, split_stream):
    with_hook, with_loss = _second_task_both_ways(method_name, split_stream, trainer_kwargs)
    tolerance = 2e-3 if trainer_kwargs.get("precision") else 1e-5
    torch.testing.assert_close(with_hook, with_loss, atol=tolerance, rtol=1e-4)


def test_hook_gradient_equals_the_penalty_in_the_loss_under_ddp(split_stream, tmp_path):
    def worker(rank: int, out_dir: Path) -> None:
        torch.save(
            _second_task_both_ways("ewc", split_stream, {"strategy": "ddp", "devices": 2}), out_dir / f"{rank}.pt"
        )

    run_like_torchrun(worker, tmp_path)
    for rank in (0, 1):
        with_hook, with_loss = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(with_hook, with_loss, atol=1e-5, rtol=1e-4)


def test_the_penalty_changes_training_and_is_logged(split_stream, tmp_path):
    ewc = EWC(lambda_=50.0, mode="separate")  # its anchor after the task still holds the first task's weights
    model = SGDClassifier(16, 6, hidden=(32,))
    trainer(1, [ewc]).fit(model, train_loader(split_stream[0]))
    logger = CSVLogger(tmp_path, name="ewc")
    trainer(1, [ewc], logger=logger, log_every_n_steps=1).fit(model, train_loader(split_stream[1]))
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        penalties = [float(row["cl/ewc_penalty"]) for row in csv.DictReader(handle) if row.get("cl/ewc_penalty")]
    assert len(penalties) == 12  # one per optimizer step: 96 samples / batch 8
    assert penalties[0] == pytest.approx(0.0, abs=1e-9) and penalties[-1] > 1e-4  # grows as weights move
    expected = (
        0.5
        * 50.0
        * sum((ewc.importance[n] * (p.detach() - ewc.anchor[n]).square()).sum() for n, p in model.named_parameters())
    )
    assert expected.item() > penalties[-1] * 0.5  # the final weights are past the last logged step


def test_separate_ewc_keeps_one_quadratic_with_the_summed_penalty_gradient(split_stream):
    ewc = EWC(lambda_=1.0, mode="separate")
    model = MLPClassifier(16, 6, hidden=(32,))
    anchors, fishers, total = [], [], {}
    for task in split_stream:
        trainer(1, [ewc]).fit(model, train_loader(task))
        anchors.append({n: p.detach().clone() for n, p in model.named_parameters()})
        fishers.append({n: ewc.importance[n] - total.get(n, 0) for n in ewc.importance})
        total = dict(ewc.importance)
    probe = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for name in probe:  # grad of sum_t F_t (theta - theta_t)^2 / 2 == Omega (theta - theta*)
        per_task = sum(f[name] * (probe[name] - a[name]) for f, a in zip(fishers, anchors, strict=True))
        single = ewc.importance[name] * (probe[name] - ewc.anchor[name])
        torch.testing.assert_close(single, per_task, atol=1e-4, rtol=1e-4)
    assert len(ewc.state_dict()["importance"]) == len(list(model.parameters()))  # no copy per task


def _explicit_fisher(model, x, y, true_fisher):
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        log_probs = F.log_softmax(model(x[i : i + 1]), -1)[0]
        classes = range(log_probs.numel()) if true_fisher else [int(y[i])]
        for c in classes:
            weight = log_probs[c].exp().detach() if true_fisher else 1.0
            grads = torch.autograd.grad(log_probs[c], list(model.parameters()), retain_graph=True)
            for (n, _), g in zip(model.named_parameters(), grads, strict=True):
                fisher[n] += weight * g.square() / len(x)
    return fisher


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_per_sample_fisher_equals_a_loop_over_single_samples(fisher, split_stream):
    model = MLPClassifier(16, 6, hidden=(32,)).eval()
    loader = train_loader(split_stream[0], batch_size=16)
    ewc = EWC(fisher=fisher, chunk_size=5)
    estimated = ewc.estimate_importance(type("T", (), {"train_dataloader": loader, "world_size": 1})(), model)
    x, y = torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader])
    expected = _explicit_fisher(model, x, y, fisher == "true")
    for name in expected:
        torch.testing.assert_close(estimated[name], expected[name], atol=1e-6, rtol=1e-4)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.norm = nn.BatchNorm2d(3)  # no fast path: the torch.func fallback
        self.shared = nn.Linear(12, 12)  # called twice: the torch.func fallback
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = self.norm(F.relu(self.conv(x))).flatten(1)
        return self.head(self.shared(torch.tanh(self.shared(h))))


@pytest.mark.parametrize("reduction", ["square", "abs"])
def test_per_sample_sums_match_single_sample_gradients_on_every_layer_kind(reduction):
    torch.manual_seed(0)
    model = _ConvNet().eval()
    x, y = torch.randn(7, 1, 4, 4), torch.randint(0, 4, (7,))
    loss = lambda out, batch: F.cross_entropy(out, batch[1], reduction="none")  # noqa: E731
    sums, count = per_sample_grad_sums(
        model, [(x[:4], y[:4]), (x[4:], y[4:])], loss, lambda m, b: m(b[0]), reduction=reduction, chunk_size=3
    )
    phi = torch.square if reduction == "square" else torch.abs
    for name, param in model.named_parameters():
        expected = sum(
            phi(torch.autograd.grad(loss(model(x[i : i + 1]), (None, y[i : i + 1])).sum(), param)[0]) for i in range(7)
        )
        torch.testing.assert_close(sums[name], expected, atol=1e-5, rtol=1e-4, msg=name)
    assert count == 7


def test_mas_importance_needs_no_labels_and_is_the_mean_absolute_output_gradient(split_stream):
    model = MLPClassifier(16, 6, hidden=(8,)).eval()
    unlabelled = torch.utils.data.DataLoader([x for x, _ in split_stream[0].train], batch_size=32)
    mas = MAS()
    importance = mas.estimate_importance(type("T", (), {"train_dataloader": unlabelled, "world_size": 1})(), model)
    x = torch.stack([x for x, _ in split_stream[0].train])
    weight = model.net[0].weight
    expected = sum(torch.autograd.grad(model(x[i : i + 1]).square().sum(), weight)[0].abs() for i in range(len(x)))
    torch.testing.assert_close(importance["net.0.weight"], expected / len(x), atol=1e-6, rtol=1e-4)


def test_si_importance_is_the_path_integral_over_the_squared_displacement(split_stream):
    si = SI(lambda_=1.0, epsilon=0.1)
    model = SGDClassifier(16, 6, hidden=(8,))

    class Integrate(ContinualCallback):  # -g * delta theta summed by hand, with copies
        def __init__(self):
            super().__init__()
            self.path, self.before, self.grads = None, None, None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.before = [p.detach().clone() for p in pl_module.parameters()]
            self.grads = [p.grad.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            deltas = [p.detach() - b for p, b in zip(pl_module.parameters(), self.before, strict=True)]
            step = [-g * d for g, d in zip(self.grads, deltas, strict=True)]
            self.path = step if self.path is None else [a + s for a, s in zip(self.path, step, strict=True)]

    reference = Integrate()
    start = [p.detach().clone() for p in model.parameters()]
    trainer(1, [si, reference]).fit(model, train_loader(split_stream[0]))
    for (name, param), path, begin in zip(model.named_parameters(), reference.path, start, strict=True):
        expected = (path / ((param.detach() - begin).square() + 0.1)).clamp_min(0)
        torch.testing.assert_close(si.importance[name], expected, atol=1e-6, rtol=1e-4)


def test_padding_gives_new_rows_no_penalty_before_they_are_consolidated(split_stream):
    ewc = EWC(lambda_=10.0)
    model = SGDClassifier(16, 4, hidden=(8,))
    trainer(1, [ewc]).fit(model, train_loader(split_stream[0]))
    grown = nn.Linear(8, 6)
    with torch.no_grad():
        grown.weight[:4], grown.bias[:4] = model.net[2].weight, model.net[2].bias
    model.net[2] = grown
    ewc._build_terms(model)
    weight_term, offset = ewc._terms[id(model.net[2].weight)]
    assert weight_term.shape == (6, 8) and torch.count_nonzero(weight_term[4:]) == 0
    assert torch.count_nonzero(offset[4:]) == 0 and torch.count_nonzero(weight_term[:4]) > 0


def test_task_free_consolidation_every_n_steps(split_stream):
    class Counting(EWC):
        consolidations = 0

        def consolidate(self, trainer, pl_module):
            type(self).consolidations += 1
            super().consolidate(trainer, pl_module)

    ewc = Counting(lambda_=10.0, mode="online", decay=0.5, consolidate_every_n_steps=4, importance_samples=16)
    model = MLPClassifier(16, 6, hidden=(8,))
    trainer(1, [ewc]).fit(model, train_loader(split_stream[0]))  # 12 steps: at 4, 8, 12, then the task end
    assert Counting.consolidations == 4
    assert all(t.sum() > 0 for t in ewc.importance.values())


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EWC(lambda_=-1.0), r"`lambda_` must be a finite number >= 0"),
        (lambda: EWC(lambda_=float("nan")), r"`lambda_` must be a finite number >= 0"),
        (lambda: EWC(mode="joint"), r"`mode` must be 'separate' or 'online'"),
        (lambda: EWC(fisher="exact"), r"`fisher` must be 'empirical' or 'true'"),
        (lambda: EWC(decay=1.5), r"`decay` must be in \[0, 1\]"),
        (lambda: EWC(importance_samples=0), r"`importance_samples` must be a positive integer"),
        (lambda: SI(epsilon=0.0), r"`epsilon` must be > 0"),
        (lambda: MAS(alpha=-0.1), r"`alpha` must be in \[0, 1\]"),
        (lambda: L2Anchor(consolidate_every_n_steps=0), r"`consolidate_every_n_steps` must be a positive integer"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(build, message):
    with pytest.raises(ValueError, match=message):
        build()
