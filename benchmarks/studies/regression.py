"""Every method on the source documents' regression model: final mean MSE against naive and joint, 3 seeds.

    python benchmarks/studies/regression.py [--seeds 3]

The model is ``MLPRegressor`` (Linear(10, 20) -> ReLU -> Linear(20, 1), MSE, Adam 1e-2), the stream
``regression_stream(n_tasks=3)`` (one target function, inputs drifting to a new centre in each task), 10 epochs
per task, batch 32, every method with its defaults. Methods that need class labels refuse (and are listed so).
The table goes to the section "Regression" of benchmarks/RESULTS.md.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

from harness import quiet_benchmark
from sections import add_results_argument, publish
from torchmetrics import MeanSquaredError

from lightning_incremental import ContinualEvaluation
from lightning_incremental.catalog import MethodSpec, registry
from lightning_incremental.experiment import run_method
from lightning_incremental.models import MLPRegressor
from lightning_incremental.scenarios import TaskStream, regression_stream


def run(spec: MethodSpec, seed: int, epochs: int, stream: TaskStream | None = None) -> tuple[float, float]:
    """Final mean MSE over the tasks' test sets, and wall seconds; on ``regression_stream(n_tasks=3, seed=seed)``
    unless another ``stream`` is given."""
    stream = regression_stream(n_tasks=3, seed=seed) if stream is None else stream
    method_run = run_method(
        spec,
        stream,
        model=lambda _: MLPRegressor(),
        epochs=epochs,
        seed=seed,
        trainer_kwargs={"accelerator": "cpu"},
        evaluation=ContinualEvaluation(stream, metric=MeanSquaredError()),
    )
    return statistics.mean(method_run.result.matrix[-1]), method_run.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(registry()))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    add_results_argument(parser)
    args = parser.parse_args()
    quiet_benchmark()
    specs = registry()
    lines = [
        f"`MLPRegressor` on `regression_stream(n_tasks=3)`, {args.epochs} epochs a task, seeds 0 … {args.seeds - 1}; "
        "the final mean MSE over the three tasks' test sets, every method with its catalog defaults.",
        "",
        "| method | final mean MSE | ratio to naive | wall s |",
        "|---|---|---|---|",
    ]
    naive = None
    for name in args.methods:
        try:
            runs = [run(specs[name], seed, args.epochs) for seed in range(args.seeds)]
        except (ValueError, TypeError, RuntimeError) as error:
            lines.append(f"| {name} | refuses: {str(error).splitlines()[0][:90]} | | |")
        else:
            mses = [mse for mse, _ in runs]
            mean, spread = statistics.mean(mses), statistics.stdev(mses) if len(mses) > 1 else 0.0
            naive = mean if name == "naive" else naive
            ratio = f"{mean / naive:.2f}" if naive else ""
            wall = statistics.mean(w for _, w in runs)
            lines.append(f"| {name} | {mean:.3f} ± {spread:.3f} | {ratio} | {wall:.1f} |")
        print(lines[-1], flush=True)
    publish(args.results, "Regression", lines)


if __name__ == "__main__":
    main()
