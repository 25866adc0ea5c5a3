"""What the closed-form heads share: sufficient statistics, the ridge math, the installed layer, the callback base.

A closed-form head never trains. At the end of every task it passes the task's training data once through the
model (eval mode, no gradient, the Trainer's precision), records the input of the model's head layer — the
backbone's features — and adds the task's **sufficient statistics** (sums over rows, in float64) to those of
the earlier tasks. Sums add across tasks and across DDP ranks (one all-reduce), so no sample is ever stored and
the head after task ``t`` is the head fitted once on the features of tasks ``0..t``. The classifier computed
from them is written into a layer that replaced the model's head (:class:`ClosedFormClassifier`), so the
model's ordinary forward predicts with it.

The pure functions (:func:`class_sums`, :func:`ridge_statistics`, :func:`holdout_mask`,
:func:`ridge_validation_errors`, :func:`select_ridge`, :func:`ridge_solve`) are the whole math; the callbacks
only feed them.
"""

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_incremental.core import (
    ContinualCallback,
    ModelInterface,
    _lightning,
    check_interface_argument,
    interface_of,
    private_pass,
)

HEAD_NAMES = ("head", "classifier", "fc")
"""The submodule names a head is looked for under when ``head_module`` is not given, in this order."""

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
    ``G_fit`` serves every ``l``. On the CPU it runs on one thread: its tridiagonal reduction synchronises the
    threads at every column, and on 2 busy cores ``eigh`` of a 2000 x 2000 matrix took 99 s on 2 threads against
    4.6 s on one (a Cholesky solve, 1.0 s against 0.4 s); :func:`ridge_solve` runs on one thread too.

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


