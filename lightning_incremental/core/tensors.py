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


def is_growth(old_shape: torch.Size, new_shape: torch.Size) -> bool:
    """Whether ``new_shape`` is ``old_shape`` or a growth of it (same number of dimensions, none smaller).

    >>> is_growth(torch.Size([2, 8]), torch.Size([4, 8])), is_growth(torch.Size([4, 8]), torch.Size([8, 4]))
    (True, False)
    """
    return len(old_shape) == len(new_shape) and all(old <= new for old, new in zip(old_shape, new_shape, strict=True))
