"""One method added alone to a user's Trainer against the setting the benchmarks recommend for it (reference protocol).

    python benchmarks/studies/drop_in.py [--seeds 3] [--methods lwf replay agem]

Each method runs three ways on the permuted digits stream, on the same streams and initialisations: alone, as
``callbacks=[Method()]`` in a user's Trainer (the optimizer's state carried or not by the method's own
``keeps_optimizer_state``); with ``KeepOptimizerState()`` (the state carried); with
``KeepOptimizerState(carry=False)`` (a fresh optimizer every task, what Lightning does without the library).
Final average accuracy, mean ± std over the seeds, to the section "One method alone in a user's Trainer" of
benchmarks/RESULTS.md.
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

SETTINGS = {"alone": None, "KeepOptimizerState()": True, "KeepOptimizerState(carry=False)": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lwf", "replay", "agem"], choices=list(registry()))
    parser.add_argument("--seeds", type=int, default=3)
    add_results_argument(parser)
    args = parser.parse_args()
    quiet_benchmark()
    specs, streams = registry(), [make_stream("permuted", 5, seed) for seed in range(args.seeds)]
    lines = [
        f"Permuted digits, the reference protocol, seeds 0 … {args.seeds - 1}; final average accuracy, mean ± std.",
        "",
        "| method | " + " | ".join(SETTINGS) + " |",
        "|---|" + "---|" * len(SETTINGS),
    ]
    for name in args.methods:
        cells = []
        for keep in SETTINGS.values():
            accs = [
                run_method(specs[name], stream, seed=seed, keep_optimizer_state=keep).result.summary()["acc"]
                for seed, stream in enumerate(streams)
            ]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.3f} ± {spread:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    publish(args.results, "One method alone in a user's Trainer", lines)


if __name__ == "__main__":
    main()
