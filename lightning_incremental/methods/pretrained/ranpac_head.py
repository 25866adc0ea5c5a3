"""RanPAC: random projections and a ridge classifier on a frozen pretrained backbone (McDonnell et al., 2023)."""

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_incremental.core import ModelInterface
from lightning_incremental.methods.pretrained._statistics import (
    RIDGE_GRID,
    ClosedFormClassifier,
    ClosedFormHead,
    holdout_mask,
    ridge_solve,
    ridge_statistics,
    select_ridge,
)

Activation = Literal["relu", "gelu", "tanh", "identity"]
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "identity": lambda t: t}


class RandomProjectionRidgeClassifier(ClosedFormClassifier):
    """Scores ``activation(features @ projection) @ weight``: a fixed random expansion and ridge weights.

    ``projection`` (``[in_features, projection_dim]``, standard normal from ``seed``), ``weight``
    (``[projection_dim, num_classes]``) and ``seen`` are buffers, so they are in the model's ``state_dict``. Before
    any class is fitted it is ``original``, the layer it replaced.

    >>> layer = RandomProjectionRidgeClassifier(nn.Linear(4, 3), 4, 3, projection_dim=16)
    >>> layer.expand(torch.ones(2, 4)).shape, bool((layer.expand(torch.ones(2, 4)) >= 0).all())
    (torch.Size([2, 16]), True)
    """

    def __init__(
        self,
        original: nn.Module,
        in_features: int,
        num_classes: int,
        projection_dim: int = 2000,
        activation: Activation = "relu",
        seed: int = 0,
    ) -> None:
        super().__init__(original, in_features, num_classes)
        if activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        self.projection_dim, self.activation = projection_dim, activation
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(in_features, projection_dim, generator=generator))
        self.register_buffer("weight", torch.zeros(projection_dim, num_classes))

    def expand(self, features: Tensor) -> Tensor:
        """The random features ``activation(features @ projection)`` in float32 (outside autocast)."""
        with torch.autocast(features.device.type, enabled=False):
            return ACTIVATIONS[self.activation](features.float() @ self.projection)

    def scores(self, features: Tensor) -> Tensor:
        return self.expand(features) @ self.weight

    def set_weight(self, weight: Tensor, seen: Tensor) -> None:
        """Write the ridge weights and which classes have any rows (``seen``)."""
        self.weight.copy_(weight)
        self.seen.copy_(seen)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, projection_dim={self.projection_dim}, activation={self.activation}"


