"""Every cataloged method with and without KeepOptimizerState: final average accuracy, same run.

    python benchmarks/studies/optimizer_state.py              # every method, 3 streams, 3 seeds (the table)
    python benchmarks/studies/optimizer_state.py --methods naive lwf --scenarios permuted --seeds 1 \
        --results /tmp/look.md                                # a quick look

Each run is the reference protocol (``lightning_incremental.experiment.run_method``: digits, MLP 64-256-256-10,
Adam 1e-3, batch 32, 10 epochs per task, 5 tasks) with the method's documented defaults; "with" adds a fresh
``KeepOptimizerState()`` to every run, so Adam's moments and step count carry from task to task. For every
seed both runs use the same stream and the same initialisation, one after the other. The script prints one
line per run, then writes a table per stream to the section "The optimizer's state across tasks" of
benchmarks/RESULTS.md: mean ± std over the seeds without and with the state carried, and the mean of the per-seed
differences (with − without) ± its std.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

from harness import quiet_benchmark
from sections import add_results_argument, publish

from lightning_incremental.catalog import registry
from lightning_incremental.experiment import SCENARIOS, make_stream, run_method


def measure(methods: list[str], scenarios: list[str], seeds: range, epochs: int) -> dict[tuple[str, str], dict]:
    """``(scenario, method) -> {"without": [acc per seed], "with": [acc per seed]}``."""
    specs = registry()
    results: dict[tuple[str, str], dict] = {}
    for scenario in scenarios:
        streams = {seed: make_stream(scenario, 5, seed) for seed in seeds}
        for name in methods:
            accs: dict[str, list[float]] = {"without": [], "with": []}
            for seed, stream in streams.items():
                for setting, keep in (("without", False), ("with", True)):
                    run = run_method(specs[name], stream, epochs=epochs, seed=seed, keep_optimizer_state=keep)
                    accs[setting].append(run.result.summary()["acc"])
                    print(
                        f"{scenario:<10} {name:<16} seed {seed} {setting:<7} acc {accs[setting][-1]:.4f} "
                        f"({run.seconds:.1f} s)",
                        flush=True,
                    )
            results[scenario, name] = accs
    return results


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def table(results: dict[tuple[str, str], dict], scenarios: list[str], methods: list[str]) -> list[str]:
    lines = []
    for scenario in scenarios:
        lines += [f"### {scenario} — {SCENARIOS[scenario]}", ""]
        lines += ["| method | without | with KeepOptimizerState | difference |", "|---|---|---|---|"]
        for name in methods:
            accs = results[scenario, name]
            differences = [w - wo for w, wo in zip(accs["with"], accs["without"], strict=True)]
            cells = [_mean_std(accs["without"]), _mean_std(accs["with"]), _mean_std(differences)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(registry()), choices=list(registry()))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed … first-seed+seeds-1")
    parser.add_argument("--epochs", type=int, default=10)
    add_results_argument(parser)
    args = parser.parse_args()
    quiet_benchmark()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results = measure(args.methods, args.scenarios, seeds, args.epochs)
    over = f"seeds {seeds.start} … {seeds.stop - 1}, {args.epochs} epochs a task"
    lines = [f"Final average accuracy, mean ± std over {over}.", "", *table(results, args.scenarios, args.methods)]
    publish(args.results, "The optimizer's state across tasks", lines)


if __name__ == "__main__":
    main()
