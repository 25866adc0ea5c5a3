"""Every cataloged method on a sharded model: FSDP2 (``fully_shard``) under Lightning's ``ModelParallelStrategy``, on 2
CPU processes (gloo), with the same data as the DDP run of the conformance suite. Each method must

- train 2 tasks and end with the weights and the accuracy of its DDP run on the same data (within 0.02; the
  weights to 1e-5), under 32-true and under bf16-mixed;
- resume from a checkpoint saved in the middle of its second task, distributed (a folder of shards) and full (one
  file), in a new model with new callback instances, and end exactly where the uninterrupted sharded run ends; the
  same for one job per task, each from the last job's ``TaskCheckpoint``;
- select parameters by name (FreezeLayers, LoRA, WeightMerging's ``exclude``) as it does unsharded;
- keep per-parameter state sharded like the parameters (a rank holds half of it) and gather it whole into a
  checkpoint, the same on both ranks.

And, for the methods built on per-sample gradients and gradient terms:

- EWC's Fisher and MAS's importance from 2 ranks equal the single-process estimate on the same rows (1e-5 relative);
- EWC's gradient term on the sharded parameters equals the autograd gradient of its penalty (1e-6).

Strategies a method cannot work under are refused at setup, naming ModelParallelStrategy. All of it runs in one
process group of 2 workers, started once for the module (``run_like_torchrun``).
"""

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from harness import (
    QUIET,
    assert_same_state,
    assert_same_weights,
    run_like_torchrun,
    stream_for,
    tiny_mlp,
    train_loader,
)
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from lightning_incremental import (
    EWC,
    MAS,
    ContinualEvaluation,
    ExperienceReplay,
    FreezeLayers,
    GrowHeads,
    LoRA,
    MLPClassifier,
    TaskCheckpoint,
    WeightMerging,
)
from lightning_incremental.catalog import MethodSpec, registry
from lightning_incremental.core import local, shard_of
from lightning_incremental.core.per_sample import per_sample_grad_sums

METHODS = list(registry().values())
TASKS = 2
# selection by name and the merge modes outside the catalog: each must train what it trains unsharded
SELECTIONS = [
    MethodSpec("freeze_last_layer", "partial", "", lambda: [FreezeLayers(train_last=1)]),
    MethodSpec("freeze_by_name", "partial", "", lambda: [FreezeLayers(freeze="net.0.*")]),
    MethodSpec("lora_by_name", "partial", "", lambda: [LoRA(target_modules=["net.0"], train="net.2.*")]),
    MethodSpec("ties_excluding", "fusion", "", lambda: [WeightMerging(mode="ties", exclude="net.2.*")]),
    MethodSpec("magmax", "fusion", "", lambda: [WeightMerging(mode="magmax")]),
]


def sharding(save_distributed_checkpoint: bool = True) -> ModelParallelStrategy:
    return ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint
    )


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, whole (gathered from the shards: every rank calls it)."""
    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
        for name, t in model.state_dict().items()
    }


def fresh(stream, seed: int = 0) -> MLPClassifier:
    """The conformance suite's tiny MLP (it shards itself under ModelParallelStrategy, in configure_model)."""
    L.seed_everything(seed, verbose=False)
    return tiny_mlp(stream)


def fit(epochs: int, callbacks: list[Callback], strategy: Any, **kwargs: Any) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, callbacks=callbacks, strategy=strategy, devices=2, **{**QUIET, **kwargs})


