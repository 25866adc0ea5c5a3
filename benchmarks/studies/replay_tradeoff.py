"""Accuracy against wall time of the replay methods, by replay ratio, with and without the optimizer's state carried.

    python benchmarks/studies/replay_tradeoff.py [--seeds 3] [--scenarios permuted split split-task]
        [--methods replay derpp agem] [--ratios 0.25 0.5 1 2 4] [--optimizer-state off on] [--epochs 10]

Every run is the reference protocol (``lightning_incremental.experiment.run_method``: MLP 256-256, Adam 1e-3, batch 32,
5 tasks, buffer 200) on the bundled digits. A replay ratio ``r`` is ``ExperienceReplay(ratio=r)`` for experience
replay and ``replay_batch_size=round(r * 32)`` for DER++ (``DER(alpha=0.3, beta=1.0)``) and A-GEM; every other
argument is the method's default. ``keep`` adds :class:`~lightning_incremental.optimizer_state.KeepOptimizerState`
(Adam's moments carried from task to task). Naive fine-tuning runs beside them as the wall-time reference.

The machine may be shared: wall times are noisy. All configurations of one seed run one after another
(interleaved) on the same stream, so the wall-time ratio over naive fine-tuning is computed within a seed, under
the same load, and then averaged over the seeds; the seconds per task are printed too but only the ratios compare
across runs. For each stream it prints the mean final accuracy, its std over the seeds, the seconds per task,
the wall-time ratio over naive, the Pareto front (no other setting both more accurate and cheaper), and the rule's
choice per method: the cheapest setting (by wall-time ratio) within 0.5 points of the method's best mean accuracy.
The accuracy and wall ratio of every setting, and the rule's choices, go to the section "Replay ratio against wall
time" of benchmarks/RESULTS.md.
"""

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

import torch
from harness import quiet_benchmark
from lightning.pytorch import Callback
from sections import add_results_argument, publish

from lightning_incremental.catalog import MethodSpec
from lightning_incremental.experiment import make_stream, run_method
from lightning_incremental.methods.replay import AGEM, DER, ExperienceReplay
from lightning_incremental.optimizer_state import KeepOptimizerState

BATCH = 32
N_TASKS = 5
TOLERANCE = 0.005

METHODS: dict[str, Callable[[float], Callback]] = {
    "replay": lambda r: ExperienceReplay(ratio=r),
    "derpp": lambda r: DER(alpha=0.3, beta=1.0, replay_batch_size=round(r * BATCH)),
    "agem": lambda r: AGEM(replay_batch_size=round(r * BATCH)),
}
TITLES = {"replay": "ExperienceReplay", "derpp": "DER++", "agem": "A-GEM"}
Key = tuple[str, float, str]  # (method, ratio, optimizer state "off" | "on")


def configurations(
    methods: list[str], ratios: list[float], optimizer_states: list[str]
) -> dict[Key, Callable[[], list[Callback]]]:
    """``(method, ratio, "off" | "on")`` to a builder of fresh callbacks; naive fine-tuning first."""
    grid: dict[Key, Callable[[], list[Callback]]] = {("naive", 0.0, "off"): lambda: []}
    for keep in optimizer_states:
        grid[("naive", 0.0, keep)] = (lambda: [KeepOptimizerState()]) if keep == "on" else (lambda: [])
    for method in methods:
        for ratio in ratios:
            for keep in optimizer_states:
                grid[(method, ratio, keep)] = lambda m=method, r=ratio, k=keep: [
                    METHODS[m](r),
                    *([KeepOptimizerState()] if k == "on" else []),
                ]
    return grid


def label(key: Key) -> str:
    method, ratio, keep = key
    return f"{method:<6} {'-' if method == 'naive' else f'{ratio:g}':>5} {'keep' if keep == 'on' else 'reset':>5}"


def pareto(rows: dict[Key, tuple[float, float]]) -> list[Key]:
    """The keys no other row beats on both (higher accuracy, lower cost); ``rows`` maps key to (acc, cost)."""
    front = [
        key
        for key, (acc, cost) in rows.items()
        if not any(a >= acc and c <= cost and (a, c) != (acc, cost) for a, c in rows.values())
    ]
    return sorted(front, key=lambda key: rows[key][1])


def rule_choice(rows: dict[Key, tuple[float, float]]) -> Key:
    """The cheapest key whose accuracy is within ``TOLERANCE`` of the best one's."""
    best = max(acc for acc, _ in rows.values())
    return min((key for key, (acc, _) in rows.items() if acc >= best - TOLERANCE), key=lambda key: rows[key][1])


