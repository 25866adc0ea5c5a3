"""Capture the logits the user's model computes, and the features its classifier reads, with hooks on submodules.

The hook sits on a submodule, never on the LightningModule: under DDP the LightningModule's ``forward`` is
redirected to ``training_step`` and a hook there would see the loss. The submodule is the one the user
names (``logits_module="head"``) or, by default, discovered during the first call: the last submodule to
finish its forward with a floating output of shape ``[batch, classes, ...]`` — for ``self.net =
nn.Sequential(...)`` that is ``net``, whose output is the model's output. :class:`FeatureCapture` records the
input of the classifier layer instead (the innermost module that produces those logits).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.loss import _Loss
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric


def _candidate_names(root: nn.Module) -> list[str]:
    return [name for name, module in root.named_modules() if name and not isinstance(module, (_Loss, Metric))]


def _looks_like_logits(output: object, batch_size: int | None) -> bool:
    return (
        isinstance(output, Tensor)
        and output.is_floating_point()
        and output.ndim >= 2
        and (batch_size is None or output.shape[0] == batch_size)
    )


@contextmanager
def _calls_returning_logits(root: nn.Module, batch_size: int | None) -> Iterator[list[tuple[str, tuple, Tensor]]]:
    """Inside the block, record ``(name, inputs, output)`` of every submodule call whose output looks like logits."""
    calls: list[tuple[str, tuple, Tensor]] = []
    handles = [
        sub.register_forward_hook(
            lambda _m, args, out, name=name: (
                calls.append((name, args, out)) if _looks_like_logits(out, batch_size) else None
            )
        )
        for name, sub in root.named_modules()
        if name and not isinstance(sub, (_Loss, Metric))
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


class LogitsCapture:
    """Record the output of the model's logits module while a piece of code runs.

    Args:
        logits_module: the dotted name of the submodule whose output is the logits (``"head"``,
            ``"net.4"``), a submodule itself, or ``None`` to discover it on first use.

    Example::

        >>> import torch
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> root = nn.ModuleDict({"net": model})
        >>> capture = LogitsCapture()
        >>> with capture.recording(root, batch_size=5) as record:
        ...     _ = root["net"](torch.randn(5, 3))
        >>> capture.name, tuple(record.logits.shape)
        ('net', (5, 2))
    """

    argument = "logits_module"  # the name of the user's argument, for error messages

    def __init__(self, logits_module: str | nn.Module | None = None) -> None:
        if logits_module is not None and not isinstance(logits_module, (str, nn.Module)):
            raise TypeError(
                f"`{self.argument}` must be a submodule name, a submodule or None, got {type(logits_module).__name__}."
            )
        self.name: str | None = logits_module if isinstance(logits_module, str) else None
        self._module: nn.Module | None = logits_module if isinstance(logits_module, nn.Module) else None

    def module(self, root: nn.Module) -> nn.Module | None:
        """The resolved logits module inside ``root``; ``None`` while it is still to be discovered."""
        if self._module is not None:
            return self._module
        if self.name is None:
            return None
        try:
            return root.get_submodule(self.name)
        except AttributeError:
            raise ValueError(
                f"`{self.argument}={self.name!r}` is not a submodule of {type(root).__name__}. "
                f"Its submodules are: {_candidate_names(root)}."
            ) from None

    def name_in(self, root: nn.Module) -> str:
        """The dotted name of the logits module inside ``root`` (after discovery), to find it in a copy."""
        module = self.module(root)
        if self.name is not None:
            return self.name
        if module is None:
            raise RuntimeError("The logits module is not discovered yet: record one forward first.")
        name = next((n for n, sub in root.named_modules() if sub is module), None)
        if name is None:
            raise ValueError(f"`{self.argument}` is not a submodule of {type(root).__name__}.")
        return name

    @contextmanager
    def recording(self, root: nn.Module, batch_size: int | None = None) -> Iterator["_Record"]:
        """Hook the logits module of ``root`` for the duration of the block; the record holds its outputs
        (:class:`FeatureCapture`: the inputs of the feature module).

        ``batch_size`` guides discovery: only outputs with that many rows count as logits.
        """
        record = _Record(self.argument)
        module = self.module(root)
        if module is not None:
            handle = self._hook(module, record, batch_size)
            try:
                yield record
            finally:
                handle.remove()
            return

        with _calls_returning_logits(root, batch_size) as calls:
            yield record
        if not calls:
            raise RuntimeError(self._not_found(root))
        self._adopt(calls, record, batch_size)

    def _hook(self, module: nn.Module, record: "_Record", batch_size: int | None) -> RemovableHandle:
        """Record what the block's calls of the named ``module`` produce."""
        return module.register_forward_hook(lambda _m, _i, out: record.outputs.append(out))

    def _not_found(self, root: nn.Module) -> str:
        return (
            f"Could not find the module that produces the logits of {type(root).__name__}: no submodule "
            "returned a floating tensor of shape [batch, classes]. Pass `logits_module=` naming one of "
            f"{_candidate_names(root)}."
        )

    def _adopt(self, calls: list[tuple[str, tuple, Tensor]], record: "_Record", batch_size: int | None) -> None:
        """Discovery: name the last module that returned logits, and record its outputs."""
        self.name = calls[-1][0]
        record.outputs.extend(out for name, _, out in calls if name == self.name)


