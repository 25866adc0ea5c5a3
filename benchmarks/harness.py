"""Machinery shared by the benchmark scripts: step time of a method over naive fine-tuning, and sweeps.

A sweep runs a grid of configurations through the reference protocol (``lightning_incremental.experiment``) and
returns its table; :func:`sweep_main` writes it to the script's section of the results file (``sections.py``).

Every timing trains a fresh model on a short first task (so that methods have something to
consolidate: an anchor, an old model, a filled buffer) and times the optimizer steps of the second task
with a callback: the time from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, the
methods' hooks, the optimizer step), after a warm-up. Configurations are measured interleaved, ``repeats``
times, and the median is reported, so that the ratio against naive fine-tuning comes from the same run
under the same machine load.
"""

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch import Callback, LightningModule
from sections import add_results_argument, publish
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_incremental.catalog import MethodSpec
from lightning_incremental.experiment import SCENARIOS, make_stream, run_method
from lightning_incremental.models import MLPClassifier

QUIET = {
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}


class StepTimer(Callback):
    """Wall time of every training step after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.durations: list[float] = []
        self._started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.durations.append(time.perf_counter() - self._started)


class TrainableCount(Callback):
    """The number of parameters that require gradients once training starts (after every callback's setup)."""

    def __init__(self) -> None:
        self.count = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.count = max(self.count, sum(p.numel() for p in pl_module.parameters() if p.requires_grad))


def retraining_rows(retrain_seconds: list[float]) -> list[str]:
    """The head of a table of each update's cost against retraining on tasks ``0..t``: the columns, the retraining
    times and the target ratio ``1/(t+1)``; a row per method follows."""
    tasks = range(len(retrain_seconds))
    return [
        "| method | " + " | ".join(f"task {t}" for t in tasks) + " |",
        "|---|" + "---|" * len(retrain_seconds),
        "| retrain on 0..t (s) | " + " | ".join(f"{s:.1f}" for s in retrain_seconds) + " |",
        "| target ratio 1/(t+1) | " + " | ".join(f"{1 / (t + 1):.3f}" for t in tasks) + " |",
    ]


@dataclass
class Workload:
    """A model and two tasks of random data of the given input shape."""

    name: str
    build_model: Callable[[], LightningModule]
    input_shape: tuple[int, ...]
    num_classes: int = 10
    batch_size: int = 128

    def loader(self, task: int, n_batches: int, batch_size: int | None = None) -> DataLoader:
        batch_size = batch_size or self.batch_size
        generator = torch.Generator().manual_seed(task)
        n = n_batches * batch_size
        inputs = torch.randn(n, *self.input_shape, generator=generator)
        labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=False)


class SmallCNN(MLPClassifier):
    """Two conv blocks and a linear head on 1x28x28 inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(in_features=1, num_classes=num_classes, hidden=())
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MLP = Workload("MLP 784-1000-1000-10, batch 128", lambda: MLPClassifier(784, 10, hidden=(1000, 1000)), (784,))
CNN = Workload("small CNN on 1x28x28, batch 128", SmallCNN, (1, 28, 28))


def time_steps(
    workload: Workload,
    build_callbacks: Callable[[], list[Callback]],
    steps: int = 40,
    warmup: int = 5,
    first_task_steps: int = 10,
    batch_size: int | None = None,
) -> float:
    """Median seconds per training step on the second task, with the callbacks ``build_callbacks()``."""
    L.seed_everything(0, verbose=False)
    model, callbacks = workload.build_model(), build_callbacks()
    L.Trainer(max_epochs=1, callbacks=callbacks, **QUIET).fit(model, workload.loader(0, first_task_steps))
    timer = StepTimer(warmup)
    L.Trainer(max_epochs=1, callbacks=[*callbacks, timer], **QUIET).fit(
        model, workload.loader(1, steps + warmup, batch_size)
    )
    return statistics.median(timer.durations)


def compare(
    workload: Workload,
    configurations: dict[str, Callable[[], list[Callback]]],
    repeats: int = 5,
    batch_sizes: dict[str, int] | None = None,
    **kwargs: object,
) -> dict[str, float]:
    """Median step time of every configuration, measured interleaved ``repeats`` times.

    ``configurations`` must hold ``"naive"`` (``lambda: []``), the reference of the ratios. ``batch_sizes``
    gives a configuration a batch size other than the workload's on the timed task.
    """
    samples: dict[str, list[float]] = {name: [] for name in configurations}
    for _ in range(repeats):
        for name, build in configurations.items():
            batch_size = (batch_sizes or {}).get(name)
            samples[name].append(time_steps(workload, build, batch_size=batch_size, **kwargs))  # type: ignore[arg-type]
    return {name: statistics.median(values) for name, values in samples.items()}


def ratio_table(title: str, medians: dict[str, float], reference: str = "naive") -> list[str]:
    """``title``, then a table of the seconds per step and the ratio over ``reference`` of every configuration."""
    lines = [title, "", f"| configuration | ms/step | ratio over {reference} |", "|---|---|---|"]
    lines += [f"| {name} | {s * 1e3:.2f} | {s / medians[reference]:.3f} |" for name, s in medians.items()]
    return [*lines, ""]


def setup_threads() -> None:
    """One thread per process makes the timings repeatable on a shared 2-core machine."""
    torch.set_num_threads(1)


def quiet_lightning() -> None:
    """Lightning's info logs and warnings off (after its import-time setup)."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def quiet_benchmark() -> None:
    """Lightning quiet, one torch thread."""
    quiet_lightning()
    setup_threads()


