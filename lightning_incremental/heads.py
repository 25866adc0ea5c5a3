"""Classifier heads that grow with the stream: one that adds classes, one that adds a head per task.

Put one in your model as its last layer and add :class:`GrowHeads` to the Trainer: at the start of every task
it grows the head to the task's classes, before ``configure_optimizers`` runs, so the optimizer your
LightningModule builds holds the new parameters. Both heads take the classes and heads of a state dict loaded
into them (more or fewer than they hold), so resuming needs nothing special and a grown model's frozen copy
can hold an earlier task's weights (LwF, iCaRL).

They grow by class, so they need integer class labels (one per row): class counts, a head's classes and the
batches' targets that are not integers are refused with the fix. Real-valued (regression) outputs need no
growing head: use a fixed layer such as ``nn.Linear``.
"""

import math
import operator
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_incremental.core import (
    ContinualCallback,
    ModelInterface,
    are_class_labels,
    check_interface_argument,
    interface_of,
    task_of,
)
from lightning_incremental.core.sharding import is_model_parallel

NEEDS_CLASS_LABELS = (
    "Class-incremental heads need integer class labels: for real-valued (regression) targets use a fixed output "
    "layer such as nn.Linear without GrowHeads; for class labels stored as floats, return them as integers from "
    "the dataset (`y.long()`)."
)


