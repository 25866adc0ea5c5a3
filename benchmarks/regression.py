"""Every method on the source documents' regression model: final mean MSE against naive and joint, 3 seeds.

    python benchmarks/regression.py [--seeds 3]

The model is ``MLPRegressor`` (Linear(10, 20) -> ReLU -> Linear(20, 1), MSE, Adam 1e-2), the stream
``regression_stream(n_tasks=3)`` (one target function, inputs drifting to a new centre in each task), 10 epochs
per task, batch 32, every method with its defaults. Methods that need class labels refuse (and are listed so).
RESULTS.md has the table.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L
from harness import QUIET, quiet_benchmark
from torchmetrics import MeanSquaredError

from lightning_incremental import ContinualEvaluation
from lightning_incremental.catalog import registry
from lightning_incremental.models import MLPRegressor
from lightning_incremental.scenarios import TaskStream, regression_stream


def run(spec, seed: int, epochs: int, stream: TaskStream | None = None) -> tuple[float, float]:
    """Final mean MSE over the tasks' test sets, and wall seconds; on ``regression_stream(n_tasks=3, seed=seed)``
    unless another ``stream`` is given."""
    L.seed_everything(seed, verbose=False)
    stream = regression_stream(n_tasks=3, seed=seed) if stream is None else stream
    model, methods = MLPRegressor(), spec.callbacks()
    evaluation = ContinualEvaluation(stream, metric=MeanSquaredError())
    started = time.perf_counter()
    for task in stream.cumulative() if spec.cumulative else stream:
        trainer = L.Trainer(max_epochs=epochs, callbacks=[*methods, evaluation], **QUIET)
        trainer.fit(model, task.train_dataloader(batch_size=32, shuffle=True))
    return statistics.mean(evaluation.result().matrix[-1]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(registry()))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    quiet_benchmark()
    specs = registry()
    print(f"regression stream, 3 tasks, {args.epochs} epochs a task, seeds 0 … {args.seeds - 1}")
    print("| method | final mean MSE | ratio to naive | wall s |")
    print("|---|---|---|---|")
    naive = None
    for name in args.methods:
        try:
            runs = [run(specs[name], seed, args.epochs) for seed in range(args.seeds)]
        except (ValueError, TypeError, RuntimeError) as error:
            print(f"| {name} | refuses: {str(error).splitlines()[0][:90]} | | |", flush=True)
            continue
        mses = [mse for mse, _ in runs]
        mean, spread = statistics.mean(mses), statistics.stdev(mses) if len(mses) > 1 else 0.0
        naive = mean if name == "naive" else naive
        ratio = f"{mean / naive:.2f}" if naive else ""
        wall = statistics.mean(w for _, w in runs)
        print(f"| {name} | {mean:.3f} ± {spread:.3f} | {ratio} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
