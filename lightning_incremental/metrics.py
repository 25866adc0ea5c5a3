"""The continual-learning metrics as pure functions of the accuracy matrix.

``matrix[i, j]`` is the accuracy on task ``j``'s test set after training on tasks ``0..i``; a matrix with
``k + 1 < T`` rows is a stream in progress (tasks ``0..k`` seen). ``initial[j]`` is the accuracy on task
``j`` before any training (the ``b`` of Lopez-Paz & Ranzato, 2017), needed for forward transfer only.
Every function returns a 0-d float tensor; undefined values (BWT after one task) are ``nan``.

>>> R = torch.tensor([[0.9, 0.1, 0.2], [0.6, 0.8, 0.3], [0.5, 0.7, 0.9]])
>>> round(average_accuracy(R).item(), 4), round(backward_transfer(R).item(), 4)
(0.7, -0.25)
"""

import torch
from torch import Tensor


def _as_matrix(matrix: Tensor) -> Tensor:
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[0] > matrix.shape[1]:
        raise ValueError(
            f"`matrix` must be a 2-d accuracy matrix with 1 <= rows <= columns (rows: tasks trained, columns: "
            f"tasks evaluated), got shape {tuple(matrix.shape)}."
        )
    return matrix


def average_accuracy(matrix: Tensor) -> Tensor:
    """Mean accuracy over the tasks seen so far, after the last task trained: ``mean_j<=k R[k, j]``."""
    matrix = _as_matrix(matrix)
    last = matrix.shape[0] - 1
    return matrix[last, : last + 1].mean()


def average_incremental_accuracy(matrix: Tensor) -> Tensor:
    """The average accuracy after every task, averaged over tasks (Rebuffi et al., 2017).

    >>> round(average_incremental_accuracy(torch.tensor([[1.0, 0.0], [0.5, 0.9]])).item(), 4)
    0.85
    """
    matrix = _as_matrix(matrix)
    return torch.stack([matrix[i, : i + 1].mean() for i in range(matrix.shape[0])]).mean()


def backward_transfer(matrix: Tensor) -> Tensor:
    """BWT: how training on later tasks changed the accuracy on earlier ones; negative is forgetting.

    ``1/k * sum_{j<k} (R[k, j] - R[j, j])`` with ``k`` the last task trained (Lopez-Paz & Ranzato, 2017).
    """
    matrix = _as_matrix(matrix)
    last = matrix.shape[0] - 1
    if last == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (matrix[last, :last] - matrix.diagonal()[:last]).mean()


def forward_transfer(matrix: Tensor, initial: Tensor) -> Tensor:
    """FWT: how much training on earlier tasks helps a task before it is trained.

    ``1/k * sum_{1<=j<=k} (R[j-1, j] - b_j)`` with ``b = initial``, the accuracies before any training.

    >>> round(forward_transfer(torch.tensor([[0.9, 0.3], [0.5, 0.8]]), torch.tensor([0.5, 0.1])).item(), 4)
    0.2
    """
    matrix = _as_matrix(matrix)
    initial = torch.as_tensor(initial, dtype=torch.float64)
    if initial.shape != matrix.shape[1:]:
        raise ValueError(f"`initial` must hold one accuracy per task ({matrix.shape[1]}), got {tuple(initial.shape)}.")
    last = matrix.shape[0] - 1
    if last == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    before_training = torch.stack([matrix[j - 1, j] for j in range(1, last + 1)])
    return (before_training - initial[1 : last + 1]).mean()


def forgetting(matrix: Tensor) -> Tensor:
    """Average forgetting: the drop from each earlier task's best accuracy to its accuracy now.

    ``1/k * sum_{j<k} max_{j<=l<k} (R[l, j] - R[k, j])`` (Chaudhry et al., 2018).

    >>> round(forgetting(torch.tensor([[0.9, 0.0], [0.4, 1.0]])).item(), 4)
    0.5
    """
    matrix = _as_matrix(matrix)
    last = matrix.shape[0] - 1
    if last == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    drops = [(matrix[j:last, j] - matrix[last, j]).max() for j in range(last)]
    return torch.stack(drops).mean()
