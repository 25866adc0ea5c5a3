"""Partial training: a fixed part of the model and an updatable part."""

from lightning_incremental.methods.partial.freeze import FreezeLayers
from lightning_incremental.methods.partial.lora import LoRA
from lightning_incremental.methods.partial.lora_layer import LowRankAdapters

__all__ = ["FreezeLayers", "LoRA", "LowRankAdapters"]
