"""Partial training: a fixed part of the model and an updatable part."""

from lightning_incremental.methods.partial.freeze import FreezeLayers
from lightning_incremental.methods.registry import MethodSpec

METHODS = [
    MethodSpec(
        "freeze_backbone",
        "partial",
        "Train only the last layer (the head) from the second task on; the backbone stays fixed.",
        lambda s: [FreezeLayers(train_last=1, from_task=1, train_bn=False)],
    ),
]

__all__ = ["METHODS", "FreezeLayers"]
