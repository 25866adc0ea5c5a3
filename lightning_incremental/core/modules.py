"""Copies of the user's model for methods that keep an old model (LwF, iCaRL, weight merging)."""

import copy

from torch import nn

from lightning_incremental.core.callback import _CHAIN_ATTRIBUTE


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
    for name in (_CHAIN_ATTRIBUTE, "training_step"):
        attribute = module.__dict__.get(name)
        if attribute is not None and name in module.__dict__:
            memo[id(attribute)] = None  # the copy must not share or clone the wrapper
    clone = copy.deepcopy(module, memo)
    for name in (_CHAIN_ATTRIBUTE, "training_step"):
        if clone.__dict__.get(name, ...) is None:
            del clone.__dict__[name]
    clone.eval()
    clone.requires_grad_(False)
    return clone
