"""WeightMerging: the interpolation and the running average against hand-computed weights, BatchNorm buffers,
the first task; the task-vector merges (task arithmetic, TIES, DARE, MagMax, Fisher) against direct
computations from the stored task vectors, their memory over 1 and 5 tasks, their checkpoints (the active
mode's state alone), the Fisher taken from EWC or from any other Fisher source; argument errors."""

import functools
import io
import math

import pytest
import torch
from harness import tiny_model, train_loader, trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_incremental.core import ContinualCallback, FisherSource
from lightning_incremental.heads import GrowHeads
from lightning_incremental.methods.fusion import WeightMerging
from lightning_incremental.methods.fusion.functional import drop_and_rescale, ties_merge, ties_update, trim_top_k
from lightning_incremental.methods.regularization import EWC
from lightning_incremental.models import MLPClassifier
from lightning_incremental.scenarios import synthetic_stream


class TrainedWeights(Callback):
    """Placed before WeightMerging: records the weights at the end of every task, before the merge."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_end(self, trainer, pl_module) -> None:
        self.weights.append({name: t.detach().clone() for name, t in pl_module.state_dict().items()})


class BNClassifier(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(16, 6, hidden=(), lr=1e-2)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 6))


def _run(model: nn.Module, merge: WeightMerging, tasks) -> tuple[list[dict], list[dict]]:
    """The trained (pre-merge) and the final (merged) weights of every task."""
    trained, merged = TrainedWeights(), []
    for task in tasks:
        trainer(1, [trained, merge]).fit(model, train_loader(task))
        merged.append({name: t.detach().clone() for name, t in model.state_dict().items()})
    return trained.weights, merged


def test_the_first_task_keeps_its_trained_weights(split_stream):
    for mode in ("interpolate", "average"):
        trained, merged = _run(tiny_model(split_stream), WeightMerging(mode=mode), [split_stream[0]])
        assert all(torch.equal(merged[0][name], trained[0][name]) for name in trained[0]), mode


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.25])
def test_interpolation_matches_the_hand_computed_weights(split_stream, alpha):
    trained, merged = _run(tiny_model(split_stream), WeightMerging(alpha=alpha), list(split_stream)[:2])
    old, new = merged[0], trained[1]  # the weights at the start of task 1 and after training it
    for name in old:
        expected = (1 - alpha) * old[name].double() + alpha * new[name].double()
        if alpha in (0.0, 1.0):  # the endpoints are exact
            assert torch.equal(merged[1][name], old[name] if alpha == 0 else new[name]), name
        torch.testing.assert_close(merged[1][name].double(), expected, atol=1e-7, rtol=0)
        assert alpha in (0.0, 1.0) or not torch.equal(old[name], new[name])  # the merge had work to do


def test_the_running_average_is_the_mean_of_the_post_task_weights(split_stream):
    merge = WeightMerging(mode="average")
    trained, merged = _run(tiny_model(split_stream), merge, split_stream)
    for k in range(1, 4):
        for name in trained[0]:
            mean = torch.stack([trained[i][name].double() for i in range(k)]).mean(0)
            torch.testing.assert_close(merged[k - 1][name].double(), mean, atol=1e-6, rtol=0)
    assert merge.averaged_tasks == 3
    assert not torch.equal(merged[2]["net.0.weight"], trained[2]["net.0.weight"])


def test_batchnorm_statistics_are_merged_and_the_batch_count_is_the_new_one(split_stream):
    trained, merged = _run(BNClassifier(), WeightMerging(alpha=0.5), list(split_stream)[:2])
    for name in ("net.1.running_mean", "net.1.running_var", "net.1.weight"):
        torch.testing.assert_close(merged[1][name], (merged[0][name] + trained[1][name]) / 2, atol=1e-6, rtol=1e-6)
        assert not torch.equal(merged[1][name], trained[1][name])
    assert int(merged[0]["net.1.num_batches_tracked"]) == 12
    assert int(merged[1]["net.1.num_batches_tracked"]) == int(trained[1]["net.1.num_batches_tracked"]) == 24


def test_a_model_that_changes_shape_during_a_task_is_an_error(split_stream):
    class GrowHead(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            pl_module.net[2] = nn.Linear(32, 7)

    model, merge = tiny_model(split_stream), WeightMerging()
    trainer(1, [merge]).fit(model, train_loader(split_stream[0]))
    with pytest.raises(RuntimeError, match=r"tensors changed during the task \(net\.2\.bias, net\.2\.weight\)"):
        trainer(1, [GrowHead(), merge]).fit(model, train_loader(split_stream[1]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, r"`alpha` must be in \[0, 1\]"),
        ({"alpha": 1.5}, r"`alpha` must be in \[0, 1\]"),
        ({"alpha": float("nan")}, r"`alpha` must be in \[0, 1\]"),
        ({"mode": "mean"}, "`mode` must be one of 'interpolate', 'average', .*'fisher', got 'mean'"),
        ({"mode": "ties", "scale": 0.0}, r"`scale` must be a finite number > 0"),
        ({"mode": "task_arithmetic", "scale": float("inf")}, r"`scale` must be a finite number > 0"),
        ({"mode": "ties", "top_k": 0.0}, r"`top_k` must be in \(0, 1\]"),
        ({"mode": "ties", "top_k": 20}, r"`top_k` must be in \(0, 1\] \(the fraction of each task vector"),
        ({"mode": "dare", "drop_prob": 1.0}, r"`drop_prob` must be in \[0, 1\)"),
        ({"mode": "dare", "drop_prob": -0.1}, r"`drop_prob` must be in \[0, 1\)"),
        ({"mode": "dare", "seed": -1}, "`seed` must be an integer >= 0, got -1"),
        ({"mode": "dare", "seed": 1.5}, "`seed` must be an integer >= 0, got 1.5"),
        ({"mode": "fisher", "fisher_floor": 0.0}, r"`fisher_floor` must be a finite number > 0 .*1e-6"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightMerging(**kwargs)


# ---------------------------------------------------------------------------------------------- task vectors
FIVE_TASKS = synthetic_stream("split", n_tasks=5, classes_per_task=2)
FLOOR = 1e-6
COPIES = {"interpolate": 0, "average": 1, "task_arithmetic": 2, "dare": 2, "magmax": 2, "ties": 5, "fisher": 3}


class RecordingEWC(EWC):
    """EWC that also keeps the Fisher it estimated at every task end."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fishers: list[dict[str, torch.Tensor]] = []

    def estimate_importance(self, trainer, pl_module):
        fisher = super().estimate_importance(trainer, pl_module)
        self.fishers.append({name: f.detach().clone() for name, f in fisher.items()})
        return fisher