def all_reduce_sum(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Sum every tensor over the ranks of the default process group, in one collective; unchanged without one.

    >>> all_reduce_sum([torch.ones(2)])  # no process group: nothing to reduce
    [tensor([1., 1.])]
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


# ---------------------------------------------------------------------------------------------- the layer
class ClosedFormClassifier(nn.Module):
    """A classifier layer whose weights are computed, not trained; it takes the place of the model's head.

    Until a class is fitted it is the layer it replaced (``original``): the model predicts as before, and a
    first task can train the backbone through it (adapt once). From then on it scores with its closed-form
    weights, in float32 outside autocast; classes not seen yet score the lowest finite value. ``original``
    stays in the model (and its checkpoint), unused. Its weights are buffers, so they are in the model's
    ``state_dict``; subclasses say how to score.
    """

    def __init__(self, original: nn.Module, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.original = original
        self.in_features, self.num_classes = in_features, num_classes
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def fitted(self) -> bool:
        """Whether any class has been fitted (before that, the layer is ``original``)."""
        return bool(self.seen.any())

    def scores(self, features: Tensor) -> Tensor:
        """The closed-form scores ``[..., num_classes]`` of float32 ``features``."""
        raise NotImplementedError

    def forward(self, features: Tensor) -> Tensor:
        if not self.fitted:
            return self.original(features)
        with torch.autocast(features.device.type, enabled=False):
            scores = self.scores(features.float())
        return scores.masked_fill(~self.seen, torch.finfo(scores.dtype).min)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


# ---------------------------------------------------------------------------------------------- the callback
class ClosedFormHead(ContinualCallback):
    """The part of :class:`PrototypeHead` and :class:`RanPACHead` that finds, installs and feeds the layer.

    A subclass names its layer (``classifier_type``) and says which statistics a task adds and how the layer
    is computed from them.
    """

    classifier_type: type[ClosedFormClassifier] = ClosedFormClassifier

    def __init__(
        self,
        head_module: str | None,
        num_classes: int | None,
        in_features: int | None,
        model_interface: ModelInterface | None,
    ) -> None:
        super().__init__()
        if head_module is not None and (not isinstance(head_module, str) or not head_module):
            raise TypeError(f"`head_module` must be the dotted name of a submodule or None, got {head_module!r}.")
        for name, value in (("num_classes", num_classes), ("in_features", in_features)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None (read from the head), got {value!r}.")
        self.head_module, self.num_classes, self.in_features = head_module, num_classes, in_features
        self.model_interface = check_interface_argument(model_interface)
        self.classifier: ClosedFormClassifier | None = None
        self._head_name: str | None = None

    # ------------------------------------------------------------------ what a subclass writes
    def build_classifier(self, original: nn.Module, in_features: int, num_classes: int) -> ClosedFormClassifier:
        """The layer that replaces ``original``."""
        raise NotImplementedError

    def zero_statistics(self, classifier: ClosedFormClassifier, device: torch.device) -> list[Tensor]:
        """A task's statistics before its first row: float64 zeros of fixed shapes (every rank the same)."""
        raise NotImplementedError

    def accumulate(
        self, statistics: list[Tensor], features: Tensor, labels: Tensor, classifier: ClosedFormClassifier
    ) -> None:
        """Add the rows ``features`` (float32, ``[rows, in_features]``) with ``labels`` to ``statistics``."""
        raise NotImplementedError

    def consolidate(self, statistics: list[Tensor], classifier: ClosedFormClassifier) -> None:
        """Add the task's all-reduced ``statistics`` to the running ones and write the classifier."""
        raise NotImplementedError

    # ------------------------------------------------------------------ installing the layer
    def prepare_model(self, pl_module: nn.Module) -> None:
        """Install the closed-form layer in a freshly built model, so a fitted model's weights load into it
        (:func:`~lightning_incremental.load_task_checkpoint` calls it)."""
        self.install(pl_module)

    def install(self, model: nn.Module) -> ClosedFormClassifier:
        """Put the closed-form layer in place of ``model``'s head and return it; a no-op once it is there.

        ``setup`` calls it for every fit. Call it yourself before the first fit under ``ddp_spawn`` /
        ``ddp_fork`` (the main process's model must hold the layer the workers fit); ``load_task_checkpoint``
        calls it before loading a checkpoint of a fitted model into a fresh model.
        """
        name = self._head_path(model)
        module = model.get_submodule(name)
        if isinstance(module, self.classifier_type):
            classifier = module
        elif isinstance(module, ClosedFormClassifier):
            raise ValueError(
                f"The head `{name}` is already a {type(module).__name__}: one closed-form head per head layer. Use a "
                f"copy of the model for a {type(self).__name__}."
            )
        else:
            in_features = self.in_features or getattr(module, "in_features", None)
            num_classes = self.num_classes or getattr(module, "out_features", None) or getattr(module, "num_classes", 0)
            if not in_features or not num_classes:
                raise ValueError(
                    f"Cannot read the feature size and the number of classes from the head `{name}` "
                    f"({type(module).__name__}): pass `in_features=` (the size of its input) and `num_classes=`."
                )
            reference = next(iter([*module.parameters(), *module.buffers()]), None)
            classifier = self.build_classifier(module, int(in_features), int(num_classes))
            if reference is not None:
                classifier.to(reference.device)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, classifier)
        self.classifier, self._head_name = classifier, name
        return classifier

    def _head_path(self, model: nn.Module) -> str:
        """The registered dotted name of the head: ``head_module``, or the first of :data:`HEAD_NAMES` found."""
        names = [n for n, _ in model.named_modules() if n]
        if self.head_module is not None:
            try:
                module = model.get_submodule(self.head_module)
            except AttributeError:
                raise ValueError(
                    f"`head_module={self.head_module!r}` is not a submodule of {type(model).__name__}. Name the layer "
                    f"whose input is the backbone's features; the submodules are: {_shortlist(names)}."
                ) from None
        else:
            module = _find_head(model, names)
            if module is None:
                raise ValueError(
                    f"Could not find the head of {type(model).__name__}: no submodule is called "
                    f"{' / '.join(HEAD_NAMES)}, so the backbone's features (the head's input) cannot be found. Pass "
                    f"`head_module=` naming the layer that turns the features into the class logits, one of "
                    f"{_shortlist(names)}. {type(self).__name__} is a classifier: it needs class labels, so a "
                    "model with real-valued targets (a regressor) needs another method."
                )
        path = next((n for n, m in model.named_modules() if m is module and n), None)
        if path is None:
            raise ValueError(f"The head of {type(model).__name__} is not a registered submodule: pass `head_module=`.")
        return path

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if trainer.max_epochs == 0 or trainer.max_steps == 0 or trainer.limit_train_batches == 0:
            raise ValueError(
                f"{type(self).__name__} computes the head at the end of the fit's training, which Lightning skips "
                "with `max_epochs=0`, `max_steps=0` or `limit_train_batches=0`. Keep the Trainer's usual settings: "
                "when nothing but the head would train (a frozen backbone), the fit ends before its first step."
            )
        if _lightning.spawned_launcher(trainer) is not None and not isinstance(
            pl_module.get_submodule(self._head_path(pl_module)), self.classifier_type
        ):
            raise RuntimeError(
                "Under ddp_spawn / ddp_fork only the weights come back from the worker processes, so the main "
                f"process's model must already hold the closed-form layer: call `{type(self).__name__}"
                "(...).install(model)` once before the first fit (or use strategy='ddp')."
            )
        classifier = self.install(pl_module)
        if classifier.fitted:  # `original` is unused from now on: it trains only to keep DDP wrappable
            original = set(classifier.original.parameters())
            others_train = any(p.requires_grad for p in pl_module.parameters() if p not in original)
            classifier.original.requires_grad_(not others_train)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        original = set(self._classifier(pl_module).original.parameters())
        if not any(p.requires_grad for p in pl_module.parameters() if p not in original):
            rank_zero_info(
                f"{type(self).__name__}: nothing trains but the head layer it replaces (a frozen backbone), so the "
                "fit ends before its first step and the head is computed from the task's data."
            )
            trainer.should_stop = True

    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        classifier = self._classifier(pl_module)
        statistics = self.zero_statistics(classifier, pl_module.device)
        interface = interface_of(pl_module, self.model_interface)
        with torch.no_grad(), private_pass(pl_module), trainer.precision_plugin.forward_context():
            for features, labels in self._task_rows(trainer, pl_module, classifier, interface):
                self.accumulate(statistics, features, labels, classifier)
        self.consolidate(all_reduce_sum(statistics), classifier)

    # ------------------------------------------------------------------ the pass over the task
    def _classifier(self, pl_module: LightningModule) -> ClosedFormClassifier:
        classifier = pl_module.get_submodule(self._head_name) if self._head_name else None
        return classifier if isinstance(classifier, self.classifier_type) else self.install(pl_module)

    def _task_rows(
        self, trainer: Trainer, pl_module: LightningModule, classifier: ClosedFormClassifier, interface: ModelInterface
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(features, labels)`` of every row of this rank's share of the task: the head's input, in float32."""
        recorded: list[Any] = []
        handle = classifier.register_forward_pre_hook(lambda _module, args: recorded.append(args[0] if args else None))
        try:
            for batch in _task_batches(trainer):
                batch = move_data_to_device(batch, pl_module.device)
                labels = self._labels(interface.targets(batch), classifier.num_classes)
                recorded.clear()
                interface.forward(pl_module, batch)
                yield self._features(recorded, len(labels), classifier), labels
        finally:
            handle.remove()

    def _labels(self, targets: Any, num_classes: int) -> Tensor:
        if (
            not isinstance(targets, Tensor)
            or targets.is_floating_point()
            or targets.is_complex()
            or targets.dtype == (torch.bool)
        ):
            kind = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
            raise TypeError(
                f"{type(self).__name__} needs class labels: one integer class index per row, but the targets are "
                f"{kind}. A closed-form classifier head fits one output per class; for real-valued targets use a "
                "method that works with any loss."
            )
        if targets.ndim > 1 and targets.numel() == targets.shape[0]:
            targets = targets.reshape(-1)
        if targets.ndim != 1:
            raise ValueError(
                f"{type(self).__name__} needs class labels: one class index per row, got targets of shape "
                f"{tuple(targets.shape)}. Pass `model_interface=ModelInterface(target_key=...)` naming the labels."
            )
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError(
                f"{type(self).__name__} got class labels in [{int(targets.min())}, {int(targets.max())}] but the head "
                f"has {num_classes} classes: pass `num_classes=` covering every class of the stream."
            )
        return targets.long()

    def _features(self, recorded: list[Any], rows: int, classifier: ClosedFormClassifier) -> Tensor:
        if not recorded:
            raise RuntimeError(
                f"The head `{self._head_name}` did not run during the model's forward on a training batch, so its "
                "input (the backbone's features) is unknown. `head_module=` must name the layer that produces the "
                "logits."
            )
        features = recorded[-1]
        expected = [rows, classifier.in_features]
        if not isinstance(features, Tensor) or not features.is_floating_point() or list(features.shape) != expected:
            found = f"of shape {list(features.shape)}" if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(
                f"The input of the head `{self._head_name}` is {found}, not floating features of shape {expected} "
                "([batch, in_features]), so the backbone's features cannot be read from it. Name as `head_module=` "
                "the layer whose input is the pooled features (e.g. the last Linear)."
            )
        return features.float()


def _task_batches(trainer: Trainer) -> Iterable[Any]:
    """This rank's share of the task's training rows, each row once: every ``world_size``-th row of the dataset.

    The rows are read in dataset order with the user's batch size and collate function, so neither shuffling nor
    a distributed sampler's padding (which repeats rows) changes the statistics. A loader without a map-style
    dataset is iterated as it is.
    """
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    share = Subset(loader.dataset, range(trainer.global_rank, len(loader.dataset), trainer.world_size))
    return DataLoader(
        share,
        batch_size=loader.batch_size or 1,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
    )


def _find_head(model: nn.Module, names: list[str]) -> nn.Module | None:
    for candidate in HEAD_NAMES:
        try:
            return model.get_submodule(candidate)  # also finds a property, such as MLPClassifier.head
        except AttributeError:
            pass
    for candidate in HEAD_NAMES:
        nested = next((n for n in names if n.rpartition(".")[2] == candidate), None)
        if nested is not None:
            return model.get_submodule(nested)
    return None


def _shortlist(names: list[str], limit: int = 20) -> str:
    return str(names[:limit])[:-1] + (", ...]" if len(names) > limit else "]")
