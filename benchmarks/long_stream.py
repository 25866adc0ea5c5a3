"""Defaults on a long stream: every cataloged method on 20 permuted-digits tasks, 3 epochs a task.

    python benchmarks/long_stream.py --seeds 1 [--methods naive ewc ...]

A default that holds on five tasks can break on twenty: an importance that only grows (separate EWC sums one
Fisher per task) ends up freezing the model. Prints, per method, the final average accuracy, the mean accuracy
on each task right after training it ("plasticity") and the worst of those, against naive fine-tuning in the same
run; RESULTS.md has the table.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import quiet_benchmark

from lightning_incremental.catalog import registry
from lightning_incremental.cli import make_stream, run_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=[n for n, s in registry().items() if not s.cumulative])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    quiet_benchmark()
    specs = registry()
    print(f"permuted digits, {args.tasks} tasks, {args.epochs} epochs a task, seeds 0 … {args.seeds - 1}")
    print("| method | final avg acc | just-trained acc (mean) | just-trained acc (min) | wall s |")
    print("|---|---|---|---|---|")
    for name in args.methods:
        finals, fresh, worst, walls = [], [], [], []
        for seed in range(args.seeds):
            result, wall = run_method(specs[name], make_stream("permuted", args.tasks, seed), args.epochs, seed=seed)
            diagonal = [result.matrix[t][t] for t in range(args.tasks)]
            finals.append(result.summary()["acc"])
            fresh.append(statistics.mean(diagonal))
            worst.append(min(diagonal))
            walls.append(wall)
        print(
            f"| {name} | {statistics.mean(finals):.3f} | {statistics.mean(fresh):.3f} | {statistics.mean(worst):.3f} "
            f"| {statistics.mean(walls):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
