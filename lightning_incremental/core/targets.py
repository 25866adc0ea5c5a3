"""What the targets of a batch are: the one answer to "are these class labels?", and the label losses ignore.

Every method that needs class labels (class-balanced replay, iCaRL, growing heads, the closed-form heads, the
default accuracy) asks :func:`are_class_labels`, so they agree on every target type: integer labels of shape
``[B]`` or ``[B, 1]`` are class labels; floats are real values (regression); bools are binary or multi-label
outcomes, which the model interface reads with a Bernoulli likelihood, never as class indices.
"""

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""The label PyTorch's and Hugging Face's losses skip (prompt and padding tokens): never a class."""


def are_class_labels(targets: Tensor) -> bool:
    """One integer class label per row: an integer (not bool) tensor of shape ``[B]`` or ``[B, 1]``.

    >>> are_class_labels(torch.tensor([0, 3])), are_class_labels(torch.tensor([[1], [2]]))
    (True, True)
    >>> are_class_labels(torch.tensor([0.0, 1.0])), are_class_labels(torch.tensor([True, False]))
    (False, False)
    >>> are_class_labels(torch.zeros(2, 5, dtype=torch.long))  # token-level labels
    False
    """
    integer = not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool
    return integer and (targets.ndim == 1 or (targets.ndim == 2 and targets.shape[1] == 1))