class _Crash(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise KeyError("simulated crash")


class _Gradients(Callback):
    """The local gradient shards at ``on_before_optimizer_step`` (before or after the methods listed before it)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            named = dict(pl_module.named_parameters())
            self.grads = {n: p.grad.full_tensor().clone() for n, p in named.items() if p.grad is not None}
            self.weights = {n: p.full_tensor().detach().clone() for n, p in named.items()}


def _run(spec, stream, sharded: bool, precision: str = "32-true") -> dict[str, Any]:
    model, methods, evaluation = fresh(stream), spec.callbacks(), ContinualEvaluation(stream)
    for task in list(stream_for(spec, stream))[:TASKS]:
        strategy = sharding() if sharded else "ddp"
        fit(2, [*methods, evaluation], strategy, precision=precision).fit(model, train_loader(task))
    return {
        "weights": full_weights(model),
        "row": evaluation.matrix[-1],
        "matrix": evaluation.matrix,
        "methods": [callback.state_dict() for callback in methods],
        "local_state": _local_state_numel(methods),
    }


def _local_state_numel(methods: list[Callback]) -> dict[str, int]:
    """Per method, the entries of its per-parameter state this rank holds."""
    held = {}
    for callback in methods:
        for attribute in getattr(callback, "per_parameter_state", ()):
            held[f"{type(callback).__name__}.{attribute}"] = sum(
                t.numel() for t in getattr(callback, attribute).values()
            )
    return held


def _resumed(spec, stream, save_distributed_checkpoint: bool, directory: Path) -> dict[str, Any]:
    """Crash in the middle of the second task (the first for a closed-form head, which trains only on the first),
    resume from the last epoch's checkpoint in a new model with new callbacks."""
    tasks = list(stream_for(spec, stream))[:TASKS]
    crashed = 0 if spec.family == "pretrained" else 1
    model, methods, evaluation = fresh(stream), spec.callbacks(), ContinualEvaluation(stream)
    for task in tasks[:crashed]:
        fit(2, [*methods, evaluation], sharding()).fit(model, train_loader(task))
    checkpoint = ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True)
    crashing = fit(
        2,
        [*methods, evaluation, checkpoint, _Crash()],
        sharding(save_distributed_checkpoint),
        enable_checkpointing=True,
    )
    with pytest.raises(KeyError, match="simulated crash"):
        crashing.fit(model, train_loader(tasks[crashed]))
    model, methods, evaluation = fresh(stream, seed=123), spec.callbacks(), ContinualEvaluation(stream)
    L.seed_everything(0, verbose=False)  # the job's seed, which the distributed sampler's order follows
    for index, task in enumerate(tasks[crashed:]):
        path = directory / "epoch=0.ckpt" if index == 0 else None
        fit(2, [*methods, evaluation], sharding()).fit(model, train_loader(task), ckpt_path=path)
    return {"weights": full_weights(model), "matrix": evaluation.matrix}


def _as_jobs(spec, stream, save_distributed_checkpoint: bool, directory: Path) -> dict[str, Any]:
    """One job per task: a new model and new callbacks each time, from the last job's ``TaskCheckpoint``."""
    for index, task in enumerate(list(stream_for(spec, stream))[:TASKS]):
        model = fresh(stream, seed=100 * index)  # the first job builds the initial model, the others load theirs
        methods, evaluation = spec.callbacks(), ContinualEvaluation(stream)
        L.seed_everything(0, verbose=False)  # the job's seed
        checkpoint = TaskCheckpoint(dirpath=directory)
        trainer = fit(
            2, [*methods, evaluation, checkpoint], sharding(save_distributed_checkpoint), enable_checkpointing=True
        )
        trainer.fit(model, train_loader(task), ckpt_path=directory / "last.ckpt" if index else None)
    return {"weights": full_weights(model), "matrix": evaluation.matrix}


def _importances(stream) -> dict[str, Any]:
    """EWC's Fisher and MAS's importance after one sharded task, with the weights they were estimated at."""
    found = {}
    for method in (EWC(), MAS()):
        model = fresh(stream)
        fit(1, [method], sharding()).fit(model, train_loader(stream[0]))
        found[type(method).__name__] = {"importance": method.state_dict()["importance"], "weights": full_weights(model)}
    return found


def _gradient_term(stream) -> dict[str, Any]:
    """EWC's term in one step of the second task, the weights moved off its anchor first."""
    model, ewc = fresh(stream), EWC(lambda_=50.0)
    fit(1, [ewc], sharding()).fit(model, train_loader(stream[0]))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            local(p).add_(shard_of(0.1 * torch.randn(p.shape, generator=generator), p))
    state = ewc.state_dict()  # the penalty of the next task (its end consolidates again)
    before, after = _Gradients(), _Gradients()
    fit(1, [before, ewc, after], sharding(), max_steps=1).fit(model, train_loader(stream[1]))
    return {
        "weights": before.weights,
        "before": before.grads,
        "after": after.grads,
        "importance": state["importance"],
        "anchor": state["anchor"],
    }


