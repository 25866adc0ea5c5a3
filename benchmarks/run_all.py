"""Regenerate benchmarks/RESULTS.md: accuracy of every method x scenario over seeds, and step-time ratios.

    python benchmarks/run_all.py                 # the full table: 3 seeds, 3 scenarios, every method
    python benchmarks/run_all.py --seeds 1 --methods naive ewc --skip-overhead   # a quick look
    python benchmarks/run_all.py --first-seed 5 --seeds 5 --scenarios permuted \
        --methods naive ewc ewc_separate si mas l2 replay derpp --skip-overhead --output benchmarks/HELD_OUT.md
                                                 # the defaults on seeds their sweeps did not see

Accuracy follows the reference protocol of ``docs/architecture.md`` (digits, MLP 64-256-256-10, Adam 1e-3, batch 32,
10 epochs per task, 5 tasks) with each method's documented defaults, as the command line runs it; the
table gives mean ± std over the seeds. The overhead table times every method's training step on the
second task against naive fine-tuning, measured interleaved in the same run (benchmarks/harness.py).
"""

import argparse
import logging
import platform
import statistics
import sys
import warnings
from datetime import date
from pathlib import Path

import lightning
import torch
import torchmetrics

sys.path.insert(0, str(Path(__file__).parent))

from harness import MLP, compare, setup_threads

from lightning_incremental.catalog import registry
from lightning_incremental.cli import SCENARIOS, make_stream, run_method

METRICS = (("acc", "avg acc"), ("forgetting", "forgetting"), ("bwt", "BWT"))


def accuracy_tables(methods: list[str], scenarios: list[str], seeds: range, epochs: int) -> list[str]:
    lines = []
    specs = registry()
    for scenario in scenarios:
        lines += [f"### {scenario} — {SCENARIOS[scenario]}", ""]
        header = " | ".join(title for _, title in METRICS)
        lines += [f"| method | {header} | avg acc, seed {seeds.start} | wall s |", "|---" * 6 + "|"]
        for name in methods:
            runs = []
            for seed in seeds:
                stream = make_stream(scenario, 5, seed)
                runs.append(run_method(specs[name], stream, epochs=epochs, seed=seed))
                print(f"{scenario:<10} {name:<12} seed {seed}: acc {runs[-1][0].summary()['acc']:.4f}", flush=True)
            cells = []
            for key, _ in METRICS:
                values = [result.summary()[key] for result, _ in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
            seconds = statistics.mean(wall for _, wall in runs)
            first = runs[0][0].summary()["acc"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {first:.4f} | {seconds:.1f} |")
        lines.append("")
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
        "one or two replayed samples of the batch's size); `benchmarks/replay_overhead.py` compares them with",
        "naive fine-tuning on the same number of rows.",
        "",
    ]
    lines += ["| method | ms/step | ratio over naive |", "|---|---|---|"]
    lines += [f"| {name} | {s * 1e3:.2f} | {s / medians['naive']:.3f} |" for name, s in medians.items()]
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(registry()))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed … first-seed+seeds-1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the overhead timing")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args()
    unknown = sorted(set(args.methods) - set(registry()))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(registry())}")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    seeds = range(args.first_seed, args.first_seed + args.seeds)

    lines = [
        "# Benchmark results",
        "",
        f"Produced by `python benchmarks/run_all.py {' '.join(sys.argv[1:])}`".rstrip() + f" on {date.today()}.",
        "",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'};"
        f" Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__},"
        f" torchmetrics {torchmetrics.__version__}.",
        "",
        f"## Final accuracy (mean ± std over seeds {seeds.start} … {seeds.stop - 1})",
        "",
        *accuracy_tables(args.methods, args.scenarios, seeds, args.epochs),
    ]
    if not args.skip_overhead:
        lines += ["## Overhead over naive fine-tuning", "", *overhead_table(args.methods, args.repeats)]
    args.output.write_text("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
