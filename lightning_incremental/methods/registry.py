"""The registry of methods: the command line, the benchmarks and the conformance suite read it.

A method joins by adding a :class:`MethodSpec` to the ``METHODS`` list of its family's module and that
module to ``_FAMILIES`` below. ``build(stream)`` returns fresh callbacks for one run over ``stream``, with
the method's documented defaults.
"""

from collections.abc import Callable
from dataclasses import dataclass

from lightning.pytorch import Callback

from lightning_incremental.scenarios.stream import TaskStream


@dataclass(frozen=True)
class MethodSpec:
    """How to run one method.

    Attributes:
        name: the name on the command line (``"ewc"``).
        family: ``"baseline"``, ``"regularization"``, ``"replay"``, ``"distillation"``, …
        summary: one line for ``--help`` and the README.
        build: ``build(stream) -> callbacks`` for a run over ``stream``.
        cumulative: train each task on the union of the tasks so far (the joint upper bound).
    """

    name: str
    family: str
    summary: str
    build: Callable[[TaskStream], list[Callback]]
    cumulative: bool = False


def _families() -> list[list[MethodSpec]]:
    from lightning_incremental.methods import baselines, distillation, fusion, partial, regularization, replay

    return [
        baselines.METHODS,
        regularization.METHODS,
        replay.METHODS,
        distillation.METHODS,
        partial.METHODS,
        fusion.METHODS,
    ]


def registry() -> dict[str, MethodSpec]:
    """Every registered method by name, baselines first.

    >>> list(registry())[:2]
    ['naive', 'joint']
    """
    specs = [spec for family in _families() for spec in family]
    names = [spec.name for spec in specs]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise RuntimeError(f"Method names registered twice: {duplicated}.")
    return {spec.name: spec for spec in specs}


def get_method(name: str) -> MethodSpec:
    """The method called ``name``; an unknown name gets an error listing the valid ones."""
    methods = registry()
    if name not in methods:
        raise KeyError(f"Unknown method {name!r}; choose from {', '.join(methods)}.")
    return methods[name]