class FiveTaskRun:
    """One mode over the five-task stream: the weights before, after training and after merging every task."""

    def __init__(self, mode: str, ewc: EWC | None = None, **kwargs) -> None:
        model = tiny_model(FIVE_TASKS)
        self.merge, self.ewc, self.states = WeightMerging(mode=mode, **kwargs), ewc, []
        self.initial = {name: t.detach().clone() for name, t in model.state_dict().items()}
        recorder = TrainedWeights()
        self.merged = []
        for task in FIVE_TASKS:
            callbacks = [recorder, self.merge] if ewc is None else [ewc, recorder, self.merge]
            trainer(1, callbacks).fit(model, train_loader(task))
            self.merged.append({name: t.detach().clone() for name, t in model.state_dict().items()})
            self.states.append(self.merge.state_dict())
        self.trained = recorder.weights

    def task_vectors(self) -> list[dict[str, torch.Tensor]]:
        """``tau_t = theta_t - theta_0`` in fp32, as the callback computes it."""
        return [{name: t[name].float() - self.initial[name].float() for name in self.initial} for t in self.trained]

    def assert_merged(self, expected_vectors: list[dict[str, torch.Tensor]], scale: float, atol: float = 1e-6) -> None:
        """After every task the model is ``theta_0 + scale * m_t`` for the expected merged task vectors ``m_t``."""
        for t, expected in enumerate(expected_vectors):
            for name in self.initial:
                reference = self.initial[name].double() + scale * expected[name].double()
                torch.testing.assert_close(self.merged[t][name].double(), reference, atol=atol, rtol=0)


