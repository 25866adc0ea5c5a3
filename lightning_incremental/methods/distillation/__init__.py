"""Distillation methods: keep what an earlier model computed, through its outputs."""

from lightning_incremental.core import distillation_loss
from lightning_incremental.methods.distillation.lwf import LwF

__all__ = ["LwF", "distillation_loss"]
