"""The math of the closed-form heads, as pure functions: sufficient statistics, the held-out rows, the ridge.

A closed-form head adds, task after task, sums over rows in float64 (:func:`class_sums`, :func:`ridge_statistics`);
sums add across tasks and across DDP ranks, so the head after task ``t`` is the head fitted once on the rows of
tasks ``0..t``. The ridge classifier is solved from them (:func:`ridge_solve`), and its ``lambda`` chosen on
held-out rows (:func:`holdout_mask`) from their statistics alone (:func:`ridge_validation_errors`,
:func:`select_ridge`). :class:`~lightning_incremental.methods.pretrained.PrototypeHead` and
:class:`~lightning_incremental.methods.pretrained.RanPACHead` only feed them.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

RIDGE_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-16, 9))
"""The default ridge grid, 1e-8 ... 1e4 in half decades, relative to the mean eigenvalue of the Gram matrix."""

_HASH_SCALE = 1000.0  # holdout_mask: spreads a row's projection over many unit intervals


# ---------------------------------------------------------------------------------------------- statistics
def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sums of the rows of ``features`` and per-class row counts, in float64.

    >>> sums, counts = class_sums(torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]]), torch.tensor([0, 0, 2]), 3)
    >>> sums.tolist(), counts.tolist()
    ([[4.0, 2.0], [0.0, 0.0], [5.0, 5.0]], [2.0, 0.0, 1.0])
    """
    rows = features.detach().double()
    sums = rows.new_zeros(num_classes, rows.shape[1]).index_add_(0, labels, rows)
    counts = rows.new_zeros(num_classes).index_add_(0, labels, torch.ones_like(labels, dtype=rows.dtype))
    return sums, counts


