"""What the closed-form heads share: the callback that finds, installs and feeds their layer.

A closed-form head never trains. At the end of every task it passes the task's training data once through the
model (:func:`~lightning_incremental.core.own_pass`: eval mode, no gradient, the Trainer's precision), records
the input of the model's head layer — the backbone's features — and adds the task's **sufficient statistics**
(sums over rows, in float64) to those of the earlier tasks. Sums add across tasks and across DDP ranks (one
all-reduce), so no sample is ever stored and the head after task ``t`` is the head fitted once on the features
of tasks ``0..t``. The classifier computed from them is written into a layer that replaced the model's head
(:class:`~lightning_incremental.methods.pretrained.classifier.ClosedFormClassifier`), so the model's ordinary
forward predicts with it.

The statistics are **named states**, as a torchmetrics ``Metric``'s are: a head declares each by name with its
shape (:meth:`ClosedFormHead.statistic_shapes`), adds a batch's rows to them by name
(:meth:`ClosedFormHead.accumulate`), and the base sums them over the ranks, adds them to the running sums
(:attr:`ClosedFormHead.statistics`) and keeps those in the callback's ``state_dict``. The math is in
:mod:`lightning_incremental.methods.pretrained.functional`.
"""

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_incremental.core import (
    ContinualCallback,
    ModelInterface,
    all_reduce_sum,
    are_class_labels,
    check_interface_argument,
    head_by_name,
    interface_of,
    own_pass,
    spawned_launcher,
    task_rows,
)
from lightning_incremental.core.classifier import HEAD_NAMES
from lightning_incremental.methods.pretrained.classifier import ClosedFormClassifier


def statistic(name: str, doc: str) -> Any:
    """A read-only attribute that is the running sum of the statistic ``name``, ``None`` before the first task ends.

    >>> class Head:
    ...     statistics = {"class_counts": torch.ones(2)}
    ...     class_counts = statistic("class_counts", "rows per class")
    ...     gram = statistic("gram", "sum h h^T")
    >>> Head().class_counts, Head().gram
    (tensor([1., 1.]), None)
    """
    return property(lambda self: self.statistics.get(name), doc=f"{doc} (float64; ``None`` before a task ends).")