class IncrementalClassifier(nn.Module):
    """A linear layer whose output rows (classes) grow; the old rows are kept as they are.

    Args:
        in_features: size of the features it classifies.
        num_classes: classes it starts with (0: grown by the first task).

    >>> head = IncrementalClassifier(4, 2)
    >>> old = head.weight.detach().clone()
    >>> head.grow(5)
    >>> head(torch.zeros(3, 4)).shape, torch.equal(head.weight[:2], old)
    (torch.Size([3, 5]), True)
    """

    def __init__(self, in_features: int, num_classes: int = 0) -> None:
        super().__init__()
        num_classes = _class_count(num_classes, "num_classes")
        if in_features < 1 or num_classes < 0:
            raise ValueError(f"`in_features` must be >= 1 and `num_classes` >= 0, got {in_features}, {num_classes}.")
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0))
        self.grow(num_classes)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def grow(self, num_classes: int) -> None:
        """Make room for ``num_classes`` classes (never shrinks); new rows initialised as ``nn.Linear`` does."""
        added = _class_count(num_classes, "num_classes") - self.num_classes
        if added <= 0:
            return
        new_weight = torch.empty(added, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(new_weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_features)
        new_bias = torch.empty(added, device=self.bias.device, dtype=self.bias.dtype).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), new_weight]))
        self.bias = nn.Parameter(torch.cat([self.bias.detach(), new_bias]))

    def forward(self, features: Tensor) -> Tensor:
        return F.linear(features, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "weight")
        if saved is not None and saved.shape[0] != self.num_classes:  # take the saved size: grown or earlier
            self.weight = nn.Parameter(self.weight.new_empty(saved.shape[0], self.in_features))
            self.bias = nn.Parameter(self.bias.new_empty(saved.shape[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


class MultiHeadClassifier(nn.Module):
    """One linear head per task label, each over its task's classes, written into one global output.

    ``forward`` returns ``[batch, num_classes]`` logits in the stream's class space: the columns of every
    head's classes hold that head's outputs (the others are 0). Train each row on its own head with
    :meth:`mask` (columns of other tasks set to ``-inf``, so cross-entropy is the head's own);
    :class:`~lightning_incremental.ContinualEvaluation` masks the same way in task-incremental mode.
    Distillation methods see every head's output on every row.

    Args:
        in_features: size of the features.
        num_classes: size of the global class space (the stream's number of classes).

    >>> head = MultiHeadClassifier(4, num_classes=6)
    >>> head.add_head(0, [0, 1]); head.add_head(1, [2, 3])
    >>> logits = head(torch.randn(2, 4))
    >>> logits.shape, logits[:, 4:].abs().sum().item()
    (torch.Size([2, 6]), 0.0)
    >>> head.mask(logits, torch.tensor([1, 0]))[0].isinf().tolist()
    [True, True, False, False, True, True]
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        num_classes = _class_count(num_classes, "num_classes")
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"`in_features` and `num_classes` must be >= 1, got {in_features}, {num_classes}.")
        self.in_features, self.num_classes = in_features, num_classes
        self.heads = nn.ModuleDict()

    def add_head(self, task_label: int, classes: list[int]) -> None:
        """Add the head of ``task_label`` over ``classes`` (nothing if it exists with those classes)."""
        classes = _class_list(classes, f"Task {task_label}'s head")
        key = str(int(task_label))
        if key in self.heads:
            if self.heads[key].classes.tolist() != list(classes):
                raise ValueError(
                    f"Task {task_label} already has a head over classes {self.heads[key].classes.tolist()}."
                )
            return
        if not classes or max(classes) >= self.num_classes or min(classes) < 0:
            raise ValueError(f"The classes of task {task_label} must lie in [0, {self.num_classes}), got {classes}.")
        reference = next(self.parameters(), None)
        head = nn.Linear(self.in_features, len(classes))
        head.register_buffer("classes", torch.tensor(list(classes), dtype=torch.long))
        if reference is not None:
            head.to(reference.device)
        self.heads[key] = head

    def forward(self, features: Tensor) -> Tensor:
        logits = features.new_zeros(features.shape[0], self.num_classes)
        for head in self.heads.values():
            logits = logits.index_copy(1, head.classes, head(features).to(logits.dtype))
        return logits

    def mask(self, logits: Tensor, task_labels: Tensor) -> Tensor:
        """``logits`` with every column outside each row's task head set to ``-inf``."""
        allowed = torch.zeros(
            len(self.heads) and max(int(k) for k in self.heads) + 1, self.num_classes, dtype=torch.bool
        )
        for key, head in self.heads.items():
            allowed[int(key), head.classes.cpu()] = True
        return logits.masked_fill(~allowed.to(logits.device)[task_labels], float("-inf"))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved_heads = {}
        for key, value in state_dict.items():
            if key.startswith(prefix + "heads.") and key.endswith(".classes"):
                saved_heads[key[len(prefix + "heads.") :].split(".")[0]] = value.tolist()
        for key in [key for key in self.heads if key not in saved_heads]:  # heads grown after the save
            del self.heads[key]
        for key, classes in saved_heads.items():
            self.add_head(int(key), classes)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GrowHeads(ContinualCallback):
    """Grow the model's :class:`IncrementalClassifier` / :class:`MultiHeadClassifier` at every task start.

    It reads the task's classes (and task label) from the stream's :class:`~lightning_incremental.scenarios.Task`
    behind the fit's dataloader and grows the heads in ``setup``, before a checkpoint is restored and before
    ``configure_optimizers`` runs, so the optimizer holds the new parameters and regularization methods see
    the grown shapes (their importances are padded with zeros for the new rows).

    It needs integer class labels: a task whose classes are not integers is refused in ``setup``, and a batch
    whose targets are not one integer class label per row at its first step, before any optimizer step.

    Args:
        model_interface: how to read the targets of a batch; default: the model's ``continual_interface``, else
            :class:`~lightning_incremental.ModelInterface`'s defaults.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream = synthetic_stream(n_tasks=2)
        >>> model = MLPClassifier(16, 0, hidden=(8,), head="incremental")
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[GrowHeads()], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> model.head.num_classes
        4
    """

    def __init__(self, model_interface: ModelInterface | None = None) -> None:
        super().__init__()
        self.model_interface = check_interface_argument(model_interface)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if is_model_parallel(trainer):
            raise RuntimeError(
                "GrowHeads replaces a head's parameters by larger ones at every task, and fully_shard fixes a "
                "module's parameters when it shards them. Under ModelParallelStrategy build the head with every class "
                "of the stream from the start (e.g. `nn.Linear(features, num_classes)` or "
                "`IncrementalClassifier(features, num_classes)`) and train without GrowHeads."
            )
        task = task_of(trainer)
        heads = [m for m in pl_module.modules() if isinstance(m, IncrementalClassifier | MultiHeadClassifier)]
        if not heads:
            raise ValueError(
                f"`GrowHeads` found no IncrementalClassifier or MultiHeadClassifier in {type(pl_module).__name__}: "
                "use one as the model's last layer."
            )
        if task is None:
            raise ValueError(
                "`GrowHeads` needs the task's classes: train on `task.train_dataloader()` of a TaskStream (or a "
                "datamodule with a `task` attribute)."
            )
        classes = _class_list(task.classes, f"`GrowHeads` grows the heads to the task's classes, but task {task.index}")
        for head in heads:
            if isinstance(head, IncrementalClassifier):
                head.grow(max(classes) + 1)
            else:
                head.add_head(task.label if task.label is not None else task.index, classes)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        interface = interface_of(pl_module, self.model_interface)
        if not interface.has_targets(batch):
            return
        targets = interface.targets(batch)
        if not are_class_labels(targets):
            raise ValueError(
                f"`GrowHeads` grows classifier heads by class and needs one integer class label per row, but the "
                f"targets are {targets.dtype} of shape {list(targets.shape)}. {NEEDS_CLASS_LABELS} If the class "
                "labels are another entry of the batch, name it with `model_interface=ModelInterface(target_key=...)`."
            )


def _class_count(value: Any, argument: str) -> int:
    """``value`` as a whole number of classes; anything else raises, naming ``argument`` and the fix."""
    if not _is_whole_number(value):
        raise ValueError(f"`{argument}` must be a whole number of classes, got {value!r}. {NEEDS_CLASS_LABELS}")
    return operator.index(value)


def _class_list(values: Iterable[Any], what: str) -> list[int]:
    """``values`` as a non-empty list of integer class labels; anything else raises, with ``what`` and the fix."""
    values = list(values)
    if not values or not all(_is_whole_number(value) for value in values):
        raise ValueError(f"{what} has classes {values!r}, not integer class labels. {NEEDS_CLASS_LABELS}")
    return [operator.index(value) for value in values]


def _is_whole_number(value: Any) -> bool:
    """An int, a NumPy integer or an integer tensor of one element; not a bool, not a float."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True
