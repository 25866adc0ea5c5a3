"""The command line: ``lightning-incremental`` (or ``python -m lightning_incremental``).

With no arguments it runs the main job: every registered method, plus the naive and joint baselines, on
the class-incremental split of scikit-learn's bundled digits with the reference protocol (``docs/architecture.md``),
and writes the results (JSON, CSV, heat maps) to ``lightning-incremental-results/``. Each method's run is
:func:`lightning_incremental.experiment.run_method`'s, as in the benchmarks.
"""

import argparse
import csv
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typing_extensions import override

from lightning_incremental.catalog import MethodSpec, registry
from lightning_incremental.evaluation import ContinualResult
from lightning_incremental.experiment import SCENARIOS, make_stream, run_method

COLUMNS = ("acc", "avg_incremental_acc", "bwt", "fwt", "forgetting")


def build_parser() -> argparse.ArgumentParser:
    methods = registry()
    parser = argparse.ArgumentParser(
        prog="lightning-incremental",
        description="Run continual-learning methods on a task stream of bundled data and compare them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n"
        + "\n".join(f"  {name:<12} {spec.summary}" for name, spec in methods.items())
        + "\n\nscenarios:\n"
        + "\n".join(f"  {name:<12} {text}" for name, text in SCENARIOS.items()),
    )
    parser.add_argument("--scenario", default="split", help=f"one of {', '.join(SCENARIOS)} (default: split)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME", help="methods to run (default: all)")
    parser.add_argument("--tasks", type=int, default=5, help="number of tasks (default: 5)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per task (default: 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data order (default: 0)")
    parser.add_argument(
        "--reset-optimizer",
        action="store_true",
        help="a fresh optimizer for every task (default: its state carried where the measurements favour it)",
    )
    parser.add_argument("--output", type=Path, default=Path("lightning-incremental-results"), help="results folder")
    parser.add_argument("--accelerator", default="cpu", help="the Trainer's accelerator (default: cpu)")
    parser.add_argument("--devices", default="1", help="the Trainer's devices (default: 1)")
    parser.add_argument("--strategy", default="auto", help="the Trainer's strategy (default: auto)")
    parser.add_argument("--precision", default="32-true", help="the Trainer's precision (default: 32-true)")
    return parser


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[MethodSpec]:
    if args.scenario not in SCENARIOS:
        parser.error(f"unknown scenario {args.scenario!r}; choose from {', '.join(SCENARIOS)}")
    methods = registry()
    names = args.methods or list(methods)
    unknown = [name for name in names if name not in methods]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from {', '.join(methods)}")
    for option in ("tasks", "epochs", "batch_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    return [methods[name] for name in dict.fromkeys(names)]


class _TaskProgress(Callback):
    """Advances the command line's progress bar by one task at the end of every fit."""

    def __init__(self, progress: Progress, bar: Any) -> None:
        self.progress, self.bar = progress, bar

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.progress.advance(self.bar)


def write_results(
    output: Path, scenario: str, config: dict[str, Any], results: dict[str, tuple[ContinualResult, float]]
) -> None:
    """``results.json``, ``results.csv``, one heat map per method and the average-accuracy curves."""
    output.mkdir(parents=True, exist_ok=True)
    document = {
        "scenario": scenario,
        "config": config,
        "methods": {
            name: {
                **result.summary(),
                "wall_seconds": round(seconds, 3),
                "matrix": result.matrix,
                "initial": result.initial,
            }
            for name, (result, seconds) in results.items()
        },
    }
    (output / "results.json").write_text(json.dumps(document, indent=2))
    with open(output / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", *COLUMNS, "wall_seconds"])
        for name, entry in document["methods"].items():
            writer.writerow([name, *(entry[column] for column in COLUMNS), entry["wall_seconds"]])
    for name, (result, _) in results.items():
        result.plot(title=f"{name} — {scenario}").savefig(output / f"heatmap_{scenario}_{name}.png", dpi=100)
    _curves(results, scenario).savefig(output / f"average_accuracy_{scenario}.png", dpi=100)


def _curves(results: dict[str, tuple[ContinualResult, float]], scenario: str) -> Figure:
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for name, (result, _) in results.items():
        averages = [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(result.matrix)]
        axes.plot(range(1, len(averages) + 1), averages, marker="o", label=name)
    axes.set_xticks(range(1, max(len(result.matrix) for result, _ in results.values()) + 1))
    axes.set_xlabel("tasks trained")
    axes.set_ylabel("average accuracy on the tasks so far")
    axes.set_ylim(0, 1.02)
    axes.set_title(f"average accuracy — {scenario}")
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    return figure


def results_table(scenario: str, results: dict[str, tuple[ContinualResult, float]]) -> Table:
    table = Table(title=f"digits, {scenario}: {SCENARIOS[scenario]}")
    for column in ("method", "avg acc", "avg incr. acc", "BWT", "FWT", "forgetting", "wall s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, (result, seconds) in results.items():
        summary = result.summary()
        table.add_row(name, *(f"{summary[column]:.4f}" for column in COLUMNS), f"{seconds:.1f}")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    specs = _validate(args, parser)
    console = Console()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    try:
        stream = make_stream(args.scenario, args.tasks, args.seed)
    except ValueError as error:  # e.g. 10 classes do not split into --tasks 3
        parser.error(f"--tasks {args.tasks}: {error}")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict[str, tuple[ContinualResult, float]] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        for spec in specs:
            bar = progress.add_task(f"{spec.name:<12}", total=len(stream))
            trainer_kwargs = {
                "accelerator": args.accelerator,
                "devices": args.devices,
                "strategy": args.strategy,
                "precision": args.precision,
                "logger": CSVLogger(args.output / "logs", name=f"{args.scenario}-{spec.name}"),
            }
            run = run_method(
                spec,
                stream,
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=args.seed,
                trainer_kwargs=trainer_kwargs,
                callbacks=[_TaskProgress(progress, bar)],
                keep_optimizer_state=False if args.reset_optimizer else None,
            )
            results[spec.name] = run.result, run.seconds
    console.print(results_table(args.scenario, results))
    write_results(args.output, args.scenario, config, results)
    console.print(f"results, logs and figures in {args.output}/")
    return 0
