"""The continual-learning methods, one module per family, and their registry."""

from lightning_incremental.methods.registry import MethodSpec, get_method, registry

__all__ = ["MethodSpec", "get_method", "registry"]
