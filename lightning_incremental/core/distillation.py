"""The distillation every method that matches an old model's class logits shares (LwF, iCaRL): the loss, and the
columns of the classes the old model knows."""

import functools

import torch
from torch import Tensor
from torch.nn import functional as F


def distillation_loss(new_logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    r"""``T^2 * KL(softmax(old / T) || softmax(new / T))``, averaged over the batch, in fp32.

    The ``T^2`` keeps the gradient's size independent of the temperature (Hinton et al., 2015).

    >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
    >>> distillation_loss(logits, logits, temperature=2.0).item()
    0.0
    >>> round(distillation_loss(torch.zeros(1, 2), torch.tensor([[10.0, -10.0]]), 1.0).item(), 4)
    0.6931
    """
    log_new = F.log_softmax(new_logits.float() / temperature, dim=-1)
    log_old = F.log_softmax(old_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_new, log_old, reduction="sum", log_target=True) / new_logits.shape[0]


def top_k_distillation_loss(new_logits: Tensor, old_top: Tensor, old_indices: Tensor, temperature: float) -> Tensor:
    r"""``T^2 * KL(p_old || p_new)`` over the old model's ``k`` largest logits of every row (``old_top`` and their
    vocabulary indices ``old_indices``, ``[rows, k]``): ``p_old`` is the softmax of those ``k``, ``p_new`` the new
    model's softmax over every column, read at them. Averaged over the rows, in fp32. With ``k`` every column it is
    :func:`distillation_loss`.

    >>> new, old = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, -1.0]])
    >>> top, indices = old.topk(3)
    >>> torch.allclose(top_k_distillation_loss(new, top, indices, 2.0), distillation_loss(new, old, 2.0))
    True
    """
    log_new = F.log_softmax(new_logits.float() / temperature, dim=-1).gather(-1, old_indices.long())
    log_old = F.log_softmax(old_top.float() / temperature, dim=-1)
    return temperature**2 * (log_old.exp() * (log_old - log_new)).sum() / new_logits.shape[0]


@functools.lru_cache(maxsize=16)
def class_columns(classes: tuple[int, ...], num_outputs: int, device: torch.device | str) -> Tensor | slice:
    """The output columns of ``classes`` as an index on ``device`` (every column, as a slice, when they are all of
    them), built once per (classes, outputs, device): no copy per step.

    >>> class_columns((0, 1), 4, "cpu"), class_columns((0, 1, 2, 3), 4, "cpu")
    (tensor([0, 1]), slice(None, None, None))
    """
    seen = sorted(set(classes))
    return slice(None) if len(seen) == num_outputs else torch.tensor(seen, device=device)
