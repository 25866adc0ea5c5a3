"""iCaRL: incremental classifier and representation learning (Rebuffi et al., 2017)."""

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_incremental.buffers import PadValue, ReplayBuffer
from lightning_incremental.core import (
    FeatureCapture,
    ModelInterface,
    OldModel,
    Step,
    add_to_loss,
    are_class_labels,
    batch_size_of,
    check_submodule_argument,
    class_columns,
    distillation_loss,
    index_batch,
    interface_of,
    own_pass,
    task_rows,
    with_leaves,
)
from lightning_incremental.methods.replay._base import ReplayMethod


def herding(features: Tensor, m: int) -> Tensor:
    r"""The indices of ``m`` rows of ``features`` in herding order (Welling, 2009; iCaRL's Algorithm 4).

    The ``k``-th pick is the unpicked row that brings the mean of the first ``k`` picks closest to the mean
    of all rows, so every prefix of the order is a good exemplar set of its size. Rows are used as given
    (iCaRL passes L2-normalised features); ties go to the lowest index.

    >>> features = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    >>> herding(features, 2).tolist()  # the mean is 3.25: 2 alone is closest, then 2 and 1 (1.5) beat 2, 10 (6)
    [2, 1]
    """
    features = features.float()
    target = features.mean(dim=0)
    picked: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool, device=features.device)
    for k in range(1, min(m, len(features)) + 1):
        distances = ((target - (running + features) / k) ** 2).sum(dim=1)
        index = int(distances.masked_fill(~available, float("inf")).argmin())
        picked.append(index)
        running += features[index]
        available[index] = False
    return torch.tensor(picked, dtype=torch.long, device=features.device)


