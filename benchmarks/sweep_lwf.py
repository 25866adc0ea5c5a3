"""The sweep that chose LwF's defaults (DESIGN.md §6 protocol).

    python benchmarks/sweep_lwf.py [--seeds 2] [--first-seed 0] [--scenarios permuted split-task]

For every ``alpha`` and ``temperature`` it prints the final average accuracy (mean and std over the seeds)
and the forgetting, next to naive fine-tuning in the same run, on the domain-incremental permuted stream and
the task-incremental split (one head per task).
"""

from harness import Grid, sweep_main

from lightning_incremental.methods.distillation import LwF

GRID: Grid = {
    "naive": [("-", lambda: [])],
    "lwf": [
        (f"alpha {a:g} T {t:g}", lambda a=a, t=t: [LwF(alpha=a, temperature=t)])
        for a in (0.1, 0.25, 0.5, 1, 3)
        for t in (2,)
    ],
}


def main() -> None:
    sweep_main(__doc__, GRID, ["permuted", "split-task"], seeds=2)


if __name__ == "__main__":
    main()
