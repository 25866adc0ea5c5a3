"""The replay, LwF and regularization defaults re-checked on two datasets: permuted digits and permuted Fashion-MNIST.

    python benchmarks/studies/defaults_across_datasets.py                  # the table (about 40 minutes, one core)
    python benchmarks/studies/defaults_across_datasets.py --quick --results /tmp/look.md   # a smoke run: see QUICK

The defaults were chosen on the 8x8 digits (``sweeps/``, ``studies/replay_tradeoff.py``); this script measures them
and their neighbours, in one run, on two domain-incremental streams of 5 tasks:

- permuted digits, the reference protocol of the sweeps (``lightning_incremental.experiment``: scikit-learn's digits,
  1437 train / 360 test rows, MLP 64-256-256-10, Adam 1e-3, batch 32, 10 epochs a task, replay buffer 200, the
  methods' default);
- permuted Fashion-MNIST (``lightning_incremental.scenarios.fashion_mnist_stream``, read from the Debian package
  ``dataset-fashion-mnist``; nothing is downloaded): a class-balanced subsample of ``--train-size`` training and
  ``--test-size`` test images, drawn once with seed 0, the same MLP on 784 inputs, batch 32, 3 epochs a task,
  replay buffer 500.

The settings: ExperienceReplay at ratio 1, 2 and 4; LwF at its default (alpha 0.5, temperature 8) and three
neighbours; EWC, SI and MAS at their default strength, one lower and one higher; naive fine-tuning with and without
the optimizer's state carried. Every method runs with the optimizer's state carried or not as in a user's Trainer
(the method's ``keeps_optimizer_state``, or its catalog entry's ``MethodSpec.keep_optimizer_state``); the defaults
are read from the methods' signatures, so the table marks the package's current ones. Within a dataset and a seed
every setting runs on the same stream and initialisation, one after another, so its wall time and its process CPU
time over naive fine-tuning's (state reset) are taken under the same load, then averaged over the seeds; "vs
default" is the mean ± std of the per-seed differences from the method's default. On a shared machine the wall time
follows the other processes' load; the CPU time of the one-threaded process follows it much less, so the rule reads
the cost from the CPU time.

The rule of the earlier sweeps, per dataset: the cheapest setting within 0.5 points of the method's best mean
accuracy, the cost being the CPU time over naive fine-tuning's. Only the replay ratio changes the cost (rows per
step); for LwF and the regularizers every setting costs
the same, so there the rule keeps the default when it is within 0.5 points of the best and otherwise takes the best.
The verdict over both datasets applies the same rule to the settings within 0.5 points of the best on both; when
none is, it takes the setting whose larger shortfall from the best is smallest. Everything goes to the section
"Defaults across datasets: permuted digits and permuted Fashion-MNIST" of benchmarks/RESULTS.md.
"""

import argparse
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

import torch
from harness import quiet_benchmark
from lightning.pytorch import Callback
from sections import add_results_argument, publish

from lightning_incremental.catalog import MethodSpec, registry
from lightning_incremental.core import optimizer_state_carrier
from lightning_incremental.experiment import make_stream, run_method
from lightning_incremental.methods.distillation import LwF
from lightning_incremental.methods.regularization import EWC, MAS, SI
from lightning_incremental.methods.replay import ExperienceReplay
from lightning_incremental.scenarios import TaskStream, fashion_mnist_stream

HEADING = "Defaults across datasets: permuted digits and permuted Fashion-MNIST"
TOLERANCE = 0.005
COST_VARIES = {"replay"}  # the methods whose settings change the cost of a step (the replay ratio)
# --quick: 1 seed, 2 tasks of 1 epoch, 1000 / 500 Fashion-MNIST rows
QUICK = {"seeds": 1, "tasks": 2, "digits_epochs": 1, "fashion_epochs": 1, "train_size": 1000, "test_size": 500}
FULL = {"seeds": 3, "tasks": 5, "digits_epochs": 10, "fashion_epochs": 3, "train_size": 15000, "test_size": 5000}
TITLES = {"naive": "naive", "replay": "ExperienceReplay", "lwf": "LwF", "ewc": "EWC", "si": "SI", "mas": "MAS"}


def _default(cls: type, parameter: str) -> float:
    return inspect.signature(cls.__init__).parameters[parameter].default