def run_stream(scenario: str, seeds: range, grid: dict, epochs: int) -> dict[Key, tuple[float, float]]:
    """Run every configuration of ``grid`` on ``scenario``, print the stream's summary, and return each key's (mean
    accuracy, mean wall ratio over naive fine-tuning)."""
    accs: dict[tuple, list[float]] = {key: [] for key in grid}
    seconds: dict[tuple, list[float]] = {key: [] for key in grid}
    ratios: dict[tuple, list[float]] = {key: [] for key in grid}
    reference = ("naive", 0.0, "off")
    for seed in seeds:
        stream = make_stream(scenario, N_TASKS, seed)
        for key, build in grid.items():
            spec = MethodSpec(key[0], "sweep", "", build, keep_optimizer_state=False)  # the grid decides
            run = run_method(spec, stream, epochs=epochs, seed=seed)
            accs[key].append(run.result.summary()["acc"])
            seconds[key].append(run.seconds / N_TASKS)
            print(
                f"  {scenario:<10} seed {seed} {label(key)}  acc {accs[key][-1]:.4f}  {seconds[key][-1]:6.2f} s/task",
                flush=True,
            )
        for key in grid:
            ratios[key].append(seconds[key][-1] / seconds[reference][-1])
    done = len(seeds)
    print(f"\n{scenario}: {done} seed(s), {epochs} epochs per task; configurations interleaved within each seed,")
    print("wall ratio = seconds per task over naive fine-tuning's in the same seed (shared, loaded machine), mean")
    print(f"{'method  ratio optim':<19} {'acc':>7} {'std':>6} {'s/task':>7} {'wall ratio':>11}")
    rows: dict[tuple, tuple[float, float]] = {}
    for key in grid:
        acc = statistics.mean(accs[key])
        spread = statistics.stdev(accs[key]) if done > 1 else 0.0
        ratio = statistics.mean(ratios[key])
        rows[key] = (acc, ratio)
        print(f"{label(key):<19} {acc:>7.4f} {spread:>6.3f} {statistics.mean(seconds[key]):>7.2f} {ratio:>11.3f}")
    print(f"\n{scenario}: Pareto front (accuracy vs wall ratio), cheapest first")
    for key in pareto(rows):
        print(f"  {label(key)}  acc {rows[key][0]:.4f}  wall ratio {rows[key][1]:.3f}")
    print(f"{scenario}: the rule's choice per method (cheapest within {TOLERANCE * 100:g} points of its best accuracy)")
    for method in dict.fromkeys(key[0] for key in grid if key[0] != "naive"):
        own = {key: value for key, value in rows.items() if key[0] == method}
        best = max(own, key=lambda key: own[key][0])
        choice = rule_choice(own)
        print(
            f"  {label(choice)}  acc {own[choice][0]:.4f}  wall ratio {own[choice][1]:.3f}"
            f"   (best: {label(best)}  acc {own[best][0]:.4f}  wall ratio {own[best][1]:.3f})"
        )
    print(flush=True)
    return rows


def section(results: dict[str, dict[Key, tuple[float, float]]], args: argparse.Namespace) -> list[str]:
    """Per method a table of accuracy / wall ratio by replay ratio and stream, then the rule's choice per stream."""
    states = {"off": "reset", "on": "keep"}
    columns = [(scenario, keep) for scenario in results for keep in args.optimizer_state]
    lines = [
        f"Seeds {args.first_seed} … {args.first_seed + args.seeds - 1}, {args.epochs} epochs a task, buffer 200; wall "
        "time is the seconds per task over naive fine-tuning's (reset) in the same seed, configurations interleaved.",
        "",
    ]
    header = "| ratio | " + " | ".join(f"{scenario}, {states[keep]}" for scenario, keep in columns) + " |"
    for method in args.methods:
        lines += [f"**{TITLES[method]}** (final average accuracy / wall time over naive fine-tuning's)", "", header]
        lines.append("|---|" + "---|" * len(columns))
        for ratio in args.ratios:
            cells = [results[scenario][method, ratio, keep] for scenario, keep in columns]
            lines.append(f"| {ratio:g} | " + " | ".join(f"{acc:.3f} / {wall:.2f}" for acc, wall in cells) + " |")
        lines.append("")
    lines += [
        f"The rule — the cheapest setting within {TOLERANCE * 100:g} points of the method's best mean accuracy — per "
        "stream:",
        "",
        "| method | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for method in args.methods:
        cells = []
        for rows in results.values():
            choice = rule_choice({key: value for key, value in rows.items() if key[0] == method})
            cells.append(f"ratio {choice[1]:g}, {states[choice[2]]} ({rows[choice][0]:.3f})")
        lines.append(f"| {TITLES[method]} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--scenarios", nargs="+", default=["permuted", "split", "split-task"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--optimizer-state", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--epochs", type=int, default=10)
    add_results_argument(parser)
    args = parser.parse_args()
    quiet_benchmark()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), buffer 200 (the methods' default)")
    grid = configurations(args.methods, args.ratios, args.optimizer_state)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results = {scenario: run_stream(scenario, seeds, grid, args.epochs) for scenario in args.scenarios}
    publish(args.results, "Replay ratio against wall time", section(results, args))


if __name__ == "__main__":
    main()
