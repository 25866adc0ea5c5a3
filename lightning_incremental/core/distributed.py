"""Collectives over the default process group, written once: every method that sums state over ranks uses them."""

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of ranks; ``(0, 1)`` without a process group.

    >>> rank_and_world_size()
    (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Every tensor summed over the ranks, in one collective over their flattened concatenation (one dtype and
    device for all); the tensors themselves without a process group or with a single rank.

    >>> all_reduce_sum([torch.ones(2), torch.zeros(1, 1)])
    [tensor([1., 1.]), tensor([[0.]])]
    """
    if rank_and_world_size()[1] == 1 or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]