@functools.cache
def five_task_run(mode: str) -> FiveTaskRun:
    if mode == "fisher":
        return FiveTaskRun(mode, ewc=RecordingEWC(lambda_=100.0))
    return FiveTaskRun(mode, **({"scale": 0.3} if mode in ("task_arithmetic", "dare") else {}))


def _flat(vector: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in vector.values()])


def _unflat(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    parts = torch.split(flat, [t.numel() for t in like.values()])
    return {name: part.view_as(like[name]) for name, part in zip(like, parts, strict=True)}


def _prefixes(vectors: list) -> list[list]:
    return [vectors[: t + 1] for t in range(len(vectors))]


def test_task_arithmetic_is_the_base_plus_the_scaled_sum_of_the_task_vectors():
    run = five_task_run("task_arithmetic")
    taus = run.task_vectors()
    sums = [{name: sum(tau[name].double() for tau in prefix) for name in run.initial} for prefix in _prefixes(taus)]
    run.assert_merged(sums, scale=0.3)
    assert not torch.allclose(run.merged[-1]["net.0.weight"], run.trained[-1]["net.0.weight"], atol=1e-3)


def _ties_at_once(taus: list[dict[str, torch.Tensor]], top_k: float) -> dict[str, torch.Tensor]:
    """TIES over all task vectors at once, as Yadav et al. write it: a (tasks x entries) matrix."""
    vectors = torch.stack([_flat(tau) for tau in taus])
    n = vectors.shape[1]
    thresholds = vectors.abs().kthvalue(n - math.ceil(top_k * n) + 1, dim=1, keepdim=True).values
    trimmed = (vectors * (vectors.abs() >= thresholds)).double()
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = 1.0 if sign.sum() >= 0 else -1.0
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    return _unflat((trimmed * agree).sum(0) / agree.sum(0).clamp(min=1), taus[0])


def test_ties_one_task_at_a_time_equals_ties_over_all_task_vectors_at_once():
    run = five_task_run("ties")
    taus = run.task_vectors()
    run.assert_merged([_ties_at_once(prefix, 0.2) for prefix in _prefixes(taus)], scale=1.0)
    kept = torch.stack([(_flat(trim_top_k(tau, 0.2)) != 0).float().mean() for tau in taus])
    torch.testing.assert_close(kept, torch.full_like(kept, 0.2), atol=1e-3, rtol=0)


def test_ties_statistics_settle_sign_conflicts_as_the_all_at_once_election():
    generator = torch.Generator().manual_seed(0)
    taus = [{"a": torch.randn(50, generator=generator), "b": torch.randn(4, 5, generator=generator)} for _ in range(6)]
    for t, tau in enumerate(taus):  # entry a[0]: +5 and -5 kept in tasks 0 and 1, nothing elsewhere: a zero total
        tau["a"][0] = {0: 5.0, 1: -5.0}.get(t, 0.0)
    statistics = {}
    for t, prefix in enumerate(_prefixes(taus)):
        merged = ties_merge(ties_update(statistics, trim_top_k(taus[t], 0.3)))
        expected = _ties_at_once(prefix, 0.3)
        for name in merged:
            torch.testing.assert_close(merged[name].double(), expected[name], atol=1e-6, rtol=0)
    trimmed = torch.stack([_flat(trim_top_k(tau, 0.3)) for tau in taus])
    assert ((trimmed > 0).any(0) & (trimmed < 0).any(0)).sum() >= 10  # the election had conflicts to settle
    plain_mean = trimmed.sum(0) / (trimmed != 0).sum(0).clamp(min=1)
    assert (_flat(merged) - plain_mean).abs().max() > 0.5  # and the disjoint mean differs from the plain one
    majority = 1.0 if torch.sign(trimmed.sum(0)).sum() >= 0 else -1.0
    assert merged["a"][0].item() == 5.0 * majority  # the zero total took the majority's sign


def test_trim_keeps_the_top_k_fraction_over_the_whole_task_vector():
    vector = {"a": torch.tensor([0.5, -3.0, 0.1, 2.0]), "b": torch.tensor([[-1.0, 0.2], [4.0, -0.3]])}
    trimmed = trim_top_k(vector, 3 / 8)  # the 3 largest magnitudes of 8: 4, -3, 2
    assert trimmed["a"].tolist() == [0.0, -3.0, 0.0, 2.0]
    assert trimmed["b"].tolist() == [[0.0, 0.0], [4.0, 0.0]]
    assert trim_top_k(vector, 0.3)["b"].tolist() == [[0.0, 0.0], [4.0, 0.0]]  # ceil(0.3 * 8) = 3 as well
    assert trim_top_k(vector, 1.0)["a"].tolist() == vector["a"].tolist()


def test_dare_merge_is_the_scaled_sum_of_the_dropped_task_vectors_drawn_from_the_seed():
    run = five_task_run("dare")
    generator = torch.Generator().manual_seed(0)
    dropped = [drop_and_rescale(tau, 0.5, generator) for tau in run.task_vectors()]
    sums = [{name: sum(d[name].double() for d in prefix) for name in run.initial} for prefix in _prefixes(dropped)]
    run.assert_merged(sums, scale=0.3)
    fraction_kept = (_flat(dropped[0]) != 0).float().mean()
    assert 0.45 < fraction_kept < 0.55


def test_dare_is_reproducible_per_seed():
    tasks = list(FIVE_TASKS)[:2]

    def final_weights(seed: int) -> torch.Tensor:
        model, merge = tiny_model(FIVE_TASKS), WeightMerging(mode="dare", drop_prob=0.5, seed=seed, scale=0.5)
        for task in tasks:
            trainer(1, [merge]).fit(model, train_loader(task))
        return model.net[0].weight.detach().clone()

    first, again, other = final_weights(0), final_weights(0), final_weights(1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-3)


def test_dare_is_unbiased_in_expectation():
    tau = torch.tensor([0.5, -2.0, 1.0, 3.0, -0.25])
    copies = 200_000
    dropped = drop_and_rescale({"w": tau.repeat(copies)}, 0.7, torch.Generator().manual_seed(0))["w"].view(copies, 5)
    kept = dropped != 0
    assert torch.equal(dropped[kept], (tau.expand(copies, 5) / 0.3)[kept])  # the kept entries, rescaled exactly
    standard_error = tau.abs() * math.sqrt(0.7 / 0.3) / math.sqrt(copies)
    assert ((dropped.mean(0) - tau).abs() < 4 * standard_error).all()
    assert abs(kept.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / kept.numel())


def test_magmax_picks_the_task_vector_of_largest_magnitude_per_entry():
    run = five_task_run("magmax")
    taus = run.task_vectors()
    expected = []
    for prefix in _prefixes(taus):
        stacked = torch.stack([_flat(tau) for tau in prefix])
        largest = len(prefix) - 1 - stacked.abs().flip(0).argmax(0)  # the later task on a tie
        expected.append(_unflat(stacked.gather(0, largest.unsqueeze(0)).squeeze(0), taus[0]))
    run.assert_merged(expected, scale=1.0)
    assert len(largest.unique()) >= 3  # after five tasks the entries come from several tasks, not just the last


@pytest.mark.parametrize("ewc_kwargs", [{"lambda_": 100.0}, {"lambda_": 0.0, "mode": "online", "decay": 0.5}])
def test_fisher_merging_is_the_fisher_weighted_mean_of_the_trained_weights_with_ewcs_fisher(ewc_kwargs):
    run = five_task_run("fisher") if ewc_kwargs["lambda_"] else FiveTaskRun("fisher", ewc=RecordingEWC(**ewc_kwargs))
    fishers = run.ewc.fishers
    assert len(fishers) == 5 and fishers[0].keys() == run.initial.keys()
    for t in range(5):
        for name in run.initial:
            weights = [fishers[s][name].double().clamp(min=FLOOR) for s in range(t + 1)]
            mean = sum(w * run.trained[s][name].double() for s, w in enumerate(weights)) / sum(weights)
            torch.testing.assert_close(run.merged[t][name].double(), mean, atol=2e-6, rtol=0)
    name = "net.0.weight"  # the Fisher weighting differs from the plain mean of the trained weights
    plain = sum(run.trained[s][name] for s in range(5)) / 5
    assert (run.merged[4][name] - plain).abs().max() > 1e-2


def test_fisher_merging_without_ewc_is_an_error_naming_the_fix():
    with pytest.raises(
        RuntimeError, match=r"has no Fisher source\. Add one before it: callbacks=\[EWC\(\.\.\.\), Weight"
    ):
        trainer(1, [WeightMerging(mode="fisher")]).fit(tiny_model(FIVE_TASKS), train_loader(FIVE_TASKS[0]))


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (lambda merge: [merge, EWC()], r"comes before EWC .* Put EWC first: callbacks=\[EWC\(\.\.\.\), WeightMerging"),
        (lambda merge: [EWC(), EWC(), merge], r"found 2 Fisher sources in this Trainer \(EWC, EWC\) .* keep one"),
        (lambda merge: [EWC(consolidate_every_n_steps=5), merge], r"Use EWC\(consolidate_every_n_steps=None\)"),
    ],
    ids=["ewc-after", "two-ewcs", "task-free-ewc"],
)
def test_fisher_merging_refuses_an_ewc_it_cannot_use(callbacks, match):
    merge, model = WeightMerging(mode="fisher"), tiny_model(FIVE_TASKS)
    with pytest.raises(RuntimeError, match=match):
        trainer(1, callbacks(merge)).fit(model, train_loader(FIVE_TASKS[0]))


