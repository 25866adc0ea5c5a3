"""SimpleCIL: a frozen pretrained backbone with a nearest-class-mean head (Zhou et al., 2023)."""

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_incremental.methods.pretrained._base import ClosedFormHead, statistic
from lightning_incremental.methods.pretrained.classifier import ClosedFormClassifier
from lightning_incremental.methods.pretrained.functional import class_sums


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

    @override
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

    **A frozen backbone trains nothing**, and you write nothing special: freeze the backbone
    (``backbone.requires_grad_(False)`` or :class:`~lightning_incremental.FreezeLayers`) and fit each task with your
    usual Trainer. When no parameter but those of the replaced head layer would train, the head stops the fit
    before its first step (``trainer.should_stop`` in ``on_train_start``; Lightning then still runs
    ``on_train_end``, where the head is computed). ``max_epochs=0``, ``max_steps=0`` and ``limit_train_batches=0``
    are refused with that advice: Lightning skips ``on_train_end`` and, with ``limit_train_batches=0``, loads no
    training data. ``configure_optimizers`` still runs, so it must not build an optimizer over an empty list
    (``Adam(self.parameters())`` is fine).

    **Adapt once** (as APER and RanPAC do): train the backbone on the first task through its own head, then freeze
    it, e.g. with ``FreezeLayers(freeze=["backbone.*"], from_task=1)`` listed before the head. The prototypes are
    computed at every task end with the backbone as it is then; a backbone that keeps training makes the earlier
    tasks' statistics describe a backbone that no longer exists.

    **Hugging Face models.** The features are the head layer's input: for a LightningModule around ``AutoModel``
    with ``self.head = nn.Linear(384, 20)`` over the mean-pooled output the default finds ``head``; for
    ``AutoModelForSequenceClassification`` it finds ``classifier`` (its input is the pooler's output). Dict batches
    such as ``{"input_ids", "attention_mask", "labels"}`` are read by the
    :class:`~lightning_incremental.ModelInterface` (``model(**inputs)``); pass ``model_interface=`` otherwise.

    **DDP.** Every rank reads every ``world_size``-th row of the task's dataset (each row once, no sampler padding)
    and the sums are all-reduced, so every rank holds the same prototypes. DistributedDataParallel refuses a model
    with no trainable parameter: keep the head's own layer trainable (the fit still stops before its first step).
    Under ``ddp_spawn`` / ``ddp_fork`` call :meth:`install` on the model before the first fit.

    **State.** The per-class sums and counts (:attr:`statistics`, by name) are in ``state_dict`` (the prototypes
    themselves are in the model's).
    To load a checkpoint into a fresh model outside a Trainer, call :meth:`install` on it first.

    Accuracy on the 20 Newsgroups stream with MiniLM is in ``benchmarks/RESULTS.md``.

    Args:
        head_module: the dotted name of the model's head layer, whose input is the features (``"head"``,
            ``"model.classifier"``); by default the first submodule called ``head``, ``classifier`` or ``fc``.
        num_classes: the number of classes; by default the head's ``out_features``.
        in_features: the size of the features; by default the head's ``in_features``.
        model_interface: how to call the model on a batch and read its class labels; default: the model's
            ``continual_interface``, else :class:`~lightning_incremental.ModelInterface`'s defaults.

    Attributes:
        classifier: the :class:`CosinePrototypeClassifier` in the model (after the first ``setup``).
        class_sums, class_counts: the statistics, float64 (``None`` before the first task ends);
            :attr:`prototypes` is their quotient.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import ContinualEvaluation, MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> _ = L.seed_everything(0, verbose=False)
        >>> stream, model = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(64,))
        >>> _ = model.net[0].requires_grad_(False)  # a frozen (here random) backbone
        >>> head, evaluation = PrototypeHead(), ContinualEvaluation(stream)
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=5, callbacks=[head, evaluation], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=32))
        >>> type(model.head).__name__, tuple(model.head.prototypes.shape), head.class_counts.tolist()
        ('CosinePrototypeClassifier', (4, 64), [48.0, 48.0, 48.0, 48.0])
        >>> trainer.global_step  # nothing trained: the fit stopped before its first step
        0
        >>> min(evaluation.result().matrix[-1]) > 0.9  # both tasks, classified among all four classes
        True
    """

    classifier_type = CosinePrototypeClassifier
    class_sums = statistic("class_sums", "The sum of the features of every class, ``[classes, features]``")

    @property
    def prototypes(self) -> Tensor | None:
        """The class means ``[classes, features]`` (float64; rows of unseen classes are 0), or ``None``."""
        if self.class_sums is None or self.class_counts is None:
            return None
        return self.class_sums / self.class_counts.clamp_min(1).unsqueeze(1)

    @override
    def build_classifier(self, original: nn.Module, in_features: int, num_classes: int) -> CosinePrototypeClassifier:
        return CosinePrototypeClassifier(original, in_features, num_classes)

    @override
    def statistic_shapes(self, classifier: ClosedFormClassifier) -> dict[str, tuple[int, ...]]:
        return {**super().statistic_shapes(classifier), "class_sums": (classifier.num_classes, classifier.in_features)}

    @override
    def accumulate(
        self, task: dict[str, Tensor], features: Tensor, labels: Tensor, classifier: ClosedFormClassifier
    ) -> None:
        super().accumulate(task, features, labels, classifier)
        task["class_sums"] += class_sums(features, labels, classifier.num_classes)[0]

    @override
    def fit_classifier(self, classifier: ClosedFormClassifier) -> None:
        prototypes, seen = self.prototypes, self.seen
        assert isinstance(classifier, CosinePrototypeClassifier) and prototypes is not None and seen is not None
        classifier.set_prototypes(prototypes.to(classifier.prototypes), seen.to(classifier.seen))
