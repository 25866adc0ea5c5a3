"""Copies of the user's model for methods that keep an old model (LwF, iCaRL, weight merging)."""

import copy
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from lightning_incremental.core.interface import ModelInterface
from lightning_incremental.core.step_chain import CHAIN_ATTRIBUTE


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode with ``requires_grad=False``, on the same device.

    The copy holds none of the methods' ``training_step`` wrapping (it would call back into the live
    model), so it is a plain model for forwards under ``torch.no_grad()``.

    >>> from torch import nn
    >>> old = frozen_copy(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    >>> old.training, any(p.requires_grad for p in old.parameters())
    (False, False)
    """
    memo = {}
    for name in (CHAIN_ATTRIBUTE, "training_step"):
        attribute = module.__dict__.get(name)
        if attribute is not None and name in module.__dict__:
            memo[id(attribute)] = None  # the copy must not share or clone the wrapper
    clone = copy.deepcopy(module, memo)
    for name in (CHAIN_ATTRIBUTE, "training_step"):
        if clone.__dict__.get(name, ...) is None:
            del clone.__dict__[name]
    clone.eval()
    clone.requires_grad_(False)
    return clone


class OldModel:
    """The frozen copy of the model a distillation method keeps from the last task end (LwF, iCaRL).

    ``keep`` replaces the copy (one copy, never one per task). The copy's weights go into the method's
    ``state_dict`` (:meth:`state_dict`); a loaded state is materialized as a copy of the live model with the
    saved weights at the next ``on_fit_start`` (:meth:`materialize`), once the model is known.

    >>> old = OldModel()
    >>> old.keep(nn.Linear(2, 3))
    >>> restored = OldModel()
    >>> restored.load_state_dict(old.state_dict())
    >>> restored.module is None, sorted(restored.state_dict())
    (True, ['bias', 'weight'])
    """

    def __init__(self) -> None:
        self.module: nn.Module | None = None
        self._saved_weights: dict[str, Tensor] | None = None  # from a checkpoint, until the model is known

    def keep(self, model: nn.Module) -> None:
        """Replace the old model by a frozen copy of ``model``."""
        self.module, self._saved_weights = frozen_copy(model), None

    def materialize(self, pl_module: LightningModule) -> None:
        """Build the old model from loaded weights (a copy of ``pl_module``) and put it on the model's device."""
        if self._saved_weights is not None:
            self.module = frozen_copy(pl_module)
            self.module.load_state_dict(self._saved_weights)
            self._saved_weights = None
        if self.module is not None:
            self.module.to(pl_module.device)

    def logits(self, trainer: Trainer, batch: Any, interface: ModelInterface) -> Tensor:
        """The old model's logits for ``batch``, without gradient and under the live model's precision context."""
        if self.module is None:
            raise RuntimeError("There is no old model before the first task ends.")
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            return interface.predict(self.module, batch)

    def state_dict(self) -> dict[str, Tensor] | None:
        """The old model's weights on the CPU, or ``None`` before the first task ends."""
        if self.module is not None:
            return {name: t.detach().cpu() for name, t in self.module.state_dict().items()}
        return self._saved_weights

    def load_state_dict(self, weights: dict[str, Tensor] | None) -> None:
        self.module, self._saved_weights = None, weights