class ICaRL(ReplayMethod):
    r"""iCaRL: herding-selected exemplars, replay with distillation, nearest-mean-of-exemplars classification.

    It is a replay method (its exemplars live in the :class:`~lightning_incremental.ReplayBuffer` every replay
    method owns) with the distillation of :class:`~lightning_incremental.LwF`; what it adds is which rows
    the buffer keeps and how it classifies.

    - **Exemplars.** At the end of every task, the finished task's training data is passed once more through
      the model (eval mode, no gradient, the Trainer's precision, the user's random streams untouched) and the
      features the classifier reads — the input of the layer that produces the logits, L2-normalised — are
      recorded. For every class of the task, :func:`herding` orders its rows so that the mean of every prefix
      approximates the class mean. The buffer is then refilled with ``buffer_size // classes seen`` rows per
      class: old classes keep the prefix of their herding order, a class seen again is herded anew over its
      exemplars and its new rows. Each row keeps its place in its class's herding order (the buffer's
      ``"position"`` extra) and its class (the buffer's groups). Exemplars are whole batch rows (inputs,
      labels, anything else the batch carries; sequences padded per key) in the batch's own dtype.
    - **Training.** The user's ``training_step`` receives its batch extended by exemplars (same structure,
      device and dtype, ``ratio`` replayed rows per current row), so its own classification loss covers the
      old classes; to it the wrapped step adds LwF's
      ``alpha * T^2 * KL(softmax(old / T) || softmax(new / T))`` over the old classes' logits, on every row it
      passes on, from a frozen copy of the model at the previous task's end. The paper's sigmoid binary
      cross-entropy is not used: it pairs with the paper's own sigmoid classification loss, while here the
      classification loss is the user's (a softmax cross-entropy as a rule), and mixing a sigmoid target for
      the old columns with a softmax loss over all columns pulls the logits two ways.
    - **Classification.** :meth:`predict` classifies by the nearest mean of exemplars: the class whose
      normalised mean of normalised exemplar features (recomputed at every task end with the final model)
      is closest to the input's normalised features. Pass it to the evaluation:
      ``ContinualEvaluation(stream, predict=icarl.predict)`` (the command line and the benchmarks do).

    It needs one integer class label per row, and refuses other targets (real-valued, multi-label,
    token-level) at the first batch, before any optimizer step.

    **Composition.** Like :class:`~lightning_incremental.ExperienceReplay` it extends the batch the inner
    methods see; it distils on the rows it passes on, which include an outer replay method's rows.

    **DDP.** Every rank herds over the whole task (the same weights and data give the same exemplars); the
    exemplars form one global buffer of which each rank holds and replays its share, as in every replay
    method. The exemplars, the class means, the old model's weights and the sampler's generator are in
    ``state_dict``.

    Defaults (``buffer_size=200``, ``alpha=1.0``, ``temperature=2.0``, ``ratio=4.0``) follow ExperienceReplay
    and LwF; their accuracy on the reference protocol is in ``benchmarks/RESULTS.md``.

    Args:
        buffer_size: exemplars kept in all (>= 1), split evenly over the classes seen.
        alpha: weight of the distillation term (>= 0; 0 turns it off).
        temperature: softmax temperature of the distillation (> 0).
        replay_batch_size: exemplars replayed per step; default ``ratio`` times the current batch size.
        ratio: replayed rows per current row when ``replay_batch_size`` is not given (> 0).
        logits_module: the submodule whose output is the logits (name or module); found by default.
        feature_module: the layer whose input is the features (name or module); by default the innermost
            module that produces the logits, e.g. the last ``Linear``.
        seed: seed of the exemplar sampling.
        model_interface: how to read the model's outputs and targets; default: the model's
            ``continual_interface``, else :class:`~lightning_incremental.ModelInterface`'s defaults.
        pad_values: the pad value of batch entries whose length varies (``{"input_ids": 1}``); inferred by
            default (see :class:`~lightning_incremental.ExperienceReplay`).

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import ContinualEvaluation, MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> _ = L.seed_everything(0, verbose=False)
        >>> stream, model = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,), lr=1e-2)
        >>> icarl = ICaRL(buffer_size=20)
        >>> evaluation = ContinualEvaluation(stream, predict=icarl.predict)
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=2, callbacks=[icarl, evaluation], logger=False,
        ...                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> icarl.classes, [len(rows[0]) for rows in icarl.exemplars], tuple(icarl.class_means.shape)
        ([0, 1, 2, 3], [5, 5, 5, 5], (4, 8))
        >>> min(evaluation.result().matrix[-1]) > 0.8  # both tasks, by the nearest mean of exemplars
        True
    """

    reads_step_outputs = True
    adds_loss_terms = True

    def __init__(
        self,
        buffer_size: int = 200,
        alpha: float = 1.0,
        temperature: float = 2.0,
        replay_batch_size: int | None = None,
        ratio: float = 4.0,
        logits_module: str | nn.Module | None = None,
        feature_module: str | nn.Module | None = None,
        seed: int = 0,
        model_interface: ModelInterface | None = None,
        pad_values: Mapping[str, PadValue] | None = None,
    ) -> None:
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"`buffer_size` must be a positive integer (the exemplars kept), got {buffer_size!r}.")
        super().__init__(buffer_size, "class_balanced", "task_end", seed, model_interface, pad_values)
        if not alpha >= 0:
            raise ValueError(f"`alpha` must be >= 0 (0 turns the distillation off), got {alpha}.")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"`replay_batch_size` must be a positive integer or None, got {replay_batch_size}.")
        if not ratio > 0:
            raise ValueError(f"`ratio` must be > 0, got {ratio}.")
        check_submodule_argument("logits_module", logits_module)
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.replay_batch_size, self.ratio = replay_batch_size, float(ratio)
        self.logits_module = logits_module
        self.features = FeatureCapture(feature_module)
        self.old = OldModel()
        self.classes: list[int] = []  # the classes with exemplars, sorted
        self.class_means: Tensor | None = None  # [classes, features], normalised; row i is classes[i]

    @property
    def old_model(self) -> nn.Module | None:
        """The frozen copy of the model at the last task end (``None`` before the first task ends, and for a
        ``fully_shard``-ed model, whose old weights are kept as shards by
        :class:`~lightning_incremental.core.OldModel`)."""
        return self.old.module

    @property
    def exemplars(self) -> list[list[Tensor]]:
        """For every class of :attr:`classes`: its exemplars' batch tensors, in herding order, as this process
        holds them (under DDP its share of the buffer; ``state_dict`` holds them all)."""
        return [_rows_at(self.buffer, _class_slots(self.buffer, c)) for c in self.classes]

    # ------------------------------------------------------------------ hooks
    @override
    def place_state(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().place_state(trainer, pl_module)
        self.features.module(pl_module)  # a submodule name that does not exist fails now, not at the task's end
        self.old.materialize(pl_module)
        if self.class_means is not None:
            self.class_means = self.class_means.to(pl_module.device)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        _check_class_labels(interface_of(pl_module, self.model_interface), batch)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def wrap_training_step(self, trainer: Trainer, pl_module: LightningModule, batch: Any, step: Step) -> STEP_OUTPUT:
        extended = batch
        if len(self.buffer):
            k = self.replay_batch_size or max(1, round(self.ratio * batch_size_of(batch)))
            extended = self.concat(batch, self.replay(batch, k)[0])
        output = step(extended)
        if output is None or not self.old.kept or self.alpha == 0:
            return output
        new_logits = step.logits_for(extended)
        old_logits = self.old.logits(trainer, extended, interface_of(pl_module, self.model_interface))
        columns = class_columns(tuple(self.classes), old_logits.shape[-1], old_logits.device)
        new_logits = new_logits[:, : old_logits.shape[-1]]  # columns past the old model's: grown classes
        term = distillation_loss(new_logits[:, columns], old_logits[:, columns], self.temperature)
        return add_to_loss(output, self.alpha * term)

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # replaces the replay methods' task-end fill: the buffer is refilled with herding's choice
        memory = ReplayBuffer.pooled(super().state_dict()["shards"], self.buffer_size, self.seed)
        memory.to(pl_module.device)  # every rank's exemplars: herding needs them all
        rows = _whole_task(trainer)
        with own_pass(trainer, pl_module, rows) as batches:  # pass 1: every row's features and label
            kept, picked, like = self._herd(pl_module, memory, batches, rows.batch_size or 1)
        with own_pass(trainer, pl_module, rows) as batches:  # pass 2: the picked rows themselves
            self._refill(trainer, pl_module.device, memory, batches, like, kept, picked)
        self.old.keep(pl_module)

    # ------------------------------------------------------------------ nearest mean of exemplars
    def predict(self, pl_module: LightningModule, batch: Any) -> Tensor:
        """Scores ``[batch, classes]`` by the nearest mean of exemplars: ``-||phi(x) - mu_c||`` for every class
        ``c`` with exemplars, ``-inf`` for the others (higher is more likely).

        ``phi(x)`` is the normalised input of the feature module; ``mu_c`` the class means of the last task
        end. Before the first task ends (no exemplars yet) the scores are the model's logits. Call it in eval
        mode, like any prediction; :class:`~lightning_incremental.ContinualEvaluation` does.
        """
        interface = interface_of(pl_module, self.model_interface)
        with torch.no_grad():
            features, logits = self.features.forward(pl_module, batch, interface)
        if self.class_means is None:
            return logits
        features = F.normalize(features.flatten(1).float(), dim=1)
        scores = torch.full(
            (len(features), max(logits.shape[-1], max(self.classes) + 1)), float("-inf"), device=features.device
        )
        scores[:, self.classes] = -torch.cdist(features, self.class_means.to(features.device))
        return scores

    # ------------------------------------------------------------------ exemplars
    def _herd(
        self, pl_module: LightningModule, memory: ReplayBuffer, batches: Iterable[Any], batch_size: int
    ) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]], Any]:
        """Herd the finished task's classes, keep the herding prefix of the others and recompute the class means;
        return what the refill keeps and picks, and a batch of the task's structure."""
        interface = interface_of(pl_module, self.model_interface)
        like, task_features, task_labels = None, [], []
        for batch in batches:
            like = batch if like is None else like
            task_features.append(self._features(pl_module, interface, batch))
            task_labels.append(interface.targets(batch).reshape(-1))
        features, labels = torch.cat(task_features), torch.cat(task_labels).cpu()
        chunks = torch.arange(len(memory)).split(batch_size) if len(memory) else ()
        memory_features = torch.cat(  # every exemplar's features under the final model, by slot
            [
                features[:0],
                *(self._features(pl_module, interface, with_leaves(like, _rows_at(memory, s))) for s in chunks),
            ]
        )
        classes = sorted(set(labels.tolist()) | set(self.classes))
        per_class = self.buffer_size // len(classes)
        if per_class < 1:
            raise ValueError(
                f"`buffer_size={self.buffer_size}` leaves no exemplar for {len(classes)} classes: use a buffer_size "
                "of at least the number of classes."
            )
        kept: list[tuple[Tensor, Tensor]] = []  # (memory slots, herding positions) of the exemplars that stay
        picked: list[tuple[Tensor, Tensor]] = []  # (task rows, herding positions) of the new exemplars
        means = []
        for c in classes:
            slots = _class_slots(memory, c)
            rows = (labels == c).nonzero().flatten()
            candidates = torch.cat([memory_features[slots], features[rows.to(features.device)]])
            order = herding(candidates, per_class).cpu() if len(rows) else torch.arange(min(per_class, len(slots)))
            positions = torch.arange(len(order))
            old = order < len(slots)
            kept.append((slots[order[old]], positions[old]))
            picked.append((rows[order[~old] - len(slots)], positions[~old]))
            means.append(F.normalize(candidates[order.to(candidates.device)].mean(dim=0), dim=0))
        self.classes, self.class_means = classes, torch.stack(means)
        return kept, picked, like

    def _refill(
        self,
        trainer: Trainer,
        device: torch.device,
        memory: ReplayBuffer,
        batches: Iterable[Any],
        like: Any,
        kept: list[tuple[Tensor, Tensor]],
        picked: list[tuple[Tensor, Tensor]],
    ) -> None:
        """A new global buffer of the kept and the newly picked exemplars, each with its herding position, laid
        out class after class in herding order (so every rank's share holds every class); each rank keeps its
        share, and the sampler's generator goes on where it was."""
        generator = self.buffer.generator.get_state()
        self.buffer = ReplayBuffer(self.buffer_size, "class_balanced", self.seed)  # the picks, in any order
        slots, positions = (torch.cat(parts) for parts in zip(*kept, strict=True))
        if len(slots):
            self.insert(with_leaves(like, _rows_at(memory, slots)), {"position": positions.to(device)})
        rows, positions = (torch.cat(parts) for parts in zip(*picked, strict=True))
        offset = 0
        for batch in batches:
            n = batch_size_of(batch)
            hit = ((rows >= offset) & (rows < offset + n)).nonzero().flatten()
            if len(hit):
                self.insert(index_batch(batch, rows[hit] - offset), {"position": positions[hit].to(device)})
            offset += n
        staging, self.buffer = self.buffer, ReplayBuffer(self.buffer_size, "class_balanced", self.seed)
        for c in self.classes:
            slots = _class_slots(staging, c)
            position = staging.extras["position"][slots.to(device)]
            self.buffer.add(_rows_at(staging, slots), staging.groups[slots], {"position": position}, staging.pad_values)
        if trainer.world_size > 1:
            self.buffer = self.buffer.share(trainer.global_rank, trainer.world_size, self.seed)
        self.buffer.generator.set_state(generator)

    def _features(self, pl_module: LightningModule, interface: ModelInterface, batch: Any) -> Tensor:
        """The L2-normalised features of ``batch``'s rows (the input of the feature module), in fp32."""
        features, _ = self.features.forward(pl_module, batch, interface)
        return F.normalize(features.flatten(1).float(), dim=1)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "classes": list(self.classes),
            "class_means": None if self.class_means is None else self.class_means.cpu(),
            "old_model": self.old.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.classes = [int(c) for c in state_dict["classes"]]
        self.class_means = state_dict["class_means"]
        self.old.load_state_dict(state_dict["old_model"])