def timing_args(doc: str) -> argparse.Namespace:
    """The timing scripts' command line (``--repeats``, ``--steps``, ``--results``); quiets Lightning, one thread."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats; the median is reported")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per repeat")
    add_results_argument(parser)
    args = parser.parse_args()
    quiet_benchmark()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    return args


Grid = dict[str, list[tuple[str, Callable[[], list[Callback]]]]]


def sweep_main(doc: str, heading: str, grid: Grid, scenarios: list[str], seeds: int) -> None:
    """The sweep scripts' command line: ``--seeds``, ``--first-seed``, ``--scenarios``, ``--methods``, ``--epochs``,
    ``--results``; the table goes to the section ``heading`` of the results file.

    ``--first-seed 5`` checks defaults chosen on seeds 0 … 4 on seeds they were not chosen on.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=seeds, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed … first-seed+seeds-1")
    parser.add_argument("--scenarios", nargs="+", default=scenarios, choices=list(SCENARIOS))
    parser.add_argument("--methods", nargs="+", default=list(grid), choices=list(grid))
    parser.add_argument("--epochs", type=int, default=10, help="epochs per task (the reference protocol: 10)")
    add_results_argument(parser)
    args = parser.parse_args()
    quiet_lightning()
    seed_range = range(args.first_seed, args.first_seed + args.seeds)
    lines = sweep({name: grid[name] for name in args.methods}, args.scenarios, seed_range, args.epochs)
    publish(args.results, heading, lines)


def sweep(grid: Grid, scenarios: list[str], seeds: range, epochs: int = 10) -> list[str]:
    """A table of the final average accuracy (mean ± std over ``seeds``) and the forgetting (mean) of every
    configuration on every scenario; one line printed per configuration and scenario as it is measured.

    ``grid`` maps a method name to ``(setting, build)`` pairs; ``build()`` returns fresh callbacks, the optimizer's
    state included where the setting carries it. Each run is the reference protocol of ``docs/architecture.md``
    (``lightning_incremental.experiment.run_method``) with the seed changing the model's initialisation and the
    data order.
    """
    print(f"seeds {seeds.start} … {seeds.stop - 1}, {epochs} epochs per task")
    cells: dict[tuple[str, str], list[str]] = {
        (method, setting): [] for method, pairs in grid.items() for setting, _ in pairs
    }
    for scenario in scenarios:
        streams = {seed: make_stream(scenario, 5, seed) for seed in seeds}
        for method, settings in grid.items():
            for setting, build in settings:
                spec = MethodSpec(method, "sweep", "", build, keep_optimizer_state=False)  # the grid decides
                runs = [run_method(spec, stream, epochs=epochs, seed=seed).result for seed, stream in streams.items()]
                accs = [result.summary()["acc"] for result in runs]
                forgetting = statistics.mean(result.summary()["forgetting"] for result in runs)
                spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
                cells[method, setting] += [f"{statistics.mean(accs):.3f} ± {spread:.3f}", f"{forgetting:.3f}"]
                print(
                    f"{scenario:<10} {method:<24} {setting:<28} {cells[method, setting][-2]:>13} {forgetting:>7.3f}",
                    flush=True,
                )
    lines = [
        f"Final average accuracy (mean ± std over seeds {seeds.start} … {seeds.stop - 1}) and forgetting (mean), the "
        f"reference protocol, {epochs} epochs a task.",
        "",
        "| method | setting | " + " | ".join(f"{s}: avg acc | {s}: forgetting" for s in scenarios) + " |",
        "|---|---|" + "---|---|" * len(scenarios),
    ]
    lines += [f"| {method} | {setting} | " + " | ".join(row) + " |" for (method, setting), row in cells.items()]
    return lines