@dataclass(frozen=True)
class Setting:
    """One configuration: ``build(buffer_size)`` returns fresh callbacks; ``keep`` carries the optimizer's state."""

    method: str
    label: str
    build: Callable[[int], list[Callback]]
    keep: bool
    default: bool


def _carries(spec: MethodSpec) -> bool:
    """Whether the entry's run carries the optimizer's state: the entry's own setting, else its methods' defaults."""
    if spec.keep_optimizer_state is not None:
        return spec.keep_optimizer_state
    return optimizer_state_carrier(spec.build()) is not None


def settings() -> list[Setting]:
    """Naive fine-tuning (reset, carried), then every method's grid with its current default marked."""
    keep = {name: _carries(spec) for name, spec in registry().items()}
    grid = [
        Setting("naive", "- (state reset)", lambda buffer: [], False, False),
        Setting("naive", "- (state carried)", lambda buffer: [], True, True),
    ]
    ratio = _default(ExperienceReplay, "ratio")
    for r in sorted({1.0, 2.0, 4.0, ratio}):
        grid.append(
            Setting(
                "replay",
                f"ratio {r:g}",
                lambda buffer, r=r: [ExperienceReplay(buffer_size=buffer, ratio=r)],
                keep["replay"],
                r == ratio,
            )
        )
    alpha, temperature = _default(LwF, "alpha"), _default(LwF, "temperature")
    pairs = {(alpha, temperature), (alpha / 2, temperature), (alpha * 2, temperature), (alpha, temperature / 2)}
    for a, t in sorted(pairs):
        grid.append(
            Setting(
                "lwf",
                f"alpha {a:g} T {t:g}",
                lambda buffer, a=a, t=t: [LwF(alpha=a, temperature=t)],
                keep["lwf"],
                (a, t) == (alpha, temperature),
            )
        )
    strengths = {"ewc": (EWC, (100, 300, 1000)), "si": (SI, (50, 100, 200)), "mas": (MAS, (0.03, 0.1, 0.3))}
    for name, (cls, values) in strengths.items():
        current = _default(cls, "lambda_")
        for lam in sorted({*values, current}):
            grid.append(
                Setting(
                    name,
                    f"lambda {lam:g}",
                    lambda buffer, cls=cls, lam=lam: [cls(lambda_=lam)],
                    keep[name],
                    lam == current,
                )
            )
    return grid


@dataclass
class Dataset:
    """A stream builder by seed, with its epochs a task, replay buffer and a line that says its sizes."""

    name: str
    build: Callable[[int], TaskStream]
    epochs: int
    buffer: int
    description: str


def datasets(args: argparse.Namespace) -> dict[str, Dataset]:
    digits = Dataset(
        "permuted digits",
        lambda seed: make_stream("permuted", args.tasks, seed),
        args.digits_epochs,
        args.digits_buffer,
        f"scikit-learn's 8x8 digits, 1437 train / 360 test rows, {args.tasks} tasks, {args.digits_epochs} epoch(s) a "
        f"task, buffer {args.digits_buffer}, seeds {_seeds_text(args.digits_seeds)}",
    )
    fashion = Dataset(
        "permuted Fashion-MNIST",
        lambda seed: fashion_mnist_stream(
            "permuted", args.tasks, seed, train_size=args.train_size, test_size=args.test_size
        ),
        args.fashion_epochs,
        args.fashion_buffer,
        f"28x28 Fashion-MNIST, a class-balanced subsample of {args.train_size} train / {args.test_size} test images "
        f"(subsample seed 0), {args.tasks} tasks, {args.fashion_epochs} epoch(s) a task, buffer {args.fashion_buffer}, "
        f"seeds {_seeds_text(args.fashion_seeds)}",
    )
    return {key: value for key, value in (("digits", digits), ("fashion", fashion)) if key in args.datasets}


def _seeds_text(seeds: range) -> str:
    return f"{seeds.start}–{seeds.stop - 1}" if len(seeds) > 1 else f"{seeds.start}"


@dataclass
class Cell:
    """One setting on one dataset, per seed: the final average accuracy, forgetting, wall and CPU seconds, and
    both over naive fine-tuning's."""

    acc: list[float]
    forgetting: list[float]
    seconds: list[float]
    cpu_seconds: list[float]
    wall: list[float]
    cpu: list[float]


