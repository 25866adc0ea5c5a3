"""SimpleCIL: a frozen pretrained backbone with a nearest-class-mean head (Zhou et al., 2023)."""

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_incremental.methods.pretrained._statistics import (
    ClosedFormClassifier,
    ClosedFormHead,
    ForwardFn,
    TargetsFn,
    class_sums,
)


class CosinePrototypeClassifier(ClosedFormClassifier):
    """Scores every class by the cosine similarity of the features to the class's prototype (its mean feature).

    ``prototypes`` (``[num_classes, in_features]``, the per-class means of the features) and ``seen`` are buffers,
    so they are in the model's ``state_dict``. Before any class is fitted it is ``original``, the layer it
    replaced.

    >>> layer = CosinePrototypeClassifier(nn.Linear(2, 3), 2, 3)
    >>> layer.set_prototypes(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]), torch.tensor([True, True, False]))
    >>> layer(torch.tensor([[3.0, 0.1]])).argmax(dim=1).tolist()
    [0]
    """

    def __init__(self, original: nn.Module, in_features: int, num_classes: int) -> None:
        super().__init__(original, in_features, num_classes)
        self.register_buffer("prototypes", torch.zeros(num_classes, in_features))

    def scores(self, features: Tensor) -> Tensor:
        return F.normalize(features, dim=-1) @ F.normalize(self.prototypes, dim=-1).T

    def set_prototypes(self, prototypes: Tensor, seen: Tensor) -> None:
        """Write the class means ``prototypes`` and which classes have any (``seen``)."""
        self.prototypes.copy_(prototypes)
        self.seen.copy_(seen)


