"""The two baselines every method is measured between.

- ``naive``: plain fine-tuning, task after task, with no continual method: the lower bound.
- ``joint``: each task trains on the union of all tasks so far (cumulative training): the upper bound.
"""

from lightning_incremental.methods.registry import MethodSpec

METHODS = [
    MethodSpec("naive", "baseline", "Plain fine-tuning on each task in turn (the lower bound).", lambda stream: []),
    MethodSpec(
        "joint",
        "baseline",
        "Each task trains on the union of the tasks so far (the upper bound).",
        lambda stream: [],
        cumulative=True,
    ),
]
