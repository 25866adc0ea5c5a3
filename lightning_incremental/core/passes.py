"""Passes a method makes over data for itself (an importance estimate, a buffer fill, features for a head).

They must leave the user's training exactly as it would have been without them: the model's train/eval mode
comes back even on an exception, and the global random stream the user's shuffling and dropout draw from is
untouched (a shuffled DataLoader draws its seed from it at every ``iter``).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block; its own mode (and every submodule's) back after, even on error.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> net[1].eval()  # a submodule the user keeps in eval mode stays so
    Dropout(p=0.5, inplace=False)
    >>> with eval_mode(net):
    ...     net.training
    False
    >>> net.training, net[1].training
    (True, False)
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes:
            submodule.training = training


@contextmanager
def private_pass(module: nn.Module) -> Iterator[nn.Module]:
    """A pass of a method's own: eval mode and the global RNG state (CPU and the
    module's accelerator) restored after, so the user's random stream is the same as without the pass.

    >>> net = nn.Linear(2, 2)
    >>> before = torch.rand(1)
    >>> state = torch.get_rng_state()
    >>> with private_pass(net):
    ...     _ = torch.rand(1000)
    >>> torch.equal(torch.get_rng_state(), state)
    True
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(module):
        yield module