def measure(dataset: Dataset, grid: list[Setting], seeds: range) -> dict[str, Cell]:
    """Every setting of ``grid`` on every seed's stream, interleaved within a seed; keyed by ``method/label``."""
    cells = {f"{s.method}/{s.label}": Cell([], [], [], [], [], []) for s in grid}
    reference = f"{grid[0].method}/{grid[0].label}"  # naive fine-tuning, state reset
    for seed in seeds:
        stream = dataset.build(seed)
        for setting in grid:
            spec = MethodSpec(setting.method, "study", "", lambda s=setting: s.build(dataset.buffer))
            cpu_started = time.process_time()
            run = run_method(spec, stream, epochs=dataset.epochs, seed=seed, keep_optimizer_state=setting.keep)
            cpu_seconds = time.process_time() - cpu_started
            summary = run.result.summary()
            cell = cells[f"{setting.method}/{setting.label}"]
            cell.acc.append(summary["acc"])
            cell.forgetting.append(summary["forgetting"])
            cell.seconds.append(run.seconds)
            cell.cpu_seconds.append(cpu_seconds)
            print(
                f"{dataset.name:<23} seed {seed} {setting.method:<6} {setting.label:<18} acc {summary['acc']:.4f} "
                f"({run.seconds:5.1f} s, CPU {cpu_seconds:5.1f} s)",
                flush=True,
            )
        for cell in cells.values():
            cell.wall.append(cell.seconds[-1] / cells[reference].seconds[-1])
            cell.cpu.append(cell.cpu_seconds[-1] / cells[reference].cpu_seconds[-1])
    return cells


def _mean_std(values: list[float], signed: bool = False) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{'+' if signed else ''}.3f} ± {spread:.3f}"


def _key(setting: Setting) -> str:
    return f"{setting.method}/{setting.label}"


