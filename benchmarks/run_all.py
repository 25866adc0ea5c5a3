"""The catalog's own sections of benchmarks/RESULTS.md: every method's accuracy per scenario, and its step time.

    python benchmarks/run_all.py                 # the full tables: 3 seeds, 3 scenarios, every method
    python benchmarks/run_all.py --quick         # a smoke run of its sections: see QUICK
    python benchmarks/run_all.py --first-seed 5 --seeds 5 --scenarios permuted \
        --methods naive ewc ewc_separate si mas l2 replay derpp --skip-overhead --results benchmarks/HELD_OUT.md
                                                 # the defaults on seeds their sweeps did not see

It writes one section per scenario, ``Final accuracy: <scenario>``, and ``Overhead over naive fine-tuning``, and
leaves every other section of the file as it is: the other scripts write those (``benchmarks/README.md``).
Accuracy follows the reference protocol of ``docs/architecture.md`` (digits, MLP 64-256-256-10, Adam 1e-3, batch 32,
10 epochs per task, 5 tasks) with each method's catalog defaults, as the command line runs it
(``lightning_incremental.experiment.run_method``); the table gives mean ± std over the seeds. The overhead table
times every method's training step on the second task against naive fine-tuning, measured interleaved in the same
run (``benchmarks/harness.py``).
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import MLP, compare, quiet_lightning, setup_threads
from sections import add_results_argument, publish

from lightning_incremental.catalog import registry
from lightning_incremental.experiment import SCENARIOS, make_stream, run_method

METRICS = (("acc", "avg acc"), ("forgetting", "forgetting"), ("bwt", "BWT"))
# --quick: the two ends of the catalog (one forgets, one keeps), 1 seed, 2 tasks of 1 epoch, no timing
QUICK = {"methods": ["naive", "replay"], "seeds": 1, "tasks": 2, "epochs": 1}
FULL = {"methods": list(registry()), "seeds": 3, "tasks": 5, "epochs": 10}


def accuracy_table(methods: list[str], scenario: str, seeds: range, tasks: int, epochs: int) -> list[str]:
    specs = registry()
    lines = [
        f"{SCENARIOS[scenario]}. Final average accuracy, forgetting and BWT, mean ± std over seeds {seeds.start} … "
        f"{seeds.stop - 1}, {tasks} tasks of {epochs} epoch(s); the wall seconds of a run, mean.",
        "",
    ]
    header = " | ".join(title for _, title in METRICS)
    lines += [f"| method | {header} | avg acc, seed {seeds.start} | wall s |", "|---" * 6 + "|"]
    for name in methods:
        runs = []
        for seed in seeds:
            runs.append(run_method(specs[name], make_stream(scenario, tasks, seed), epochs=epochs, seed=seed))
            print(f"{scenario:<10} {name:<12} seed {seed}: acc {runs[-1].result.summary()['acc']:.4f}", flush=True)
        cells = []
        for key, _ in METRICS:
            values = [run.result.summary()[key] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        seconds = statistics.mean(run.seconds for run in runs)
        first = runs[0].result.summary()["acc"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {first:.4f} | {seconds:.1f} |")
    return lines


def overhead_table(methods: list[str], repeats: int) -> list[str]:
    setup_threads()
    specs = registry()
    # joint trains on more rows; the closed-form heads take no training step after the first task
    timed = [name for name in methods if not specs[name].cumulative and specs[name].family != "pretrained"]
    configurations = {"naive": lambda: []} | {
        name: (lambda spec=specs[name]: spec.callbacks()) for name in timed if name != "naive"
    }
    medians = compare(MLP, configurations, repeats=repeats)
    lines = [
        f"Step time on the second task, {MLP.name}, median of {repeats} interleaved repeats. Replay methods",
        "train on more rows per step than naive here (ExperienceReplay: 4 replayed rows per new row; DER/DER++:",
        "one or two replayed samples of the batch's size); `benchmarks/timing/replay_overhead.py` compares them with",
        "naive fine-tuning on the same number of rows.",
        "",
    ]
    lines += ["| method | ms/step | ratio over naive |", "|---|---|---|"]
    lines += [f"| {name} | {s * 1e3:.2f} | {s / medians['naive']:.3f} |" for name, s in medians.items()]
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"defaults {QUICK}, no overhead table")
    parser.add_argument("--methods", nargs="+", choices=list(registry()), help="default: every method")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--seeds", type=int, help="how many seeds (default: 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed … first-seed+seeds-1")
    parser.add_argument("--tasks", type=int, help="tasks per stream (default: 5, the reference protocol)")
    parser.add_argument("--epochs", type=int, help="epochs per task (default: 10, the reference protocol)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the overhead timing")
    parser.add_argument("--skip-overhead", action="store_true")
    add_results_argument(parser)
    args = parser.parse_args()
    for option, value in (QUICK if args.quick else FULL).items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    args.skip_overhead = args.skip_overhead or args.quick
    return args


def main() -> None:
    args = parse_args()
    quiet_lightning()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for scenario in args.scenarios:
        table = accuracy_table(args.methods, scenario, seeds, args.tasks, args.epochs)
        publish(args.results, f"Final accuracy: {scenario}", table)
    if not args.skip_overhead:
        publish(args.results, "Overhead over naive fine-tuning", overhead_table(args.methods, args.repeats))


if __name__ == "__main__":
    main()
