"""Freezing parameters for one fit and releasing them after: written once for every method that trains a part
of the model (FreezeLayers, LoRA).

Freezing happens in ``setup``, before the strategy wraps the model and before ``configure_optimizers``, so an
optimizer over the parameters that require grad never sees the frozen ones. BatchNorm layers whose parameters
are all frozen are held in eval mode while training (Lightning 2.6 leaves submodule modes alone in fit, and a
user's ``.train()`` would move their statistics). ``release`` gives everything back as it was.
"""

from collections.abc import Iterable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class FrozenPart:
    """The parameters a method froze for the fit under way, and the BatchNorm layers it holds in eval mode.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1)).train()
    >>> frozen = FrozenPart()
    >>> frozen.freeze(net, net[:2].parameters(), batchnorms=[net[1]])
    >>> frozen.hold_batchnorms_in_eval()
    >>> [p.requires_grad for p in net.parameters()], net[1].training
    ([False, False, False, False, True, True], False)
    >>> frozen.release()
    >>> all(p.requires_grad for p in net.parameters()), net[1].training
    (True, True)
    """

    def __init__(self) -> None:
        # set to requires_grad=False by this object, as (the module that holds it, its attribute name): released
        # through the module, whose parameter fully_shard may have replaced by a sharded one since
        self.parameters: list[tuple[nn.Module, str]] = []
        self.batchnorms: list[nn.Module] = []  # held in eval mode while training
        self._modes: dict[nn.Module, bool] = {}  # BatchNorm layers put in eval mode -> their mode before

    def __bool__(self) -> bool:
        return bool(self.parameters)

    def freeze(
        self, model: nn.Module, parameters: Iterable[nn.Parameter], batchnorms: Iterable[nn.Module] = ()
    ) -> None:
        """Set ``requires_grad=False`` on those of ``parameters`` (of ``model``) that train (their stale gradient
        dropped, so it never reaches an optimizer), and hold ``batchnorms`` in eval mode from
        :meth:`hold_batchnorms_in_eval`."""
        owners = {
            id(p): (module, name) for module in model.modules() for name, p in module.named_parameters(recurse=False)
        }
        for p in parameters:
            if p.requires_grad:
                p.requires_grad_(False)
                p.grad = None
                self.parameters.append(owners[id(p)])
        self.batchnorms.extend(batchnorms)

    def hold_batchnorms_in_eval(self) -> None:
        """Put the held BatchNorm layers in eval mode (call it at every training epoch's start)."""
        for bn in self.batchnorms:
            self._modes.setdefault(bn, bn.training)
            bn.eval()

    def release(self) -> None:
        """Give every frozen parameter ``requires_grad=True`` and every held BatchNorm layer its mode back."""
        for module, name in self.parameters:
            getattr(module, name).requires_grad_(True)
        for bn, mode in self._modes.items():
            bn.train(mode)
        self.parameters, self.batchnorms, self._modes = [], [], {}


def batchnorms_without_training(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``module`` none of whose parameters require grad (none trains in this fit).

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    >>> _ = net[1].requires_grad_(False)
    >>> batchnorms_without_training(net) == [net[1]]
    True
    """
    return [
        m for m in module.modules() if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters())
    ]
