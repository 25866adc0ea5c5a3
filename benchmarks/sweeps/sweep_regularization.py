"""The sweep that chose the regularization methods' defaults (the reference protocol, permuted digits).

    python benchmarks/sweeps/sweep_regularization.py [--seeds 5] [--first-seed 0] [--methods naive ewc ...]

The final average accuracy and the forgetting (over the seeds) of every method at every value of its strength
``lambda_``, next to naive fine-tuning in the same run, go to the section "The regularization methods' defaults" of
benchmarks/RESULTS.md. The defaults in the methods' docstrings are the values with the best mean average accuracy here
over 5 seeds (the seed changes the model's initialisation, the permutations and the data order; single seeds differ
by up to 0.1, so one seed does not rank them). About 25 minutes on one core; two processes with ``--methods``
halves, ``OMP_NUM_THREADS=1`` and a ``--results`` file each use two cores without slowing each other down (each run
writes the whole section: join the two tables by hand).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

from harness import Grid, sweep_main

from lightning_incremental.methods.regularization import EWC, MAS, SI, L2Anchor

GRID: Grid = {
    "naive": [("-", lambda: [])],
    "ewc": [(f"lambda {lam:g}", lambda lam=lam: [EWC(lambda_=lam)]) for lam in (100, 300, 1e3, 2e3, 5e3, 1e4)],
    "ewc (true Fisher)": [
        (f"lambda {lam:g}", lambda lam=lam: [EWC(lambda_=lam, fisher="true")]) for lam in (300, 1e3, 2e3)
    ],
    "online_ewc (decay 0.9)": [
        (f"lambda {lam:g}", lambda lam=lam: [EWC(lambda_=lam, mode="online", decay=0.9)])
        for lam in (300, 1e3, 2e3, 5e3)
    ],
    "si (epsilon 1)": [
        (f"lambda {lam:g}", lambda lam=lam: [SI(lambda_=lam, epsilon=1.0)]) for lam in (20, 50, 100, 200, 500)
    ],
    "si (epsilon 0.1)": [(f"lambda {lam:g}", lambda lam=lam: [SI(lambda_=lam, epsilon=0.1)]) for lam in (5, 20, 50)],
    "mas": [(f"lambda {lam:g}", lambda lam=lam: [MAS(lambda_=lam)]) for lam in (0.03, 0.1, 0.3, 1, 3)],
    "l2": [(f"lambda {lam:g}", lambda lam=lam: [L2Anchor(lambda_=lam)]) for lam in (0.01, 0.1, 1.0)],
}


def main() -> None:
    sweep_main(__doc__, "The regularization methods' defaults", GRID, ["permuted"], seeds=5)


if __name__ == "__main__":
    main()
