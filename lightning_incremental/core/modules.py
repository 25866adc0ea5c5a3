"""Copies of the user's model for methods that keep an old model (LwF, iCaRL, weight merging)."""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from lightning_incremental.core.interface import ModelInterface
from lightning_incremental.core.passes import eval_mode
from lightning_incremental.core.sharding import any_sharded, full_state, is_sharded, local, shard_state
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
    """The frozen model a distillation method keeps from the last task end (LwF, iCaRL).

    ``keep`` replaces it (one old model, never one per task). Its weights go into the method's ``state_dict``
    (:meth:`state_dict`); a loaded state is materialized at the next ``on_fit_start`` (:meth:`materialize`), once the
    model is known.

    Unsharded, it is a frozen copy of the model. A ``fully_shard``-ed model cannot be copied (FSDP refuses
    ``deepcopy``): the old weights are kept as this rank's shards, and the old model's outputs are the live model's
    with them swapped into its shards for one forward (:meth:`logits`), under ``torch.no_grad`` and in eval mode.
    Each rank thus holds 1/world of the old weights, plus one more shard-sized copy during that forward.

    >>> old = OldModel()
    >>> old.keep(nn.Linear(2, 3))
    >>> restored = OldModel()
    >>> restored.load_state_dict(old.state_dict())
    >>> restored.kept, sorted(restored.state_dict())
    (False, ['bias', 'weight'])
    """

    def __init__(self) -> None:
        self.module: nn.Module | None = None  # the frozen copy of an unsharded model
        self._saved_weights: dict[str, Tensor] | None = None  # from a checkpoint, until the model is known
        self._shards: dict[str, Tensor] | None = None  # a sharded model's old weights: this rank's shards
        self._live: nn.Module | None = None  # the sharded model the shards are swapped into

    @property
    def kept(self) -> bool:
        """Whether there is an old model to ask (a task has ended, and the model is known)."""
        return self.module is not None or self._shards is not None

    def keep(self, model: nn.Module) -> None:
        """Replace the old model by ``model`` as it is now: a frozen copy, or its sharded weights."""
        self._saved_weights = None
        if any_sharded(model.parameters()):
            self.module, self._live = None, model
            self._shards = {name: local(t).detach().clone() for name, t in model.state_dict(keep_vars=True).items()}
        else:
            self.module, self._shards, self._live = frozen_copy(model), None, None

    def materialize(self, pl_module: LightningModule) -> None:
        """Build the old model from loaded weights (a copy of ``pl_module``, or its shards) on the model's device."""
        if any_sharded(pl_module.parameters()):
            self._live = pl_module
            if self._saved_weights is not None:
                self._shards = shard_state(self._saved_weights, pl_module.state_dict(keep_vars=True))
                self._saved_weights = None
            return
        if self._saved_weights is not None:
            self.module = frozen_copy(pl_module)
            self.module.load_state_dict(self._saved_weights)
            self._saved_weights = None
        if self.module is not None:
            self.module.to(pl_module.device)

    def logits(self, trainer: Trainer, batch: Any, interface: ModelInterface) -> Tensor:
        """The old model's logits for ``batch``, without gradient and under the live model's precision context."""
        if self._shards is not None and self._live is not None:
            swapped = _swapped(self._live, self._shards)
            with torch.no_grad(), swapped, eval_mode(self._live), trainer.precision_plugin.forward_context():
                return interface.predict(self._live, batch)
        if self.module is None:
            raise RuntimeError("There is no old model before the first task ends.")
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            return interface.predict(self.module, batch)

    def state_dict(self) -> dict[str, Tensor] | None:
        """The old model's weights, full, on the CPU (gathered from the ranks' shards: a collective under sharding),
        or ``None`` before the first task ends."""
        if self._shards is not None and self._live is not None:
            live = self._live.state_dict(keep_vars=True)
            return full_state(self._shards, {name: t for name, t in live.items() if is_sharded(t)})
        if self.module is not None:
            return {name: t.detach().cpu() for name, t in self.module.state_dict().items()}
        return self._saved_weights

    def load_state_dict(self, weights: dict[str, Tensor] | None) -> None:
        self.module, self._shards, self._saved_weights = None, None, weights


@contextmanager
def _swapped(model: nn.Module, shards: dict[str, Tensor]) -> Iterator[None]:
    """``model`` with ``shards`` copied into its tensors' local shards inside the block, its own values back after."""
    live = model.state_dict(keep_vars=True)
    targets = [local(live[name]).detach() for name in shards]
    own = [t.clone() for t in targets]
    torch._foreach_copy_(targets, list(shards.values()))
    try:
        yield
    finally:
        torch._foreach_copy_(targets, own)