def _tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for value in state.values() for t in _tensors(value)]
    return []


@pytest.mark.parametrize("mode", list(COPIES))
def test_the_state_held_between_tasks_does_not_grow_with_the_number_of_tasks(mode):
    run = five_task_run(mode)
    model_tensors = [t for t in run.initial.values() if t.is_floating_point()]
    model_bytes = sum(t.numel() * 4 for t in model_tensors)
    generators = int(mode == "dare")  # DARE's generator state, the only other tensor
    generator_bytes = torch.Generator().get_state().nbytes
    after_one, after_five = (_tensors(run.states[t]) for t in (0, 4))
    assert len(after_one) == len(after_five) == COPIES[mode] * len(model_tensors) + generators
    held = [sum(t.nbytes for t in tensors) for tensors in (after_one, after_five)]
    assert held == [COPIES[mode] * model_bytes + generators * generator_bytes] * 2


@pytest.mark.parametrize("mode", ["task_arithmetic", "ties", "dare", "magmax", "fisher"])
def test_the_state_is_fp32_on_the_cpu_and_loads_with_weights_only(mode):
    state = five_task_run(mode).states[-1]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert all(t.device.type == "cpu" for t in _tensors(loaded))
    assert {t.dtype for t in loaded["base"].values()} == {torch.float32}
    assert loaded["statistics"]
    assert {t.dtype for statistic in loaded["statistics"].values() for t in statistic.values()} == {torch.float32}


