"""Capture the logits the user's model computes, with a forward hook on a submodule.

The hook sits on a submodule, never on the LightningModule: under DDP the LightningModule's ``forward`` is
redirected to ``training_step`` and a hook there would see the loss. The submodule is the one the user
names (``logits_module="head"``) or, by default, discovered during the first call: the last submodule to
finish its forward with a floating output of shape ``[batch, classes, ...]`` — for ``self.net =
nn.Sequential(...)`` that is ``net``, whose output is the model's output.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.modules.loss import _Loss
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

    def __init__(self, logits_module: str | nn.Module | None = None) -> None:
        if logits_module is not None and not isinstance(logits_module, (str, nn.Module)):
            raise TypeError(
                f"`logits_module` must be a submodule name, a submodule or None, got {type(logits_module).__name__}."
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
                f"`logits_module={self.name!r}` is not a submodule of {type(root).__name__}. "
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
            raise ValueError(f"`logits_module` is not a submodule of {type(root).__name__}.")
        return name

    @contextmanager
    def recording(self, root: nn.Module, batch_size: int | None = None) -> Iterator["_Record"]:
        """Hook the logits module of ``root`` for the duration of the block; the record holds its outputs.

        ``batch_size`` guides discovery: only outputs with that many rows count as logits.
        """
        record = _Record()
        module = self.module(root)
        if module is not None:
            handle = module.register_forward_hook(lambda _m, _i, out: record.outputs.append(out))
            try:
                yield record
            finally:
                handle.remove()
            return

        finished: list[tuple[str, Tensor]] = []
        handles = [
            sub.register_forward_hook(
                lambda _m, _i, out, name=name: (
                    finished.append((name, out)) if _looks_like_logits(out, batch_size) else None
                )
            )
            for name, sub in root.named_modules()
            if name and not isinstance(sub, (_Loss, Metric))
        ]
        try:
            yield record
        finally:
            for handle in handles:
                handle.remove()
        if not finished:
            raise RuntimeError(
                f"Could not find the module that produces the logits of {type(root).__name__}: no submodule "
                "returned a floating tensor of shape [batch, classes]. Pass `logits_module=` naming one of "
                f"{_candidate_names(root)}."
            )
        self.name = finished[-1][0]
        record.outputs.extend(out for name, out in finished if name == self.name)


class _Record:
    """The outputs the logits module produced inside one ``recording`` block."""

    def __init__(self) -> None:
        self.outputs: list[Tensor] = []

    @property
    def logits(self) -> Tensor:
        if not self.outputs:
            raise RuntimeError(
                "The logits module did not run during this step. Check `logits_module=`: it must be the "
                "submodule that computes the model's output."
            )
        return self.outputs[-1]