def ridge_statistics(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """The Gram matrix ``H^T H`` of the rows ``H`` and ``H^T Y`` for the one-hot targets ``Y``, in float64.

    >>> gram, targets = ridge_statistics(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([1, 0]), 2)
    >>> gram.tolist(), targets.tolist()
    ([[1.0, 2.0], [2.0, 5.0]], [[0.0, 1.0], [1.0, 2.0]])
    """
    rows = features.detach().double()
    targets = rows.new_zeros(rows.shape[1], num_classes).index_add_(1, labels, rows.T)
    return rows.T @ rows, targets


def holdout_mask(features: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Which rows are held out to choose the ridge: a seeded hash of each row's direction, below ``fraction``.

    A row's membership depends on its own features only — not on the order, batching, DDP sharding or task of
    the rows — so the rows a joint fit holds out are exactly the union of those each task held out. (Features
    that differ in their last bits, e.g. computed in batches of another size, may rarely land on the other side.)

    >>> features = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(0))
    >>> mask = holdout_mask(features, 0.2)
    >>> round(mask.double().mean().item(), 2), torch.equal(holdout_mask(features.flip(0), 0.2), mask.flip(0))
    (0.2, True)
    """
    direction = torch.randn(features.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows = features.detach().double()
    cosine = rows @ direction.to(rows.device) / rows.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.remainder(cosine * _HASH_SCALE, 1.0) < fraction


# ---------------------------------------------------------------------------------------------- ridge
def ridge_solve(gram: Tensor, targets: Tensor, ridge: float) -> Tensor:
    """The ridge regression weights ``W = (G + ridge * I)^-1 C`` from the statistics ``G = H^T H``, ``C = H^T Y``.

    >>> ridge_solve(torch.eye(2, dtype=torch.float64) * 3, torch.tensor([[3.0, 0.0], [0.0, 6.0]]).double(), 1.0)
    tensor([[0.7500, 0.0000],
            [0.0000, 1.5000]], dtype=torch.float64)
    """
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    with _one_thread(gram.device):
        return torch.linalg.solve(gram + ridge * eye, targets)


def ridge_validation_errors(
    gram_fit: Tensor,
    targets_fit: Tensor,
    gram_val: Tensor,
    targets_val: Tensor,
    val_rows: float,
    ridges: Sequence[float],
) -> Tensor:
    r"""The mean squared error on held-out rows of ``W(l) = (G_fit + l I)^-1 C_fit``, for every ``l`` in ``ridges``.

    It needs the held-out rows' statistics only, not the rows: for one-hot targets ``Y_v`` (``tr(Y_v^T Y_v)`` is
    their number of rows),
    ``||Y_v - H_v W||^2 = tr(Y_v^T Y_v) - 2 tr(W^T C_val) + tr(W^T G_val W)``. One eigendecomposition of
    ``G_fit`` serves every ``l``. On the CPU it runs on one thread: the tridiagonal reduction of ``eigh``
    synchronises the threads at every column, so on busy cores more threads make it slower, not faster;
    :func:`ridge_solve` runs on one thread too.

    >>> h = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)).double()
    >>> y = torch.arange(50) % 3
    >>> (gf, cf), (gv, cv) = ridge_statistics(h[:40], y[:40], 3), ridge_statistics(h[40:], y[40:], 3)
    >>> w = ridge_solve(gf, cf, 0.5)
    >>> direct = ((torch.eye(3, dtype=torch.float64)[y[40:]] - h[40:] @ w) ** 2).sum(1).mean()
    >>> torch.allclose(ridge_validation_errors(gf, cf, gv, cv, 10, [0.5])[0], direct)
    True
    """
    with _one_thread(gram_fit.device):
        eigenvalues, eigenvectors = torch.linalg.eigh(gram_fit)
        eigenvalues = eigenvalues.clamp_min(0.0)
        rotated = eigenvectors.T @ targets_fit
        errors = []
        for ridge in ridges:
            weights = eigenvectors @ (rotated / (eigenvalues + ridge).unsqueeze(1))
            squared = val_rows - 2 * (weights * targets_val).sum() + (weights * (gram_val @ weights)).sum()
            errors.append(squared / val_rows)
        return torch.stack(errors)


def select_ridge(
    gram_fit: Tensor,
    targets_fit: Tensor,
    gram_val: Tensor,
    targets_val: Tensor,
    val_rows: float,
    grid: Sequence[float] = RIDGE_GRID,
) -> tuple[float, list[float]]:
    """The ridge of ``grid`` with the least held-out error, and the error of every grid point.

    ``grid`` is relative to the mean eigenvalue of ``G_fit`` (``trace / size``): the ridge returned is
    ``grid[best] * trace(G_fit) / size``, so the choice does not depend on the scale of the features.

    >>> h = torch.randn(200, 6, generator=torch.Generator().manual_seed(0)).double()
    >>> y = (h[:, 0] > 0).long()
    >>> (gf, cf), (gv, cv) = ridge_statistics(h[:150], y[:150], 2), ridge_statistics(h[150:], y[150:], 2)
    >>> ridge, errors = select_ridge(gf, cf, gv, cv, 50, grid=[1e-3, 1.0, 1e3])
    >>> len(errors), errors.index(min(errors)) == [1e-3, 1.0, 1e3].index(ridge / (gf.trace().item() / 6))
    (3, True)
    """
    scale = float(gram_fit.trace()) / gram_fit.shape[0]
    if val_rows <= 0 or scale <= 0:
        raise ValueError(
            f"Choosing the ridge needs held-out rows and fitted rows with nonzero features; there are {val_rows:g} "
            "held-out rows. Pass a fixed `ridge=`, or a larger `holdout=` fraction, or more data."
        )
    ridges = [factor * scale for factor in grid]
    errors = ridge_validation_errors(gram_fit, targets_fit, gram_val, targets_val, val_rows, ridges)
    return ridges[int(errors.argmin())], errors.tolist()


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Inside the block, torch's CPU operations use one thread (see :func:`ridge_validation_errors`)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
