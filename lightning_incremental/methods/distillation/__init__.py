"""Distillation methods: keep what an earlier model computed, through its outputs."""

from lightning_incremental.methods.distillation.lwf import LwF, distillation_loss

__all__ = ["LwF", "distillation_loss"]
