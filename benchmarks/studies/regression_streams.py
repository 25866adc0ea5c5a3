"""The regression methods across drifting streams: where does each method keep the old tasks?

    python benchmarks/studies/regression_streams.py [--seeds 3]

``benchmarks/studies/regression.py`` runs every method on one stream, ``regression_stream(n_tasks=3)``. This script
runs the methods the regression target names (EWC, SI, MAS, LwF, ExperienceReplay, DER, with their catalog defaults)
with naive and joint on every variant of ``regression_stream``: the centre layout (``line``, ``spread``,
``diagonal``) x the target function (``sincos``, ``sines``) x the shift between centres (4, 8). Same model and
protocol as ``regression.py``: ``MLPRegressor``, 10 epochs a task, batch 32, seeds 0 … seeds-1. Each cell is the
final mean MSE as a ratio to naive's in the same run; ``joint / naive`` is the best a method can do there. The table
goes to the section "Regression across drifting streams" of benchmarks/RESULTS.md.
"""

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

from harness import quiet_benchmark
from regression import run
from sections import add_results_argument, publish

from lightning_incremental.catalog import registry
from lightning_incremental.scenarios import regression_stream

METHODS = ["ewc", "si", "mas", "lwf", "replay", "der"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    add_results_argument(parser)
    args = parser.parse_args()
    quiet_benchmark()
    specs = registry()
    lines = [
        f"3 tasks, {args.epochs} epochs a task, seeds 0 … {args.seeds - 1}; cells: final mean MSE over naive's.",
        "",
        "| layout | target | shift | naive MSE | joint / naive | " + " | ".join(METHODS) + " | all <= 0.5 |",
        "|---|---|---|---|---|" + "---|" * (len(METHODS) + 1),
    ]
    for layout, target, shift in itertools.product(("line", "spread", "diagonal"), ("sincos", "sines"), (4.0, 8.0)):
        streams = [
            regression_stream(3, seed=seed, shift=shift, layout=layout, target=target) for seed in range(args.seeds)
        ]
        mse = {
            name: statistics.mean(run(specs[name], seed, args.epochs, stream)[0] for seed, stream in enumerate(streams))
            for name in ["naive", "joint", *METHODS]
        }
        ratios = {name: mse[name] / mse["naive"] for name in ["joint", *METHODS]}
        met = "yes" if all(ratios[name] <= 0.5 for name in METHODS) else "no"
        cells = " | ".join(f"{ratios[name]:.2f}" for name in METHODS)
        lines.append(
            f"| {layout} | {target} | {shift:g} | {mse['naive']:.3f} | {ratios['joint']:.2f} | {cells} | {met} |"
        )
        print(lines[-1], flush=True)
    publish(args.results, "Regression across drifting streams", lines)


if __name__ == "__main__":
    main()