def _check_class_labels(interface: ModelInterface, batch: Any) -> None:
    """Refuse a batch without one integer class label per row, with the fix."""
    try:
        targets = interface.targets(batch)
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"ICaRL keeps exemplars per class and needs the class label of every row. {error.args[0]}"
        ) from error
    if not are_class_labels(targets):
        raise ValueError(
            f"ICaRL needs one integer class label per row (it keeps exemplars per class and classifies by the "
            f"nearest class mean), but the targets are {targets.dtype} of shape {list(targets.shape)}: regression, "
            "multi-label or token-level targets. For such targets use ExperienceReplay or DER, which "
            "serve any target, with LwF for distillation. If these are class indices stored as floats, return them "
            "as integers from the dataset (`y.long()`); if the class labels are another entry of the batch, name "
            "it with `model_interface=ModelInterface(target_key=...)`."
        )


def _class_slots(buffer: ReplayBuffer, c: int) -> Tensor:
    """The slots of ``buffer`` that hold class ``c``, in herding order."""
    slots = (buffer.groups[: len(buffer)] == c).nonzero().flatten()
    if not len(slots):
        return slots
    return slots[buffer.extras["position"][: len(buffer)].cpu()[slots].argsort()]


def _rows_at(buffer: ReplayBuffer, slots: Tensor) -> list[Tensor]:
    """The stored rows in ``slots`` (one tensor per batch leaf), a sequence leaf cut to the longest of them."""
    index = slots.to(buffer.storage[0].device) if buffer.storage else slots
    rows = []
    for store, lengths in zip(buffer.storage, buffer.lengths, strict=True):
        if lengths is not None:
            store = store[:, : int(lengths[slots].max()) if len(slots) else 0]
        rows.append(store.index_select(0, index))
    return rows


def _whole_task(trainer: Trainer) -> DataLoader:
    """The task's training data in dataset order, every row once, with the user's collate function.

    Every DDP rank reads the whole task (not its shard), so all ranks herd the same exemplars.
    """
    if not isinstance(trainer.train_dataloader, DataLoader):
        raise TypeError(
            "ICaRL reads the task's data again at its end and needs one DataLoader, got "
            f"{type(trainer.train_dataloader).__name__}."
        )
    rows = task_rows(trainer, "all")
    assert isinstance(rows, DataLoader)
    return rows
