"""The sweep that chose the replay methods' defaults (the reference protocol, buffer 200).

    python benchmarks/sweeps/sweep_replay.py [--seeds 2] [--first-seed 0] [--scenarios split permuted] [--methods ...]

The final average accuracy (mean and std over the seeds) and the forgetting of every replay method and setting on
the class-incremental split and the domain-incremental permuted digits streams, next to naive fine-tuning in the
same run, go to the section "The replay methods' defaults" of benchmarks/RESULTS.md. The defaults in the methods'
docstrings are the settings with the best mean accuracy over both scenarios here. ``--methods "derpp (class_balanced
task_end)" --scenarios permuted --seeds 3`` is the finer grid of DER++'s domain-incremental setting (about 25
minutes on one core).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

from harness import Grid, sweep_main

from lightning_incremental.methods.replay import AGEM, DER, ExperienceReplay

FILLS = ("stream", "first_epoch", "task_end")

GRID: Grid = {
    "naive": [("-", lambda: [])],
    "replay": [
        (
            f"{policy} {fill} ratio {ratio:g}",
            lambda p=policy, f=fill, r=ratio: [ExperienceReplay(policy=p, fill=f, ratio=r)],
        )
        for policy in ("reservoir", "class_balanced", "task_balanced")
        for fill in FILLS
        for ratio in (1, 2, 4, 8)
    ],
    "der": [(f"alpha {a:g} {fill}", lambda a=a, f=fill: [DER(alpha=a, fill=f)]) for a in (0.3, 1.0) for fill in FILLS],
    "derpp": [
        (f"alpha {a:g} beta {b:g} {fill}", lambda a=a, b=b, f=fill: [DER(alpha=a, beta=b, fill=f)])
        for a in (0.3, 1.0)
        for b in (0.5, 1.0)
        for fill in ("stream", "task_end")
    ]
    + [
        (f"alpha 0.3 beta 1 {policy} task_end", lambda p=policy: [DER(alpha=0.3, beta=1.0, policy=p, fill="task_end")])
        for policy in ("class_balanced", "task_balanced")
    ],
    "derpp (class_balanced task_end)": [
        (
            f"alpha {a:g} beta {b:g} replay {k}",
            lambda a=a, b=b, k=k: [DER(alpha=a, beta=b, replay_batch_size=k, policy="class_balanced", fill="task_end")],
        )
        for a in (0.1, 0.3, 0.5, 1.0)
        for b in (0.5, 1.0, 2.0)
        for k in (32, 64)
    ],
    "agem": [(f"sample {k}", lambda k=k: [AGEM(replay_batch_size=k)]) for k in (64, 200)],
}


def main() -> None:
    sweep_main(__doc__, "The replay methods' defaults", GRID, ["split", "permuted"], seeds=2)


if __name__ == "__main__":
    main()