class FeatureCapture(LogitsCapture):
    """Record the features the model's classifier reads: the input of its classifier layer.

    Args:
        feature_module: the dotted name of the layer whose input is the features (``"net.4"``, ``"head"``),
            the layer itself, or ``None`` to discover it on first use: the innermost submodule whose output is
            the logits (the output :class:`LogitsCapture` finds) — for ``nn.Sequential(..., nn.Linear(8, 2))``
            the last ``Linear``, whose input is the penultimate representation.

    Example::

        >>> import torch
        >>> root = nn.ModuleDict({"net": nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))})
        >>> capture = FeatureCapture()
        >>> with capture.recording(root, batch_size=5) as record:
        ...     _ = root["net"](torch.randn(5, 3))
        >>> capture.name, tuple(record.features.shape)
        ('net.2', (5, 8))
    """

    argument = "feature_module"

    def __init__(self, feature_module: str | nn.Module | None = None) -> None:
        super().__init__(feature_module)

    def _hook(self, module: nn.Module, record: "_Record", batch_size: int | None) -> RemovableHandle:
        return module.register_forward_pre_hook(
            lambda _m, args: record.outputs.append(self._features_in(args, batch_size))
        )

    def _not_found(self, root: nn.Module) -> str:
        return (
            f"Could not find the classifier layer of {type(root).__name__}: no submodule returned a floating "
            "tensor of shape [batch, classes]. Pass `feature_module=` naming the layer whose input is the "
            f"features, one of {_candidate_names(root)}."
        )

    def _adopt(self, calls: list[tuple[str, tuple, Tensor]], record: "_Record", batch_size: int | None) -> None:
        """Discovery: name the innermost module that produced the logits, and record its inputs."""
        logits = calls[-1][2]
        self.name = next(name for name, _, out in calls if out is logits)
        record.outputs.extend(self._features_in(args, batch_size) for name, args, _ in calls if name == self.name)

    def _features_in(self, args: tuple[Any, ...], batch_size: int | None) -> Tensor:
        features = args[0] if args else None
        if not _looks_like_logits(features, batch_size):
            raise ValueError(
                f"The input of the feature module {self.name or type(self._module).__name__!r} is not a floating "
                "tensor of shape [batch, features, ...]. Pass `feature_module=` naming the classifier layer, whose "
                "input is the features."
            )
        return features


class _Record:
    """The outputs the logits module produced (or the inputs the feature module read) inside one block."""

    def __init__(self, argument: str = "logits_module") -> None:
        self.argument = argument
        self.outputs: list[Tensor] = []

    @property
    def logits(self) -> Tensor:
        """The last output of the logits module (the last input of the feature module)."""
        if not self.outputs:
            raise RuntimeError(
                f"The {self.argument.replace('_', ' ')} did not run during this step. Check `{self.argument}=`: it "
                "must be a submodule the model's forward runs."
            )
        return self.outputs[-1]

    @property
    def features(self) -> Tensor:
        return self.logits