class PrototypeHead(ClosedFormHead):
    r"""SimpleCIL: classify by the nearest class mean of a frozen backbone's features, in cosine similarity.

    At the end of every task the task's training data goes once through the model (eval mode, no gradient, the
    Trainer's precision) and the per-class sums and counts of the **features** — the input of the model's head
    layer — are added to those of the earlier tasks (float64; all-reduced under DDP). The prototype of a class is
    its mean feature over every task seen, and the head scores ``cos(features, prototype)``. No sample is stored,
    and the head after task ``t`` is exactly the nearest-class-mean head of tasks ``0..t`` together.

    **The head.** In ``setup`` the model's head layer (``head_module``; by default the submodule called ``head``,
    ``classifier`` or ``fc``) is replaced by a :class:`CosinePrototypeClassifier` that keeps the old layer as
    ``original`` and behaves as it until the first task ends. After each task the prototypes are written into it,
    so the model's ordinary forward predicts with them: :class:`~lightning_incremental.ContinualEvaluation` and
    your own code need nothing else. Classes not seen yet score the lowest value. Put the head before
    ``ContinualEvaluation`` in the callbacks.

    **Training nothing.** With a frozen backbone there is nothing to train: fit every task with
    ``Trainer(max_epochs=0)``. Lightning then runs no training step (and no ``on_train_end``); the head is
    computed at the end of the fit. ``limit_train_batches=0`` gives the Trainer no data, and a training step on a
    model with nothing trainable fails in the backward; both raise an error that names ``max_epochs=0``.
    ``configure_optimizers`` still runs: ``Adam(self.parameters())`` is fine, an empty parameter list is not
    (torch raises "optimizer got an empty parameter list"; return ``None`` instead).

    **Adapt once** (as APER and RanPAC do): train the whole model on the first task with its own head
    (``max_epochs=E``), then ``max_epochs=0`` for every later task. The prototypes are computed at every task end
    with the backbone as it is then; train it only before the first task end, or the earlier tasks' statistics
    describe a backbone that no longer exists.

    **Hugging Face models.** The features are the head layer's input: for a LightningModule around
    ``AutoModel`` with ``self.head = nn.Linear(384, 20)`` over the mean-pooled output, the default finds ``head``;
    for ``AutoModelForSequenceClassification`` name its ``classifier`` (``head_module="model.classifier"``).
    Dict batches need ``forward=`` and ``targets=``, e.g. ``forward=lambda m, b: m(b["input_ids"],
    b["attention_mask"])`` and ``targets=lambda b: b["labels"]``.

    **DDP.** Every rank reads every ``world_size``-th row of the task's dataset (each row once, no sampler padding)
    and the sums are all-reduced, so every rank holds the same prototypes. Lightning wraps the model in
    DistributedDataParallel, which refuses a model with no trainable parameter: leave the head's own layer
    trainable (it is unused once fitted). Under ``ddp_spawn`` / ``ddp_fork`` call :meth:`install` on the model
    before the first fit.

    **State.** The per-class sums and counts are in ``state_dict`` (the prototypes themselves are in the model's).
    To load a checkpoint into a fresh model outside a Trainer, call :meth:`install` on it first.

    Accuracy on the 20 Newsgroups stream with MiniLM is in ``benchmarks/RESULTS.md``.

    Args:
        head_module: the dotted name of the model's head layer, whose input is the features (``"head"``,
            ``"model.classifier"``); by default the first submodule called ``head``, ``classifier`` or ``fc``.
        num_classes: the number of classes; by default the head's ``out_features``.
        in_features: the size of the features; by default the head's ``in_features``.
        forward: ``forward(pl_module, batch)`` runs the model on a batch (its output is not used); default
            ``pl_module(x)``.
        targets: ``targets(batch)`` returns the class labels; default the ``y`` of ``(x, y)`` or ``{"y": ...}``.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import ContinualEvaluation, MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> _ = L.seed_everything(0, verbose=False)
        >>> stream, model = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(64,))  # a random backbone
        >>> head, evaluation = PrototypeHead(), ContinualEvaluation(stream)
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=0, callbacks=[head, evaluation], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=32))
        >>> type(model.head).__name__, tuple(model.head.prototypes.shape), head.class_counts.tolist()
        ('CosinePrototypeClassifier', (4, 64), [48.0, 48.0, 48.0, 48.0])
        >>> min(evaluation.result().matrix[-1]) > 0.9  # both tasks, classified among all four classes
        True
    """

    classifier_type = CosinePrototypeClassifier

    def __init__(
        self,
        head_module: str | None = None,
        num_classes: int | None = None,
        in_features: int | None = None,
        forward: ForwardFn | None = None,
        targets: TargetsFn | None = None,
    ) -> None:
        super().__init__(head_module, num_classes, in_features, forward, targets)
        self.class_sums: Tensor | None = None  # [classes, features], float64
        self.class_counts: Tensor | None = None  # [classes], float64

    @property
    def prototypes(self) -> Tensor | None:
        """The class means ``[classes, features]`` (float64; rows of unseen classes are 0), or ``None``."""
        if self.class_sums is None or self.class_counts is None:
            return None
        return self.class_sums / self.class_counts.clamp_min(1).unsqueeze(1)

    def build_classifier(self, original: nn.Module, in_features: int, num_classes: int) -> CosinePrototypeClassifier:
        return CosinePrototypeClassifier(original, in_features, num_classes)

    def zero_statistics(self, classifier: ClosedFormClassifier, device: torch.device) -> list[Tensor]:
        zeros = torch.zeros(classifier.num_classes, classifier.in_features + 1, dtype=torch.float64, device=device)
        return [zeros]  # the sums and, in the last column, the counts: one tensor to reduce

    def accumulate(self, statistics: list[Tensor], features: Tensor, labels: Tensor) -> None:
        sums, counts = class_sums(features, labels, len(statistics[0]))
        statistics[0] += torch.cat([sums, counts.unsqueeze(1)], dim=1)

    def consolidate(self, statistics: list[Tensor], classifier: ClosedFormClassifier) -> None:
        task = statistics[0].cpu()
        sums, counts = task[:, :-1], task[:, -1]
        self.class_sums = sums if self.class_sums is None else self.class_sums + sums
        self.class_counts = counts if self.class_counts is None else self.class_counts + counts
        prototypes = self.prototypes
        assert isinstance(classifier, CosinePrototypeClassifier) and prototypes is not None
        classifier.set_prototypes(prototypes.to(classifier.prototypes), (self.class_counts > 0).to(classifier.seen))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "class_sums": self.class_sums, "class_counts": self.class_counts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.class_sums, self.class_counts = state_dict["class_sums"], state_dict["class_counts"]
