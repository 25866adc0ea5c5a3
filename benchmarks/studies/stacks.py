"""Common stacks of methods in one Trainer against their members alone (the reference protocol, 5 tasks).

    python benchmarks/studies/stacks.py --seeds 3 --scenarios split permuted

The final average accuracy and forgetting of every stack (over the seeds) go to the section "Stacks" of
benchmarks/RESULTS.md. The callback order is the list's: the first method wraps the others (replay first: the inner
methods also see the replayed rows).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

from harness import Grid, setup_threads, sweep_main

from lightning_incremental import DER, EWC, ExperienceReplay, KeepOptimizerState, LwF

GRID: Grid = {
    "stack": [
        ("ER", lambda: [ExperienceReplay()]),
        ("ER + LwF", lambda: [ExperienceReplay(), LwF()]),
        ("LwF + ER", lambda: [LwF(), ExperienceReplay()]),
        ("ER + EWC", lambda: [ExperienceReplay(), EWC()]),
        ("ER + LwF + EWC", lambda: [ExperienceReplay(), LwF(), EWC()]),
        ("LwF + ER + EWC", lambda: [LwF(), ExperienceReplay(), EWC()]),
        ("DER++", lambda: [DER(alpha=0.3, beta=1.0)]),
        ("DER++ + LwF", lambda: [DER(alpha=0.3, beta=1.0), LwF()]),
        ("LwF + EWC", lambda: [LwF(), EWC()]),
    ],
    # beside replay, which already holds the old tasks, the solo defaults of LwF and EWC cost plasticity:
    # the weights a stack needs are smaller
    "stack weights": [
        (f"ER + LwF({alpha}) + EWC({lam})", lambda alpha=alpha, lam=lam: [ExperienceReplay(), LwF(alpha), EWC(lam)])
        for alpha in (0.1, 0.3)
        for lam in (3.0, 30.0)
    ]
    + [(f"ER + EWC({lam})", lambda lam=lam: [ExperienceReplay(), EWC(lam)]) for lam in (3.0, 30.0)]
    + [(f"ER + LwF({alpha})", lambda alpha=alpha: [ExperienceReplay(), LwF(alpha)]) for alpha in (0.1, 0.3)],
    # the stack weights in the other order, and every stack with the optimizer's state carried across tasks
    "stack order": [
        ("LwF(0.1) + ER + EWC(3)", lambda: [LwF(0.1), ExperienceReplay(), EWC(3.0)]),
        *(
            (f"{label} + KeepOptimizerState", lambda build=build: [*build(), KeepOptimizerState()])
            for label, build in (
                ("ER", lambda: [ExperienceReplay()]),
                ("ER + LwF + EWC", lambda: [ExperienceReplay(), LwF(), EWC()]),
                ("LwF + ER + EWC", lambda: [LwF(), ExperienceReplay(), EWC()]),
                ("ER + LwF(0.1) + EWC(3)", lambda: [ExperienceReplay(), LwF(0.1), EWC(3.0)]),
                ("LwF(0.1) + ER + EWC(3)", lambda: [LwF(0.1), ExperienceReplay(), EWC(3.0)]),
            )
        ),
    ],
}

if __name__ == "__main__":
    setup_threads()
    sweep_main(__doc__, "Stacks", GRID, ["split", "permuted"], seeds=3)