def _refusals(stream) -> dict[str, str]:
    refused = {}
    for name, method, model, strategy in (
        (
            "tensor_parallel",
            EWC(),
            fresh(stream),
            ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
        ),
        ("grow_heads", GrowHeads(), MLPClassifier(16, 2, head="incremental"), sharding()),
        ("lora_per_task", LoRA(module_types=nn.Linear, mode="per_task"), fresh(stream), sharding()),
    ):
        try:
            fit(1, [method], strategy).fit(model, train_loader(stream[0]))
            refused[name] = ""
        except RuntimeError as error:
            refused[name] = str(error)
    return refused


def _worker(rank: int, out_dir: Path) -> None:
    from lightning_incremental.scenarios import synthetic_stream

    stream = synthetic_stream("split", n_tasks=3, classes_per_task=2)
    results: dict[str, Any] = {"methods": {}}
    for spec in METHODS:
        results["methods"][spec.name] = {
            "sharded": _run(spec, stream, sharded=True),
            "ddp": _run(spec, stream, sharded=False),
            "sharded_bf16": _run(spec, stream, sharded=True, precision="bf16-mixed"),
            "ddp_bf16": _run(spec, stream, sharded=False, precision="bf16-mixed"),
            "resumed_distributed": _resumed(spec, stream, True, out_dir / spec.name / "distributed"),
            "resumed_full": _resumed(spec, stream, False, out_dir / spec.name / "full"),
            "jobs": _as_jobs(spec, stream, spec.name[0] < "m", out_dir / spec.name / "jobs"),
        }
    results["selections"] = {
        spec.name: {"sharded": _run(spec, stream, sharded=True), "ddp": _run(spec, stream, sharded=False)}
        for spec in SELECTIONS
    }
    results["importances"] = _importances(stream)
    results["gradient_term"] = _gradient_term(stream)
    results["refusals"] = _refusals(stream)
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> tuple[dict[str, Any], dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("sharded")
    run_like_torchrun(_worker, out_dir)
    return tuple(torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))


@pytest.fixture(params=METHODS, ids=[spec.name for spec in METHODS])
def spec(request):
    return request.param


def test_two_sharded_tasks_end_where_ddp_ends(spec, sharded_runs):
    run = sharded_runs[0]["methods"][spec.name]
    sharded, ddp = run["sharded"], run["ddp"]
    assert len(sharded["matrix"]) == TASKS
    assert max(abs(a - b) for a, b in zip(sharded["row"], ddp["row"], strict=True)) <= 0.02
    assert_same_weights(sharded["weights"], ddp["weights"], atol=1e-5)


def test_two_sharded_tasks_under_bf16_mixed_end_where_ddp_ends(spec, sharded_runs):
    run = sharded_runs[0]["methods"][spec.name]
    sharded, ddp = run["sharded_bf16"], run["ddp_bf16"]
    assert max(abs(a - b) for a, b in zip(sharded["row"], ddp["row"], strict=True)) <= 0.02
    assert_same_weights(sharded["weights"], ddp["weights"], atol=1e-4)
    assert all(torch.isfinite(weight).all() for weight in sharded["weights"].values())


def test_one_job_per_task_from_task_checkpoints_ends_where_one_process_ends(spec, sharded_runs):
    # a distributed TaskCheckpoint for the methods named a to l, a full one for the others
    run = sharded_runs[0]["methods"][spec.name]
    assert_same_weights(run["sharded"]["weights"], run["jobs"]["weights"], atol=0)
    assert run["jobs"]["matrix"] == run["sharded"]["matrix"]


@pytest.mark.parametrize("selection", SELECTIONS, ids=[spec.name for spec in SELECTIONS])
def test_selection_by_name_trains_what_it_trains_unsharded(selection, sharded_runs):
    run = sharded_runs[0]["selections"][selection.name]
    assert_same_weights(run["sharded"]["weights"], run["ddp"]["weights"], atol=1e-5)
    assert run["sharded"]["matrix"] == run["ddp"]["matrix"]


@pytest.mark.parametrize("kind", ["distributed", "full"])
def test_a_mid_task_resume_ends_exactly_where_the_uninterrupted_run_ends(spec, sharded_runs, kind):
    run = sharded_runs[0]["methods"][spec.name]
    assert_same_weights(run["sharded"]["weights"], run[f"resumed_{kind}"]["weights"], atol=0)
    assert run[f"resumed_{kind}"]["matrix"] == run["sharded"]["matrix"]


