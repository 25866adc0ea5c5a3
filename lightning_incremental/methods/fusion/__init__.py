"""Model fusion: merge the weights of successive tasks."""

from lightning_incremental.methods.fusion.weight_merging import WeightMerging
from lightning_incremental.methods.registry import MethodSpec

METHODS = [
    MethodSpec(
        "merge",
        "fusion",
        "Weight merging: interpolate halfway between the weights before and after each task.",
        lambda s: [WeightMerging()],
    ),
]

__all__ = ["METHODS", "WeightMerging"]
