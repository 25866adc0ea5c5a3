"""The continual-learning metrics as pure functions of the metric matrix.

``matrix[i, j]`` is a metric (accuracy, MSE, F1, …) on task ``j``'s test set after training on tasks ``0..i``;
a matrix with ``k + 1 < T`` rows is a stream in progress (tasks ``0..k`` seen). ``initial[j]`` is the metric on
task ``j`` before any training (the ``b`` of Lopez-Paz & Ranzato, 2017), needed for forward transfer only.
Every function returns a 0-d float tensor; undefined values (BWT after one task) are ``nan``.

The transfer metrics follow the direction of the metric (``higher_is_better``), so that they read the same
for every metric, in the metric's own units:

- **BWT** and **FWT**: negative is worse. For a lower-is-better metric (an error such as MSE) BWT is the
  mean *decrease* of the error on earlier tasks, so a rise of the error gives a negative BWT.
- **forgetting**: positive is worse. For a lower-is-better metric it is the mean *increase* of each earlier
  task's error above its best (lowest) value.

>>> R = torch.tensor([[0.9, 0.1, 0.2], [0.6, 0.8, 0.3], [0.5, 0.7, 0.9]])  # accuracies
>>> round(average_metric(R).item(), 4), round(backward_transfer(R).item(), 4), round(forgetting(R).item(), 4)
(0.7, -0.25, 0.25)
>>> E = torch.tensor([[0.1, 0.9], [0.4, 0.2]])  # MSE: task 0's error rose from 0.1 to 0.4 after task 1
>>> round(backward_transfer(E, higher_is_better=False).item(), 4), round(forgetting(E, False).item(), 4)
(-0.3, 0.3)
"""

import torch
from torch import Tensor


def _as_matrix(matrix: Tensor) -> Tensor:
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[0] > matrix.shape[1]:
        raise ValueError(
            f"`matrix` must be a 2-d metric matrix with 1 <= rows <= columns (rows: tasks trained, columns: "
            f"tasks evaluated), got shape {tuple(matrix.shape)}."
        )
    return matrix


def _sign(higher_is_better: bool) -> float:
    return 1.0 if higher_is_better else -1.0


def average_metric(matrix: Tensor) -> Tensor:
    """The mean metric over the tasks seen so far, after the last task trained: ``mean_j<=k R[k, j]``.

    With accuracy this is the average accuracy (ACC).
    """
    matrix = _as_matrix(matrix)
    last = matrix.shape[0] - 1
    return matrix[last, : last + 1].mean()


def average_incremental_metric(matrix: Tensor) -> Tensor:
    """The average metric after every task, averaged over tasks (average incremental accuracy, Rebuffi et al.,
    2017, with accuracy).

    >>> round(average_incremental_metric(torch.tensor([[1.0, 0.0], [0.5, 0.9]])).item(), 4)
    0.85
    """
    matrix = _as_matrix(matrix)
    return torch.stack([matrix[i, : i + 1].mean() for i in range(matrix.shape[0])]).mean()


def backward_transfer(matrix: Tensor, higher_is_better: bool = True) -> Tensor:
    """BWT: how training on later tasks changed the metric on earlier ones; negative is worse (forgetting).

    ``s/k * sum_{j<k} (R[k, j] - R[j, j])`` with ``k`` the last task trained (Lopez-Paz & Ranzato, 2017) and
    ``s = 1`` when higher is better, ``s = -1`` when lower is better (an error that rose gives a negative BWT).

    >>> round(backward_transfer(torch.tensor([[0.2, 0.5], [0.5, 0.1]]), higher_is_better=False).item(), 4)
    -0.3
    """
    matrix = _as_matrix(matrix)
    last = matrix.shape[0] - 1
    if last == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return _sign(higher_is_better) * (matrix[last, :last] - matrix.diagonal()[:last]).mean()


def forward_transfer(matrix: Tensor, initial: Tensor, higher_is_better: bool = True) -> Tensor:
    """FWT: how much training on earlier tasks helps a task before it is trained; negative is worse.

    ``s/k * sum_{1<=j<=k} (R[j-1, j] - b_j)`` with ``b = initial``, the metric before any training, and
    ``s = 1`` when higher is better, ``s = -1`` when lower is better.

    >>> round(forward_transfer(torch.tensor([[0.9, 0.3], [0.5, 0.8]]), torch.tensor([0.5, 0.1])).item(), 4)
    0.2
    >>> round(forward_transfer(torch.tensor([[0.1, 2.0], [0.5, 0.2]]), torch.tensor([4.0, 3.0]), False).item(), 4)
    1.0
    """
    matrix = _as_matrix(matrix)
    initial = torch.as_tensor(initial, dtype=torch.float64)
    if initial.shape != matrix.shape[1:]:
        raise ValueError(f"`initial` must hold one value per task ({matrix.shape[1]}), got {tuple(initial.shape)}.")
    last = matrix.shape[0] - 1
    if last == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    before_training = torch.stack([matrix[j - 1, j] for j in range(1, last + 1)])
    return _sign(higher_is_better) * (before_training - initial[1 : last + 1]).mean()


def forgetting(matrix: Tensor, higher_is_better: bool = True) -> Tensor:
    """Average forgetting: how far each earlier task's metric is now from its best; positive is worse.

    ``1/k * sum_{j<k} max_{j<=l<k} s * (R[l, j] - R[k, j])`` (Chaudhry et al., 2018), ``s = 1`` when higher
    is better; ``s = -1`` when lower is better, where it is the increase of each task's error above its lowest.

    >>> round(forgetting(torch.tensor([[0.9, 0.0], [0.4, 1.0]])).item(), 4)
    0.5
    >>> round(forgetting(torch.tensor([[0.3, 0.9, 0.9], [0.1, 0.2, 0.9], [0.4, 0.5, 0.1]]), False).item(), 4)
    0.3
    """
    matrix = _as_matrix(matrix)
    last = matrix.shape[0] - 1
    if last == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    sign = _sign(higher_is_better)
    drops = [(sign * (matrix[j:last, j] - matrix[last, j])).max() for j in range(last)]
    return torch.stack(drops).mean()
