"""Defaults on a long stream: every cataloged method on 20 permuted-digits tasks, 3 epochs a task.

    python benchmarks/studies/long_stream.py --seeds 1 [--methods naive ewc ...]

A default that holds on five tasks can break on twenty: an importance that only grows (separate EWC sums one
Fisher per task) ends up freezing the model. Per method: the final average accuracy, the mean accuracy on each task
right after training it ("plasticity") and the worst of those, against naive fine-tuning in the same run, to the
section "Long streams" of benchmarks/RESULTS.md.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

from harness import quiet_benchmark
from sections import add_results_argument, publish

from lightning_incremental.catalog import registry
from lightning_incremental.experiment import make_stream, run_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=[n for n, s in registry().items() if not s.cumulative])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1)
    add_results_argument(parser)
    args = parser.parse_args()
    quiet_benchmark()
    specs = registry()
    lines = [
        f"Permuted digits, {args.tasks} tasks, {args.epochs} epochs a task, seeds 0 … {args.seeds - 1} (means).",
        "",
        "| method | final avg acc | just-trained (mean) | just-trained (min) | wall s |",
        "|---|---|---|---|---|",
    ]
    for name in args.methods:
        finals, fresh, worst, walls = [], [], [], []
        for seed in range(args.seeds):
            stream = make_stream("permuted", args.tasks, seed)
            run = run_method(specs[name], stream, epochs=args.epochs, seed=seed)
            diagonal = [run.result.matrix[t][t] for t in range(args.tasks)]
            finals.append(run.result.summary()["acc"])
            fresh.append(statistics.mean(diagonal))
            worst.append(min(diagonal))
            walls.append(run.seconds)
        lines.append(
            f"| {name} | {statistics.mean(finals):.3f} | {statistics.mean(fresh):.3f} | {statistics.mean(worst):.3f} "
            f"| {statistics.mean(walls):.0f} |"
        )
        print(lines[-1], flush=True)
    publish(args.results, "Long streams", lines)


if __name__ == "__main__":
    main()