class _Crash(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise KeyError("simulated crash")


@pytest.mark.parametrize("mode", ["task_arithmetic", "ties", "dare", "magmax", "fisher"])
def test_a_fit_resumed_mid_task_merges_as_the_uninterrupted_one(mode, tmp_path):
    tasks = list(FIVE_TASKS)[:2]

    def methods() -> list[Callback]:
        merge = WeightMerging(mode=mode, scale=0.5, drop_prob=0.3, seed=7)
        return [EWC(lambda_=10.0), merge] if mode == "fisher" else [merge]

    model, callbacks = tiny_model(FIVE_TASKS), methods()
    for task in tasks:
        trainer(2, callbacks).fit(model, train_loader(task))
    uninterrupted = {name: t.detach().clone() for name, t in model.state_dict().items()}

    model, callbacks = tiny_model(FIVE_TASKS), methods()
    trainer(2, callbacks).fit(model, train_loader(tasks[0]))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True)
    with pytest.raises(KeyError, match="simulated crash"):
        trainer(2, [*callbacks, checkpoint, _Crash()], enable_checkpointing=True).fit(model, train_loader(tasks[1]))

    model, callbacks = tiny_model(FIVE_TASKS, seed=123), methods()  # a new process
    trainer(2, callbacks).fit(model, train_loader(tasks[1]), ckpt_path=tmp_path / "epoch=0.ckpt")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, uninterrupted[name], atol=1e-6, rtol=0, msg=name)


