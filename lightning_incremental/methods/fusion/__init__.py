"""Model fusion: merge the weights of successive tasks."""

from lightning_incremental.methods.fusion.weight_merging import WeightMerging

__all__ = ["WeightMerging"]
