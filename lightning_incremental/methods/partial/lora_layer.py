"""The low-rank adapter layer of :class:`~lightning_incremental.LoRA`: one or more ``(A, B)`` pairs beside a linear
layer, and the initialization of ``A``."""

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_incremental.core.sharding import local, shard_of


class LowRankAdapters(nn.ModuleList):
    r"""The low-rank update of one linear layer: ``scaling * sum_k B_k A_k dropout(x)``, one ``(A, B)`` pair per set.

    :class:`~lightning_incremental.LoRA` attaches it to the layer as ``layer.lora`` and a forward hook adds its
    output to the layer's, so the layer keeps its type and its parameter names (``query.weight``) and the adapters
    appear beside them (``query.lora.0.A.weight``, ``query.lora.0.B.weight``). ``A`` (``rank x in``) starts as
    ``nn.Linear``'s own Kaiming-uniform draw and ``B`` (``out x rank``) at zero, so a new set changes nothing until
    it trains.

    Args:
        in_features: the layer's input size.
        out_features: the layer's output size.
        rank: the rank ``r`` of every set.
        alpha: the scale numerator: ``scaling = alpha / rank``.
        dropout: the probability of the dropout on the adapters' input (the layer's own path sees no dropout).

    Example::

        >>> adapters = LowRankAdapters(in_features=4, out_features=3, rank=2, alpha=4.0, dropout=0.0)
        >>> adapters.add(torch.Generator().manual_seed(0), like=torch.zeros(3, 4))
        >>> adapters.delta_weight().shape, adapters(torch.ones(5, 4)).abs().sum().item()  # B = 0: no change yet
        (torch.Size([3, 4]), 0.0)
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling, self.dropout = alpha / rank, dropout

    def add(self, generator: torch.Generator, like: Tensor) -> None:
        """Append a fresh set (``A`` drawn with ``generator``, ``B = 0``) on the device and dtype of ``like``."""
        pair = nn.ModuleDict(
            {
                "A": nn.Linear(self.in_features, self.rank, bias=False, device=like.device, dtype=like.dtype),
                "B": nn.Linear(self.rank, self.out_features, bias=False, device=like.device, dtype=like.dtype),
            }
        )
        self.append(pair)
        self.reset(len(self) - 1, generator)

    @torch.no_grad()
    def reset(self, index: int, generator: torch.Generator) -> None:
        """Re-draw ``A`` of set ``index`` and zero its ``B``."""
        kaiming_uniform_(self[index]["A"].weight, generator)
        self[index]["B"].weight.zero_()

    def delta_weight(self, index: int | None = None) -> Tensor:
        """``scaling * B A`` of set ``index`` (of every set summed when ``None``), in fp32, shaped like the weight."""
        pairs = list(self) if index is None else [self[index]]
        delta = sum(pair["B"].weight.float() @ pair["A"].weight.float() for pair in pairs)
        return self.scaling * delta

    @override
    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(x.to(self[0]["A"].weight.dtype), self.dropout, self.training)
        if len(self) == 1:
            return self.scaling * self[0]["B"](self[0]["A"](x))
        a = torch.cat([pair["A"].weight for pair in self])  # one matmul for all sets: [k * r, in]
        b = torch.cat([pair["B"].weight for pair in self], dim=1)  # [out, k * r]
        return self.scaling * F.linear(F.linear(x, a), b)

    @override
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint of a later task holds more sets than a freshly built model: grow to it before the sets load
        held = {key[len(prefix) :].split(".", 1)[0] for key in state_dict if key.startswith(prefix)}
        while str(len(self)) in held:
            like = self[0]["A"].weight
            self.add(torch.Generator().manual_seed(0), like)  # placeholder values: the checkpoint's replace them
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def kaiming_uniform_(weight: Tensor, generator: torch.Generator) -> None:
    """``nn.init.kaiming_uniform_(weight, a=sqrt(5))`` (nn.Linear's, PEFT's init of A), drawn on the CPU with
    ``generator``, so every rank and every run with the same generator draws the same values.

    >>> weight = torch.empty(2, 4)
    >>> kaiming_uniform_(weight, torch.Generator().manual_seed(0))
    >>> bool(weight.abs().max() <= 1 / 4**0.5)
    True
    """
    bound = 1.0 / math.sqrt(weight[0].numel())
    draw = torch.rand(weight.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
    with torch.no_grad():
        local(weight).copy_(shard_of(draw, weight))  # a sharded weight: its rank's part of the same draw
