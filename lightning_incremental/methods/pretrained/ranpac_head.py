"""RanPAC: random projections and a ridge classifier on a frozen pretrained backbone (McDonnell et al., 2023)."""

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_incremental.core import ModelInterface
from lightning_incremental.methods.pretrained._base import ClosedFormHead, statistic
from lightning_incremental.methods.pretrained.classifier import ClosedFormClassifier
from lightning_incremental.methods.pretrained.functional import (
    RIDGE_GRID,
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

    @override
    def scores(self, features: Tensor) -> Tensor:
        return self.expand(features) @ self.weight

    def set_weight(self, weight: Tensor, seen: Tensor) -> None:
        """Write the ridge weights and which classes have any rows (``seen``)."""
        self.weight.copy_(weight)
        self.seen.copy_(seen)

    @override
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
        head_module, num_classes, in_features, model_interface: which layer is the head and how to read the model,
            as for :class:`~lightning_incremental.methods.pretrained.PrototypeHead` (by default the first submodule
            called ``head``, ``classifier`` or ``fc``, its sizes and the model's interface).

    Attributes:
        classifier: the :class:`RandomProjectionRidgeClassifier` in the model (after the first ``setup``).
        chosen_ridge: the ``lambda`` of the last fit (``ridge`` when it is fixed).
        validation_errors: the held-out mean squared error of every ``ridge_grid`` entry, at the last choice.
        gram, targets_sum, gram_val, targets_val, val_rows, class_counts: the statistics, float64 (``None`` before
            the first task ends; the held-out ones only when ``lambda`` is chosen), named entries of
            :attr:`statistics`.

    Example (the task loop of :func:`~lightning_incremental.fit_tasks`)::

        >>> from lightning_incremental import MLPClassifier, fit_tasks
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> _ = torch.manual_seed(0)
        >>> model, head = MLPClassifier(16, 4, hidden=(64,)), RanPACHead(projection_dim=256)
        >>> model.net[0].requires_grad_(False).weight.requires_grad  # a frozen (here random) backbone
        False
        >>> quiet = {"max_epochs": 5, "logger": False, "enable_progress_bar": False, "enable_checkpointing": False}
        >>> result = fit_tasks(model, synthetic_stream(n_tasks=2), [head], trainer_kwargs=quiet)
        >>> type(model.head).__name__, tuple(model.head.weight.shape), head.chosen_ridge > 0
        ('RandomProjectionRidgeClassifier', (256, 4), True)
        >>> min(result.matrix[-1]) > 0.9  # both tasks, classified among all four classes
        True
    """

    classifier_type = RandomProjectionRidgeClassifier
    gram = statistic("gram", "``sum h h^T`` over every row, ``[M, M]``")
    targets_sum = statistic("targets_sum", "``sum h y^T`` over every row, ``[M, classes]``")
    gram_val = statistic("gram_val", "``sum h h^T`` over the held-out rows, when lambda is chosen")
    targets_val = statistic("targets_val", "``sum h y^T`` over the held-out rows, when lambda is chosen")

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
        self.chosen_ridge: float | None = None  # the lambda of the last fit
        self.validation_errors: list[float] = []  # held-out mean squared error per ridge_grid entry, last choice

    @property
    def val_rows(self) -> float:
        """The number of held-out rows so far (0 before the first task ends, or when ``ridge`` is fixed)."""
        return float(self.statistics["val_rows"]) if "val_rows" in self.statistics else 0.0

    @override
    def build_classifier(
        self, original: nn.Module, in_features: int, num_classes: int
    ) -> RandomProjectionRidgeClassifier:
        return RandomProjectionRidgeClassifier(
            original, in_features, num_classes, self.projection_dim, self.activation, self.seed
        )

    @override
    def statistic_shapes(self, classifier: ClosedFormClassifier) -> dict[str, tuple[int, ...]]:
        m, k = self.projection_dim, classifier.num_classes
        shapes = {**super().statistic_shapes(classifier), "gram": (m, m), "targets_sum": (m, k)}
        if self.ridge is None:  # the held-out rows' statistics, kept apart to choose lambda
            shapes.update(gram_val=(m, m), targets_val=(m, k), val_rows=())
        return shapes

    @override
    def accumulate(
        self, task: dict[str, Tensor], features: Tensor, labels: Tensor, classifier: ClosedFormClassifier
    ) -> None:
        assert isinstance(classifier, RandomProjectionRidgeClassifier)
        super().accumulate(task, features, labels, classifier)
        expanded = classifier.expand(features)
        gram, targets = ridge_statistics(expanded, labels, classifier.num_classes)
        task["gram"] += gram
        task["targets_sum"] += targets
        if self.ridge is None:
            held_out = holdout_mask(features, self.holdout, self.seed)
            gram_val, targets_val = ridge_statistics(expanded[held_out], labels[held_out], classifier.num_classes)
            task["gram_val"] += gram_val
            task["targets_val"] += targets_val
            task["val_rows"] += held_out.sum()

    @override
    def fit_classifier(self, classifier: ClosedFormClassifier) -> None:
        assert isinstance(classifier, RandomProjectionRidgeClassifier) and self.seen is not None
        device = classifier.weight.device
        gram, targets = self.statistics["gram"].to(device), self.statistics["targets_sum"].to(device)
        if self.ridge is None:
            gram_val, targets_val = self.statistics["gram_val"].to(device), self.statistics["targets_val"].to(device)
            self.chosen_ridge, self.validation_errors = select_ridge(
                gram - gram_val, targets - targets_val, gram_val, targets_val, self.val_rows, self.ridge_grid
            )
        else:
            self.chosen_ridge = self.ridge
        weight = ridge_solve(gram, targets, self.chosen_ridge)
        classifier.set_weight(weight.to(classifier.weight), self.seen.to(classifier.seen))

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"chosen_ridge": self.chosen_ridge, "validation_errors": list(self.validation_errors)}
        return {**super().state_dict(), **state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.chosen_ridge, self.validation_errors = state_dict["chosen_ridge"], list(state_dict["validation_errors"])