class ClosedFormHead(ContinualCallback):
    """The part of :class:`PrototypeHead` and :class:`RanPACHead` that finds, installs and feeds the layer.

    A subclass names its layer (``classifier_type``, :meth:`build_classifier`), declares the statistics a task
    adds (:meth:`statistic_shapes`), adds a batch's rows to them (:meth:`accumulate`) and writes the layer from
    the running sums (:meth:`fit_classifier`). Every head counts the rows of each class (``class_counts``).

    Attributes:
        classifier: the closed-form layer in the model (after the first ``setup``).
        statistics: the running sums of every task's statistics by name (float64, on the CPU, in ``state_dict``);
            empty before the first task ends.
    """

    classifier_type: type[ClosedFormClassifier] = ClosedFormClassifier
    class_counts = statistic("class_counts", "The number of rows of every class, ``[classes]``")

    def __init__(
        self,
        head_module: str | None = None,
        num_classes: int | None = None,
        in_features: int | None = None,
        model_interface: ModelInterface | None = None,
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
        self.statistics: dict[str, Tensor] = {}
        self._head_name: str | None = None

    # ------------------------------------------------------------------ what a subclass writes
    def build_classifier(self, original: nn.Module, in_features: int, num_classes: int) -> ClosedFormClassifier:
        """The layer that replaces ``original``."""
        raise NotImplementedError

    def statistic_shapes(self, classifier: ClosedFormClassifier) -> dict[str, tuple[int, ...]]:
        """The statistics a task adds, by name, with their shapes (every rank the same); extend ``super()``'s."""
        return {"class_counts": (classifier.num_classes,)}

    def accumulate(
        self, task: dict[str, Tensor], features: Tensor, labels: Tensor, classifier: ClosedFormClassifier
    ) -> None:
        """Add the rows ``features`` (float32, ``[rows, in_features]``) with ``labels`` to the task's statistics
        ``task`` (float64, zeros before the task's first row), in place and by name; call ``super()``."""
        counts = task["class_counts"]
        counts += torch.bincount(labels, minlength=classifier.num_classes).to(counts)

    def fit_classifier(self, classifier: ClosedFormClassifier) -> None:
        """Write into ``classifier`` the head computed from the running :attr:`statistics` of every task so far."""
        raise NotImplementedError

    @property
    def seen(self) -> Tensor | None:
        """Which classes have any row (``None`` before the first task ends)."""
        return None if self.class_counts is None else self.class_counts > 0

    # ------------------------------------------------------------------ installing the layer
    @override
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
        """The registered dotted name of the head: ``head_module``, or the one :func:`head_by_name` finds."""
        names = [n for n, _ in model.named_modules() if n]
        if self.head_module is None:
            found = head_by_name(model)
            if found is None:
                raise ValueError(
                    f"Could not find the head of {type(model).__name__}: no submodule is called "
                    f"{' / '.join(HEAD_NAMES)}, so the backbone's features (the head's input) cannot be found. Pass "
                    f"`head_module=` naming the layer that turns the features into the class logits, one of "
                    f"{_shortlist(names)}. {type(self).__name__} is a classifier: it needs class labels, so a "
                    "model with real-valued targets (a regressor) needs another method."
                )
            return found[0]
        try:
            module = model.get_submodule(self.head_module)
        except AttributeError:
            raise ValueError(
                f"`head_module={self.head_module!r}` is not a submodule of {type(model).__name__}. Name the layer "
                f"whose input is the backbone's features; the submodules are: {_shortlist(names)}."
            ) from None
        path = next((n for n, m in model.named_modules() if m is module and n), None)
        if path is None:
            raise ValueError(f"The head of {type(model).__name__} is not a registered submodule: pass `head_module=`.")
        return path

    # ------------------------------------------------------------------ Lightning hooks
    @override
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
        if spawned_launcher(trainer) is not None and not isinstance(
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

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        original = set(self._classifier(pl_module).original.parameters())
        if not any(p.requires_grad for p in pl_module.parameters() if p not in original):
            rank_zero_info(
                f"{type(self).__name__}: nothing trains but the head layer it replaces (a frozen backbone), so the "
                "fit ends before its first step and the head is computed from the task's data."
            )
            trainer.should_stop = True

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        classifier = self._classifier(pl_module)
        interface = interface_of(pl_module, self.model_interface)
        task = {  # the task's statistics, by name: float64 sums over its rows
            name: torch.zeros(shape, dtype=torch.float64, device=pl_module.device)
            for name, shape in self.statistic_shapes(classifier).items()
        }
        recorded: list[Any] = []  # the head's input at every call: the backbone's features
        handle = classifier.register_forward_pre_hook(lambda _module, args: recorded.append(args[0] if args else None))
        try:
            with own_pass(trainer, pl_module, task_rows(trainer, "rank_share")) as batches:
                for batch in batches:
                    labels = self._labels(interface.targets(batch), classifier.num_classes)
                    recorded.clear()
                    interface.forward(pl_module, batch)
                    self.accumulate(task, self._features(recorded, len(labels), classifier), labels, classifier)
        finally:
            handle.remove()
        for name, total in zip(task, all_reduce_sum(list(task.values())), strict=True):
            total = total.cpu()  # the running sums live on the CPU
            self.statistics[name] = self.statistics[name] + total if name in self.statistics else total
        self.fit_classifier(classifier)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "statistics": dict(self.statistics)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.statistics = dict(state_dict["statistics"])

    # ------------------------------------------------------------------ the pass over the task
    def _classifier(self, pl_module: LightningModule) -> ClosedFormClassifier:
        classifier = pl_module.get_submodule(self._head_name) if self._head_name else None
        return classifier if isinstance(classifier, self.classifier_type) else self.install(pl_module)

    def _labels(self, targets: Any, num_classes: int) -> Tensor:
        if not isinstance(targets, Tensor) or not are_class_labels(targets.reshape(-1)):  # the dtype: integer, not bool
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


def _shortlist(names: list[str], limit: int = 20) -> str:
    return str(names[:limit])[:-1] + (", ...]" if len(names) > limit else "]")