def test_task_arithmetic_moves_away_by_one_plus_scale_per_task_when_a_task_changes_nothing():
    model, merge = tiny_model(FIVE_TASKS), WeightMerging(mode="task_arithmetic", scale=0.5)
    initial = model.net[0].weight.detach().clone()
    offsets = []
    for task in list(FIVE_TASKS)[:3]:
        trainer(1, [merge]).fit(model, train_loader(task))
        offsets.append(model.net[0].weight.detach() - initial)
        model.lr = 0.0  # the later tasks train nothing: tau_t is the merged offset of the earlier ones
    torch.testing.assert_close(offsets[1], 1.5 * offsets[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(offsets[2], 1.5 * offsets[1], atol=1e-6, rtol=0)


def test_a_model_that_changes_shape_between_tasks_is_an_error_for_task_vectors(split_stream):
    class GrowHead(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            pl_module.net[2] = nn.Linear(32, 7)

    model, merge = tiny_model(split_stream), WeightMerging(mode="magmax")
    trainer(1, [merge]).fit(model, train_loader(split_stream[0]))
    with pytest.raises(RuntimeError, match=r"tensors changed since the first task \(net\.2\.bias, net\.2\.weight\)"):
        trainer(1, [GrowHead(), merge]).fit(model, train_loader(split_stream[1]))


@pytest.mark.parametrize("mode", ["task_arithmetic", "fisher"])
def test_a_head_added_for_a_new_task_keeps_its_trained_value_and_joins_the_base(mode):
    stream = synthetic_stream(n_tasks=3, task_labels=True)
    model = MLPClassifier(16, stream.num_classes, hidden=(8,), head="multihead", lr=1e-2)
    callbacks = [GrowHeads(), *([EWC()] if mode == "fisher" else []), WeightMerging(mode=mode, scale=0.3)]
    trained, merge = TrainedWeights(), callbacks[-1]
    for task in stream:
        trainer(1, [*callbacks[:-1], trained, merge]).fit(model, train_loader(task))
    merged = model.state_dict()
    new_head = "net.2.heads.2.weight"  # added at the start of the last task: its trained value, unmerged
    assert new_head not in trained.weights[1]
    assert torch.equal(merged[new_head], trained.weights[2][new_head])
    assert torch.equal(merge.base["net.2.heads.1.weight"], trained.weights[1]["net.2.heads.1.weight"])
    assert not torch.allclose(merged["net.0.weight"], trained.weights[2]["net.0.weight"], atol=1e-4)  # merged


@pytest.mark.parametrize("mode", ["interpolate", "average", "ties", "fisher"])
def test_excluded_tensors_keep_their_trained_values_and_the_rest_is_merged(split_stream, mode):
    model = tiny_model(split_stream)
    callbacks = [*([EWC(lambda_=0.0)] if mode == "fisher" else []), WeightMerging(mode=mode, exclude="net.2.*")]
    trained, merged = TrainedWeights(), []
    for task in list(split_stream)[:2]:
        trainer(1, [*callbacks[:-1], trained, callbacks[-1]]).fit(model, train_loader(task))
        merged.append({name: t.detach().clone() for name, t in model.state_dict().items()})
    for name in ("net.2.weight", "net.2.bias"):
        assert torch.equal(merged[1][name], trained.weights[1][name])
        assert all(name not in state for state in callbacks[-1].state_dict().values() if isinstance(state, dict))
    assert not torch.allclose(merged[1]["net.0.weight"], trained.weights[1]["net.0.weight"], atol=1e-5)


def test_an_exclude_pattern_that_matches_no_tensor_names_the_tensors(split_stream):
    with pytest.raises(ValueError, match=r"`exclude` pattern 'head\.\*' matches no tensor of MLPClassifier.*net\.0"):
        trainer(1, [WeightMerging(exclude="head.*")]).fit(tiny_model(split_stream), train_loader(split_stream[0]))


def test_the_state_holds_the_active_modes_fields_alone(split_stream):
    merge = WeightMerging(mode="interpolate")
    for task in list(split_stream)[:2]:
        trainer(1, [merge]).fit(tiny_model(split_stream), train_loader(task))
    common = set(ContinualCallback.state_dict(merge))
    assert set(merge.state_dict()) == common | {"mode", "start_weights"}
    assert set(WeightMerging(mode="dare").state_dict()) == common | {"mode", "base", "statistics", "generator_state"}
    with pytest.raises(AttributeError, match=r"WeightMerging\(mode='interpolate'\) keeps no `statistics`"):
        merge.statistics  # noqa: B018
    with pytest.raises(RuntimeError, match=r"state of WeightMerging\(mode='interpolate'\), which cannot resume"):
        WeightMerging(mode="ties").load_state_dict(merge.state_dict())


class ConstantFisher(Callback):
    """A Fisher source that is not EWC: in task ``t``, the Fisher ``values[t]`` for every parameter of ``model``
    but ``uncovered``."""

    def __init__(self, model: nn.Module, values: list[float], uncovered: str) -> None:
        self.model, self.values, self.uncovered, self.calls = model, values, uncovered, 0

    def check_task_fisher(self) -> None:
        """Every configuration gives one Fisher per task."""

    def task_fisher(self) -> dict[str, torch.Tensor]:
        value = self.values[self.calls]
        self.calls += 1
        named = self.model.named_parameters()
        return {name: torch.full_like(p, value) for name, p in named if name != self.uncovered}


def test_fisher_merging_weights_the_task_vectors_by_any_fisher_source(split_stream):
    model, merge, recorder = tiny_model(split_stream), WeightMerging(mode="fisher"), TrainedWeights()
    source = ConstantFisher(model, [1.0, 3.0], uncovered="net.2.bias")
    assert isinstance(source, FisherSource) and not isinstance(source, EWC)
    initial = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for task in list(split_stream)[:2]:
        trainer(1, [source, recorder, merge]).fit(model, train_loader(task))
    assert source.calls == 2
    first, second = recorder.weights
    for name, tensor in model.state_dict().items():
        if name == "net.2.bias":  # not covered: Fisher 0 in both tasks, only the floor weights it (the plain mean)
            expected = (first[name].double() + second[name].double()) / 2
        else:  # theta_0 + (1 * tau_1 + 3 * tau_2) / (1 + 3)
            taus = [trained[name].double() - initial[name].double() for trained in (first, second)]
            expected = initial[name].double() + (1.0 * taus[0] + 3.0 * taus[1]) / 4.0
        torch.testing.assert_close(tensor.double(), expected, atol=1e-6, rtol=0, msg=name)
    plain_mean = (first["net.0.weight"] + second["net.0.weight"]) / 2
    assert not torch.allclose(model.net[0].weight, plain_mean, atol=1e-4)  # the weighting mattered