class RanPACHead(ClosedFormHead):
    r"""RanPAC: a fixed random projection of a frozen backbone's features and a ridge classifier, fitted exactly.

    The features ``f`` — the input of the model's head layer — are expanded to ``h = relu(f P)`` by a fixed,
    seeded standard-normal ``P`` (``in_features x projection_dim``), and the head is the ridge regression of one-hot
    targets ``Y`` on ``h``: ``W = (G + lambda I)^-1 C`` with the Gram matrix ``G = sum h h^T`` and ``C = sum h y^T``.
    At the end of every task the task's training data goes once through the model (eval mode, no gradient, the
    Trainer's precision) and its ``G`` and ``C`` are added to those of the earlier tasks, in float64 (all-reduced
    under DDP). No sample is stored, and the head after task ``t`` **equals** the ridge head fitted at once on the
    features of tasks ``0..t``, with the same ``lambda``.

    **Choosing lambda** (unless ``ridge=`` fixes it): a ``holdout`` fraction of the rows is held out — a row is held
    out when a seeded hash of its features says so (:func:`holdout_mask`), so the choice does not depend on order,
    batching, DDP sharding or task boundaries — and its statistics are kept apart. For every ``lambda`` of
    ``ridge_grid`` (relative to the mean eigenvalue ``trace(G_fit) / projection_dim``), the held-out squared error
    of ``W(lambda) = (G_fit + lambda I)^-1 C_fit`` follows from the statistics alone,
    ``tr(Y^T Y) - 2 tr(W^T C_val) + tr(W^T G_val W)`` (:func:`ridge_validation_errors`, one eigendecomposition
    for the whole grid). The best ``lambda`` is then used on all rows, fitted and held out. It is chosen again at
    every task end, on all the tasks so far; ``chosen_ridge`` and ``validation_errors`` hold the last choice.

    **The head.** In ``setup`` the model's head layer (``head_module``; by default the submodule called ``head``,
    ``classifier`` or ``fc``) is replaced by a :class:`RandomProjectionRidgeClassifier` that keeps the old layer as
    ``original`` and behaves as it until the first task ends. After each task ``W`` is written into it, so the
    model's ordinary forward predicts with it: :class:`~lightning_incremental.ContinualEvaluation` and your own code
    need nothing else. Classes not seen yet score the lowest value. Put the head before ``ContinualEvaluation``.

    **A frozen backbone, adapting once, Hugging Face models, DDP, state:** as for
    :class:`~lightning_incremental.methods.pretrained.PrototypeHead` — with a frozen backbone your usual Trainer
    works and the fit stops before its first step; ``FreezeLayers(..., from_task=1)`` adapts the backbone on the
    first task only; the features are the input of ``head_module``; every rank reads its share of the task's rows
    and the statistics are all-reduced. The statistics are in ``state_dict`` (float64:
    ``2 * projection_dim^2 * 8`` bytes, 64 MB at the default 2000); ``P`` and ``W`` are in the model's.

    **Cost** per task: ``rows * projection_dim^2`` multiply-adds for ``G`` (float64), an eigendecomposition and a
    solve of size ``projection_dim``. The default ``projection_dim=2000`` suits a CPU; the paper uses 10000 on a
    GPU. Accuracy on the 20 Newsgroups stream with MiniLM is in ``benchmarks/RESULTS.md``.

    Args:
        projection_dim: the size ``M`` of the random expansion (>= 1).
        activation: the nonlinearity after the projection: ``"relu"`` (the paper's), ``"gelu"``, ``"tanh"`` or
            ``"identity"``.
        ridge: a fixed ``lambda`` (> 0); ``None`` chooses it on held-out rows.
        ridge_grid: the candidate ``lambda`` values, relative to the mean eigenvalue of the Gram matrix
            (default ``1e-8 ... 1e4`` in half decades).
        holdout: the fraction of rows held out to choose ``lambda``, in (0, 1).
        seed: seeds the projection and the held-out rows.
        head_module: the dotted name of the model's head layer, whose input is the features; by default the first
            submodule called ``head``, ``classifier`` or ``fc``.
        num_classes: the number of classes; by default the head's ``out_features``.
        in_features: the size of the features; by default the head's ``in_features``.
        model_interface: how to call the model on a batch and read its class labels; default: the model's
            ``continual_interface``, else :class:`~lightning_incremental.ModelInterface`'s defaults.

    Attributes:
        classifier: the :class:`RandomProjectionRidgeClassifier` in the model (after the first ``setup``).
        chosen_ridge: the ``lambda`` of the last fit (``ridge`` when it is fixed).
        validation_errors: the held-out mean squared error of every ``ridge_grid`` entry, at the last choice.
        gram, targets_sum, gram_val, targets_val, val_rows, class_counts: the statistics, float64 (``None`` before
            the first task ends; the held-out ones only when ``lambda`` is chosen).

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import ContinualEvaluation, MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> _ = L.seed_everything(0, verbose=False)
        >>> stream, model = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(64,))
        >>> _ = model.net[0].requires_grad_(False)  # a frozen (here random) backbone
        >>> head, evaluation = RanPACHead(projection_dim=256), ContinualEvaluation(stream)
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=5, callbacks=[head, evaluation], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=32))
        >>> type(model.head).__name__, tuple(model.head.weight.shape), head.chosen_ridge > 0
        ('RandomProjectionRidgeClassifier', (256, 4), True)
        >>> min(evaluation.result().matrix[-1]) > 0.9  # both tasks, classified among all four classes
        True
    """

    classifier_type = RandomProjectionRidgeClassifier

    def __init__(
        self,
        projection_dim: int = 2000,
        activation: Activation = "relu",
        ridge: float | None = None,
        ridge_grid: Sequence[float] = RIDGE_GRID,
        holdout: float = 0.2,
        seed: int = 0,
        head_module: str | None = None,
        num_classes: int | None = None,
        in_features: int | None = None,
        model_interface: ModelInterface | None = None,
    ) -> None:
        super().__init__(head_module, num_classes, in_features, model_interface)
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 1:
            raise ValueError(f"`projection_dim` must be a positive integer (e.g. 2000), got {projection_dim!r}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        if ridge is not None and not ridge > 0:
            raise ValueError(f"`ridge` must be > 0, or None to choose it on held-out rows; got {ridge}.")
        grid = [float(value) for value in ridge_grid]
        if not grid or not all(value > 0 for value in grid):
            raise ValueError(f"`ridge_grid` must be a non-empty sequence of positive numbers, got {ridge_grid!r}.")
        if not 0 < holdout < 1:
            raise ValueError(f"`holdout` must be a fraction in (0, 1), e.g. 0.2; got {holdout}.")
        self.projection_dim, self.activation, self.seed = projection_dim, activation, int(seed)
        self.ridge, self.ridge_grid, self.holdout = ridge, grid, float(holdout)
        self.class_counts: Tensor | None = None  # [classes]
        self.gram: Tensor | None = None  # sum h h^T over every row, [M, M]
        self.targets_sum: Tensor | None = None  # sum h y^T over every row, [M, classes]
        self.gram_val: Tensor | None = None  # the same over the held-out rows (when lambda is chosen)
        self.targets_val: Tensor | None = None
        self.val_rows = 0.0
        self.chosen_ridge: float | None = None  # the lambda of the last fit
        self.validation_errors: list[float] = []  # held-out mean squared error per ridge_grid entry, last choice

    def build_classifier(
        self, original: nn.Module, in_features: int, num_classes: int
    ) -> RandomProjectionRidgeClassifier:
        return RandomProjectionRidgeClassifier(
            original, in_features, num_classes, self.projection_dim, self.activation, self.seed
        )

    def zero_statistics(self, classifier: ClosedFormClassifier, device: torch.device) -> list[Tensor]:
        m, k = self.projection_dim, classifier.num_classes
        shapes = [(k,), (m, m), (m, k)] + ([(m, m), (m, k), (1,)] if self.ridge is None else [])
        return [torch.zeros(shape, dtype=torch.float64, device=device) for shape in shapes]

    def accumulate(
        self, statistics: list[Tensor], features: Tensor, labels: Tensor, classifier: ClosedFormClassifier
    ) -> None:
        assert isinstance(classifier, RandomProjectionRidgeClassifier)
        expanded = classifier.expand(features)
        k = classifier.num_classes
        statistics[0] += torch.bincount(labels, minlength=k).to(statistics[0])
        gram, targets = ridge_statistics(expanded, labels, k)
        statistics[1] += gram
        statistics[2] += targets
        if self.ridge is None:
            held_out = holdout_mask(features, self.holdout, self.seed)
            gram_val, targets_val = ridge_statistics(expanded[held_out], labels[held_out], k)
            statistics[3] += gram_val
            statistics[4] += targets_val
            statistics[5] += held_out.sum()

    def consolidate(self, statistics: list[Tensor], classifier: ClosedFormClassifier) -> None:
        device = statistics[0].device
        counts, gram, targets = statistics[:3]
        self.class_counts = _add(self.class_counts, counts)
        self.gram, self.targets_sum = _add(self.gram, gram), _add(self.targets_sum, targets)
        if self.ridge is None:
            self.gram_val, self.targets_val = _add(self.gram_val, statistics[3]), _add(self.targets_val, statistics[4])
            self.val_rows += float(statistics[5])
            gram_val, targets_val = self.gram_val.to(device), self.targets_val.to(device)
            self.chosen_ridge, self.validation_errors = select_ridge(
                self.gram.to(device) - gram_val,
                self.targets_sum.to(device) - targets_val,
                gram_val,
                targets_val,
                self.val_rows,
                self.ridge_grid,
            )
        else:
            self.chosen_ridge = self.ridge
        weight = ridge_solve(self.gram.to(device), self.targets_sum.to(device), self.chosen_ridge)
        assert isinstance(classifier, RandomProjectionRidgeClassifier)
        classifier.set_weight(weight.to(classifier.weight), (self.class_counts > 0).to(classifier.seen))

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "class_counts": self.class_counts,
            "gram": self.gram,
            "targets_sum": self.targets_sum,
            "gram_val": self.gram_val,
            "targets_val": self.targets_val,
            "val_rows": self.val_rows,
            "chosen_ridge": self.chosen_ridge,
            "validation_errors": list(self.validation_errors),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.class_counts, self.gram = state_dict["class_counts"], state_dict["gram"]
        self.targets_sum, self.gram_val = state_dict["targets_sum"], state_dict["gram_val"]
        self.targets_val, self.val_rows = state_dict["targets_val"], float(state_dict["val_rows"])
        self.chosen_ridge, self.validation_errors = state_dict["chosen_ridge"], list(state_dict["validation_errors"])


def _add(total: Tensor | None, task: Tensor) -> Tensor:
    """The running sum (on the CPU, where the state lives) plus a task's statistics."""
    task = task.cpu()
    return task if total is None else total + task
