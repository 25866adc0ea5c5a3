"""Partial training: a fixed part of the model and an updatable part."""

from lightning_incremental.methods.partial.freeze import FreezeLayers

__all__ = ["FreezeLayers"]
