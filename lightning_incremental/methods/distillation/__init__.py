"""Distillation methods: keep what an earlier model computed, through its outputs."""

from lightning_incremental.methods.distillation.lwf import LwF, distillation_loss
from lightning_incremental.methods.registry import MethodSpec

METHODS = [
    MethodSpec(
        "lwf", "distillation", "Learning without Forgetting: distil the last model's outputs.", lambda s: [LwF()]
    ),
]

__all__ = ["METHODS", "LwF", "distillation_loss"]
