"""Finding the model's logits module and its classifier layer: the one place that decides where they are.

- **With a batch at hand** (the step chain, iCaRL): one probe forward, in eval mode and without gradient, with a
  forward hook on every submodule. The submodules whose output *is* the tensor the model returns as logits (the
  same object, never a shape test) produce the logits, in the order their calls finished. The outermost one, the
  last to finish, is the **logits module**: the step chain records its output (for ``self.net = nn.Sequential(...)``
  that is ``net``). The innermost one, the first to finish, is the **classifier layer**, whose input is the
  model's features (the last ``Linear`` of that ``Sequential``).
- **Before any data** (the closed-form heads put their layer in place of the model's head in ``setup``, before a
  checkpoint restore and before the first batch): by name, the first submodule called ``head``, ``classifier`` or
  ``fc`` (:func:`head_by_name`).

A name the user gives (``logits_module=``, ``feature_module=``, ``head_module=``) always wins, and a name that is
not a submodule is refused with the list of submodules (:func:`resolve_submodule`).

Hooks sit on submodules, never on the LightningModule: under DDP its ``forward`` runs the whole training step.
"""

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss
from torchmetrics import Metric

from lightning_incremental.core.batch import batch_size_of
from lightning_incremental.core.interface import ModelInterface
from lightning_incremental.core.passes import eval_mode

HEAD_NAMES = ("head", "classifier", "fc")
"""The submodule names a head is looked for under before any data, in this order."""


def submodule_names(root: nn.Module) -> list[str]:
    """The dotted names of ``root``'s submodules that can produce outputs (losses and metrics left out)."""
    return [name for name, module in root.named_modules() if name and not isinstance(module, (_Loss, Metric))]


def resolve_submodule(root: nn.Module, module: str | nn.Module, argument: str) -> nn.Module:
    """The submodule ``module`` names in ``root`` (or ``module`` itself); a name that is not one is refused with
    the list of submodules, naming the user's ``argument``.

    >>> resolve_submodule(nn.Sequential(nn.Linear(2, 2)), "0", "logits_module")
    Linear(in_features=2, out_features=2, bias=True)
    """
    if isinstance(module, nn.Module):
        return module
    try:
        return root.get_submodule(module)
    except AttributeError:
        raise ValueError(
            f"`{argument}={module!r}` is not a submodule of {type(root).__name__}. Its submodules are: "
            f"{submodule_names(root)}."
        ) from None


def check_submodule_argument(argument: str, module: Any) -> None:
    """Refuse a ``logits_module=`` / ``feature_module=`` that is neither a submodule name, a submodule nor None."""
    if module is not None and not isinstance(module, (str, nn.Module)):
        raise TypeError(f"`{argument}` must be a submodule name, a submodule or None, got {module!r}.")


def logits_producers(root: nn.Module, batch: Any, interface: ModelInterface) -> list[tuple[str, nn.Module, Any]]:
    """``(name, submodule, input)`` of every submodule call whose output holds the logits the model returns for
    ``batch``, innermost (first to finish) first; one probe forward in eval mode, without gradient.

    >>> root = nn.Sequential(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> [name for name, _, _ in logits_producers(root, (torch.randn(5, 3), None), ModelInterface())]
    ['0.2', '0']
    """
    calls: list[tuple[str, nn.Module, tuple, Any]] = []
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, m, args, out)))
        for name, module in root.named_modules()
        if name and not isinstance(module, (_Loss, Metric))
    ]
    try:
        with torch.no_grad(), eval_mode(root):
            logits = interface.predict(root, batch)
    finally:
        for handle in handles:
            handle.remove()
    producers = [(name, module, args[0] if args else None) for name, module, args, out in calls if _holds(out, logits)]
    if not producers:
        raise RuntimeError(
            f"Could not find the module that produces the logits of {type(root).__name__}: no submodule returned the "
            f"tensor the model returns. Pass `logits_module=` naming one of {submodule_names(root)}."
        )
    return producers


def head_by_name(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The model's head before any data: the first submodule (or property, such as ``MLPClassifier.head``) called
    one of :data:`HEAD_NAMES`, else the first nested one; ``(registered name, module)``, or ``None``.

    >>> head_by_name(nn.ModuleDict({"backbone": nn.Linear(4, 4), "classifier": nn.Linear(4, 2)}))[0]
    'classifier'
    """
    names = [name for name, _ in model.named_modules() if name]
    found: nn.Module | None = None
    for candidate in HEAD_NAMES:
        try:
            found = model.get_submodule(candidate)
            break
        except AttributeError:
            continue
    if found is None:
        nested = next((n for c in HEAD_NAMES for n in names if n.rpartition(".")[2] == c), None)
        found = model.get_submodule(nested) if nested is not None else None
    if found is None:
        return None
    path = next((n for n, m in model.named_modules() if m is found and n), None)
    return None if path is None else (path, found)


class FeatureCapture:
    """The features the model's classifier reads: the input of its classifier layer.

    Args:
        feature_module: the dotted name of the layer whose input is the features (``"net.4"``, ``"head"``), the
            layer itself, or ``None`` to find the classifier layer (see the module docstring) on first use.

    Example::

        >>> root = nn.Sequential(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> capture = FeatureCapture()
        >>> features, logits = capture.forward(root, (torch.randn(5, 3), None), ModelInterface())
        >>> capture.name, tuple(features.shape), tuple(logits.shape)
        ('0.2', (5, 8), (5, 2))
    """

    def __init__(self, feature_module: str | nn.Module | None = None) -> None:
        check_submodule_argument("feature_module", feature_module)
        self.name: str | None = feature_module if isinstance(feature_module, str) else None
        self._module: nn.Module | None = feature_module if isinstance(feature_module, nn.Module) else None

    def module(self, root: nn.Module) -> nn.Module | None:
        """The feature module inside ``root``; ``None`` while it is still to be found."""
        if self._module is not None:
            return self._module
        return None if self.name is None else resolve_submodule(root, self.name, "feature_module")

    def forward(self, root: nn.Module, batch: Any, interface: ModelInterface) -> tuple[Tensor, Tensor]:
        """One forward of ``batch``: ``(features, logits)``, the features being the feature module's input."""
        layer = self.module(root)
        if layer is None:
            self.name = logits_producers(root, batch, interface)[0][0]
            layer = resolve_submodule(root, self.name, "feature_module")
        recorded: list[Any] = []
        handle = layer.register_forward_pre_hook(lambda _m, args: recorded.append(args[0] if args else None))
        try:
            logits = interface.predict(root, batch)
        finally:
            handle.remove()
        if not recorded:
            raise RuntimeError(
                f"The feature module {self.name or type(layer).__name__!r} did not run during the model's forward. "
                "Check `feature_module=`: it must be a layer the model's forward runs."
            )
        features = recorded[-1]
        rows = batch_size_of(batch)
        if not (isinstance(features, Tensor) and features.is_floating_point() and features.ndim >= 2):
            features = None
        if features is None or features.shape[0] != rows:
            raise ValueError(
                f"The input of the feature module {self.name or type(layer).__name__!r} is not a floating tensor of "
                f"shape [batch, features, ...]. Pass `feature_module=` naming the classifier layer, whose input is the "
                "features."
            )
        return features, logits


def _holds(output: Any, logits: Tensor) -> bool:
    if output is logits:
        return True
    if isinstance(output, (tuple, list)):
        return bool(output) and output[0] is logits
    return getattr(output, "logits", None) is logits or (isinstance(output, dict) and output.get("logits") is logits)