def test_state_is_sharded_on_the_ranks_and_whole_in_the_checkpoint(spec, sharded_runs):
    ranks = [sharded["methods"][spec.name]["sharded"] for sharded in sharded_runs]
    ddp = sharded_runs[0]["methods"][spec.name]["ddp"]
    for attribute, held in ranks[0]["local_state"].items():  # a rank holds about half of the whole state
        whole = ddp["local_state"][attribute]
        assert held + ranks[1]["local_state"][attribute] == whole
        assert held <= 0.55 * whole, f"{attribute}: rank 0 holds {held} of {whole} entries"
    # rank 0's state_dict, the one Lightning saves, is whole: the DDP run's state
    assert_same_state(ranks[0]["methods"], ddp["methods"], atol=1e-5)


@pytest.mark.parametrize("method", ["EWC", "MAS"])
def test_importance_from_two_ranks_equals_the_single_process_estimate(method, sharded_runs, split_stream):
    found = sharded_runs[0]["importances"][method]
    model = tiny_mlp(split_stream)
    model.load_state_dict(found["weights"])
    model.eval()
    inputs, targets = (torch.stack(column) for column in zip(*split_stream[0].train, strict=True))
    if method == "EWC":  # the empirical Fisher: squared per-sample gradients of the loss
        loss, reduction = (lambda out, batch: F.cross_entropy(out, batch[1], reduction="none")), "square"
    else:  # MAS: absolute per-sample gradients of the squared output norm
        loss, reduction = (lambda out, batch: out.square().sum(-1)), "abs"
    sums, count = per_sample_grad_sums(model, [(inputs, targets)], loss, lambda m, b: m(b[0]), reduction=reduction)
    assert count == len(split_stream[0].train)
    for name, total in sums.items():
        torch.testing.assert_close(found["importance"][name], total / count, rtol=1e-5, atol=1e-12)


def test_the_gradient_term_on_sharded_parameters_is_the_penalty_s_autograd_gradient(sharded_runs):
    found = sharded_runs[0]["gradient_term"]
    for name, weight in found["weights"].items():
        theta = weight.clone().requires_grad_(True)
        penalty = 0.5 * 50.0 * (found["importance"][name] * (theta - found["anchor"][name]).square()).sum()
        (expected,) = torch.autograd.grad(penalty, theta)
        assert expected.abs().max() > 1e-4  # the weights were moved off the anchor: a term to compare
        torch.testing.assert_close(found["after"][name] - found["before"][name], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("refusal", "names"),
    [
        ("tensor_parallel", ["tensor_parallel_size", "ModelParallelStrategy(data_parallel_size"]),
        ("grow_heads", ["GrowHeads", "ModelParallelStrategy"]),
        ("lora_per_task", ["mode='per_task'", "mode='merge'"]),
    ],
)
def test_what_cannot_run_sharded_is_refused_with_the_fix(refusal, names, sharded_runs):
    message = sharded_runs[0]["refusals"][refusal]
    assert all(name in message for name in names), message


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
@pytest.mark.parametrize("method", [EWC, ExperienceReplay])
def test_fsdp1_and_deepspeed_are_refused_at_setup_naming_model_parallel_strategy(strategy, method, split_stream):
    # neither runs on a CPU machine (FSDPStrategy asks for CUDA, DeepSpeed is not installed): a Trainer stand-in
    callback = method()
    trainer = types.SimpleNamespace(strategy=object.__new__(strategy), callbacks=[callback])
    with pytest.raises(RuntimeError, match=r"ModelParallelStrategy\(data_parallel_size=<devices>"):
        callback.setup(trainer, tiny_mlp(split_stream), "fit")


def test_the_example_runs_under_lightning_s_own_launcher():
    # `python train.py`: Lightning starts the second process by running the script again (no torchrun)
    example = Path(__file__).parents[1] / "examples" / "sharded_fsdp" / "train.py"
    done = subprocess.run(
        [sys.executable, str(example), "--epochs", "1"], capture_output=True, text=True, timeout=300, check=True
    )
    assert "rank 0 holds EWC's importance of net.0.weight as a (128, 64) shard of (256, 64)" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert len(rows) == 5  # one row of the accuracy matrix per task