def dataset_table(dataset: Dataset, grid: list[Setting], cells: dict[str, Cell]) -> list[str]:
    defaults = {s.method: _key(s) for s in grid if s.default}
    lines = [
        f"### {dataset.name}: {dataset.description}",
        "",
        "| method | setting | state | avg acc | vs default | forgetting | s per run | wall / naive | CPU / naive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in grid:
        cell = cells[_key(setting)]
        default = cells[defaults[setting.method]]
        differences = [a - b for a, b in zip(cell.acc, default.acc, strict=True)]
        label = f"{setting.label} (default)" if setting.default and setting.method != "naive" else setting.label
        lines.append(
            f"| {TITLES[setting.method]} | {label} | {'carried' if setting.keep else 'reset'} | {_mean_std(cell.acc)} "
            f"| {'-' if setting.default else _mean_std(differences, signed=True)} | "
            f"{statistics.mean(cell.forgetting):.3f} | {statistics.mean(cell.seconds):.1f} | "
            f"{statistics.mean(cell.wall):.2f} | {statistics.mean(cell.cpu):.2f} |"
        )
    return [*lines, ""]


def rule_choice(method: str, rows: dict[str, tuple[float, float]], default: str) -> str:
    """The rule on one dataset: ``rows`` maps a setting to (mean accuracy, mean CPU time over naive's)."""
    best = max(acc for acc, _ in rows.values())
    within = [key for key, (acc, _) in rows.items() if acc >= best - TOLERANCE]
    if method in COST_VARIES:
        return min(within, key=lambda key: rows[key][1])
    return default if default in within else max(rows, key=lambda key: rows[key][0])


def verdict(method: str, per_dataset: dict[str, dict[str, tuple[float, float]]], default: str) -> tuple[str, str]:
    """The setting chosen over every dataset, and how: within the tolerance on all, or the smallest shortfall."""
    shortfall = {
        key: max(max(acc for acc, _ in rows.values()) - rows[key][0] for rows in per_dataset.values())
        for key in next(iter(per_dataset.values()))
    }
    within = {key for key, gap in shortfall.items() if gap <= TOLERANCE}
    if not within:
        choice = min(shortfall, key=shortfall.get)  # type: ignore[arg-type]
        return choice, f"no setting within {TOLERANCE * 100:g} points on every dataset; smallest shortfall"
    if method in COST_VARIES:
        choice = min(within, key=lambda key: statistics.mean(rows[key][1] for rows in per_dataset.values()))
        return choice, f"cheapest within {TOLERANCE * 100:g} points on every dataset"
    if default in within:
        return default, f"the default, within {TOLERANCE * 100:g} points on every dataset"
    choice = max(within, key=lambda key: statistics.mean(rows[key][0] for rows in per_dataset.values()))
    return choice, f"best mean of those within {TOLERANCE * 100:g} points on every dataset"


def rule_table(grid: list[Setting], results: dict[str, dict[str, Cell]], names: dict[str, str]) -> list[str]:
    lines = [
        f"The rule — the cheapest setting (CPU time over naive's) within {TOLERANCE * 100:g} points of the method's "
        "best mean (for LwF and the "
        "regularizers, whose settings cost the same: the default if within, else the best) — per dataset, and the "
        "verdict over both (shortfall: the larger gap to a dataset's best mean):",
        "",
        "| method | default | " + " | ".join(names[d] for d in results) + " | verdict over both | shortfall |",
        "|---|---|" + "---|" * len(results) + "---|---|",
    ]
    for method in dict.fromkeys(s.method for s in grid if s.method != "naive"):
        own = [s for s in grid if s.method == method]
        default = next(_key(s) for s in own if s.default)
        per_dataset = {
            dataset: {_key(s): (statistics.mean(cells[_key(s)].acc), statistics.mean(cells[_key(s)].cpu)) for s in own}
            for dataset, cells in results.items()
        }
        cells_text = []
        for rows in per_dataset.values():
            choice = rule_choice(method, rows, default)
            cells_text.append(f"{choice.split('/', 1)[1]} ({rows[choice][0]:.3f}, CPU {rows[choice][1]:.2f})")
        choice, how = verdict(method, per_dataset, default)
        gap = max(max(acc for acc, _ in rows.values()) - rows[choice][0] for rows in per_dataset.values())
        lines.append(
            f"| {TITLES[method]} | {default.split('/', 1)[1]} | "
            + " | ".join(cells_text)
            + f" | {choice.split('/', 1)[1]} ({how}) | {gap * 100:.1f} points |"
        )
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"defaults {QUICK}")
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion"], choices=["digits", "fashion"])
    parser.add_argument("--seeds", type=int, help="how many seeds on the digits (default: 3)")
    parser.add_argument("--fashion-seeds", type=int, help="how many seeds on Fashion-MNIST (default: --seeds)")
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed … first-seed+seeds-1")
    parser.add_argument("--tasks", type=int, help="tasks per stream (default: 5)")
    parser.add_argument("--digits-epochs", type=int, help="epochs a task on the digits (default: 10)")
    parser.add_argument("--fashion-epochs", type=int, help="epochs a task on Fashion-MNIST (default: 3)")
    parser.add_argument("--train-size", type=int, help="Fashion-MNIST training images (default: 15000)")
    parser.add_argument("--test-size", type=int, help="Fashion-MNIST test images (default: 5000)")
    parser.add_argument("--digits-buffer", type=int, default=int(_default(ExperienceReplay, "buffer_size")))
    parser.add_argument("--fashion-buffer", type=int, default=500)
    add_results_argument(parser)
    args = parser.parse_args()
    for option, value in (QUICK if args.quick else FULL).items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    args.digits_seeds = range(args.first_seed, args.first_seed + args.seeds)
    args.fashion_seeds = range(args.first_seed, args.first_seed + (args.fashion_seeds or args.seeds))
    return args


def main() -> None:
    args = parse_args()
    quiet_benchmark()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    started = time.perf_counter()
    grid, chosen = settings(), datasets(args)
    seeds = {"digits": args.digits_seeds, "fashion": args.fashion_seeds}
    for key, dataset in chosen.items():  # a missing Fashion-MNIST stops the script before any run
        dataset.build(seeds[key].start)
    results = {key: measure(dataset, grid, seeds[key]) for key, dataset in chosen.items()}
    minutes = (time.perf_counter() - started) / 60
    lines = [
        "Final average accuracy (mean ± std over the seeds), its per-seed difference from the method's default "
        "(mean ± std), forgetting (mean), the wall seconds of a run (training, task-end work and evaluation; mean), "
        "and its wall time and process CPU time over naive fine-tuning's with the state reset in the same seed "
        "(means). MLP 256-256, Adam "
        "1e-3, batch 32; every setting of a seed on the same stream and initialisation, one after another; "
        f"one torch thread. The whole run took {minutes:.0f} minutes.",
        "",
    ]
    for key, dataset in chosen.items():
        lines += dataset_table(dataset, grid, results[key])
    lines += rule_table(grid, results, {key: dataset.name for key, dataset in chosen.items()})
    publish(args.results, HEADING, lines)


if __name__ == "__main__":
    main()
