"""The sweep that chose LwF's defaults, with the optimizer's state carried across tasks (reference protocol).

    python benchmarks/sweeps/sweep_lwf.py [--seeds 3] [--first-seed 0] [--scenarios permuted split-task split]

Every LwF setting runs with ``KeepOptimizerState()`` (Adam's moments and step count carried from task to
task): ``alpha`` in 0.1, 0.25, 0.5, 1, 2 and ``temperature`` in 1, 2, 4, 8. Beside them, in the same run: naive
fine-tuning without and with the state carried, and LwF at ``alpha=1, temperature=2`` without it. The final average
accuracy (mean and std over the seeds) and the forgetting of every setting, on the domain-incremental permuted
stream, the task-incremental split (one head per task) and the class-incremental split, go to the section
"LwF's defaults, chosen with the optimizer's state carried" of benchmarks/RESULTS.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

from harness import Grid, setup_threads, sweep_main

from lightning_incremental.methods.distillation import LwF
from lightning_incremental.optimizer_state import KeepOptimizerState

GRID: Grid = {
    "naive": [("-", lambda: []), ("keep state", lambda: [KeepOptimizerState()])],
    "lwf": [
        ("alpha 1 T 2", lambda: [LwF(alpha=1.0, temperature=2.0)]),
        *(
            (f"alpha {a:g} T {t:g} keep state", lambda a=a, t=t: [LwF(alpha=a, temperature=t), KeepOptimizerState()])
            for a in (0.1, 0.25, 0.5, 1, 2)
            for t in (1, 2, 4, 8)
        ),
    ],
}


def main() -> None:
    setup_threads()
    heading = "LwF's defaults, chosen with the optimizer's state carried"
    sweep_main(__doc__, heading, GRID, ["permuted", "split-task", "split"], seeds=3)


if __name__ == "__main__":
    main()
