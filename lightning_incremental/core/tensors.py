"""Tensor helpers every method's state needs when the model changes shape between tasks."""

import torch
from torch import Tensor


def grow_to(tensor: Tensor, shape: torch.Size) -> Tensor:
    """Zero-pad ``tensor`` to the larger ``shape``, the old entries in front (a classifier that grew rows).

    >>> grow_to(torch.ones(1, 2), torch.Size([2, 2])).tolist()
    [[1.0, 1.0], [0.0, 0.0]]
    """
    if tensor.shape == shape:
        return tensor
    if tensor.ndim != len(shape) or any(old > new for old, new in zip(tensor.shape, shape, strict=True)):
        raise ValueError(f"cannot pad a tensor of shape {tuple(tensor.shape)} to {tuple(shape)}")
    padded = tensor.new_zeros(shape)
    padded[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return padded
