"""Learning without Forgetting, LwF (Li & Hoiem, 2016)."""

import functools
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_incremental.core import (
    ContinualCallback,
    ModelInterface,
    OldModel,
    Step,
    add_to_loss,
    check_interface_argument,
    check_submodule_argument,
    class_columns,
    distillation_loss,
    interface_of,
    task_labels_of,
    top_k_distillation_loss,
)

Distillation = Literal["auto", "softmax", "sigmoid", "mse"]
DISTILLATIONS = ("auto", "softmax", "sigmoid", "mse")


def sigmoid_distillation_loss(new_logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    r"""``T^2 *`` the binary cross-entropy of ``sigmoid(new / T)`` against ``sigmoid(old / T)`` per output, summed
    over the outputs and averaged over the batch: the distillation of multi-label logits.

    >>> round(sigmoid_distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), 1.0).item(), 4)  # 2 * log 2
    1.3863
    """
    targets = torch.sigmoid(old_logits.float() / temperature)
    losses = F.binary_cross_entropy_with_logits(new_logits.float() / temperature, targets, reduction="sum")
    return temperature**2 * losses / new_logits.shape[0]


def mse_distillation_loss(new_outputs: Tensor, old_outputs: Tensor) -> Tensor:
    """The squared distance of the new real-valued outputs to the old, summed over outputs, averaged over rows.

    >>> mse_distillation_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])).item()
    5.0
    """
    return (new_outputs.float() - old_outputs.float()).square().sum() / new_outputs.shape[0]


class LwF(ContinualCallback):
    r"""Keep the old model's outputs on the new data: distillation from a frozen copy of the last model.

    At the end of every task a frozen copy of the model is kept (eval mode, no gradient, on the model's
    device; one copy, replaced at each task end). During the next task, the wrapped ``training_step`` runs
    the old model on the current batch under the live precision context and adds
    ``alpha * T^2 * KL(softmax(old / T) || softmax(new / T))`` over the outputs of the old tasks:

    - **class-incremental** (no task label in the batch): the columns of every class seen so far, together;
    - **multi-head / task-incremental** (``(x, y, t)`` batches): each old task's classes (its head)
      separately, summed over the old tasks;
    - **domain-incremental** (every task has every class): all columns.

    The classes of a task come from the stream's :class:`~lightning_incremental.scenarios.Task` when it built
    the data, else from the class labels the task's batches carried. The old model's weights are in
    ``state_dict``, so checkpoints and resumes restore it.

    **Other outputs.** What is distilled follows the outputs (``distillation="auto"``): class logits by the
    softmax KL above; multi-label logits by the binary cross-entropy of the sigmoids
    (:func:`sigmoid_distillation_loss`); real-valued outputs (regression) by the squared distance to the old
    outputs (:func:`mse_distillation_loss`), where a softmax would be constant and distil nothing. Token-level
    logits ``[B, T, V]`` (a language model) are distilled on the tokens that score an answer token (label not
    -100: :meth:`~lightning_incremental.ModelInterface.answer_positions`), over the whole vocabulary; with a
    vocabulary larger than ``top_k``, over the old model's ``top_k`` largest logits of each token
    (:func:`~lightning_incremental.core.top_k_distillation_loss`), so what LwF holds of the old outputs is
    ``top_k`` values and indices per answer token.

    **Composition.** LwF distils on the rows its wrapped step receives: after
    :class:`~lightning_incremental.ExperienceReplay` in the callback list (so replay extends the batch first)
    it distils the replayed rows too; before it, only the current rows. It reads the live logits from the
    step chain's record. It adds to the loss, so it refuses manual optimization.

    Defaults (``alpha``, ``temperature``) are the choice of ``benchmarks/sweeps/sweep_lwf.py``, made with the
    optimizer's state carried across tasks (:class:`~lightning_incremental.KeepOptimizerState`, as the
    catalog runs LwF); a high temperature makes the term close to matching the old logits. Beside a replay
    method use a smaller weight (the catalog's ``replay_lwf_ewc``). Numbers in ``benchmarks/RESULTS.md``.

    Args:
        alpha: weight of the distillation term (>= 0).
        temperature: softmax (sigmoid) temperature (> 0); not used for real-valued outputs.
        distillation: ``"auto"``, ``"softmax"``, ``"sigmoid"`` or ``"mse"`` (see above).
        logits_module: the submodule whose output is the logits (name or module); found by default.
        model_interface: how to read the model's outputs and targets; default: the model's
            ``continual_interface``, else :class:`~lightning_incremental.ModelInterface`'s defaults.
        top_k: for token-level logits with a larger vocabulary, distil over the old model's ``top_k`` largest
            logits of each answer token; ``None``: over every logit. Class logits are distilled whole.
        teacher: ``"last_task"``: the model at the last task end (LwF); ``"base"``: the model before the first
            task, kept for good, to keep a pretrained model's own outputs (beside a replay of general text, on its
            rows too: put the replay method first).

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import ExperienceReplay, MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,))
        >>> methods = [ExperienceReplay(buffer_size=32), LwF(alpha=1.0)]  # LwF distils the replayed rows too
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=1, callbacks=methods, logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> lwf = methods[1]
        >>> lwf.old_tasks, lwf.old_model.training
        ([[0, 1], [2, 3]], False)
    """

    reads_step_outputs = True
    adds_loss_terms = True
    keeps_optimizer_state = True  # measured: RESULTS.md "The optimizer's state across tasks"

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 8.0,
        distillation: Distillation = "auto",
        logits_module: str | nn.Module | None = None,
        model_interface: ModelInterface | None = None,
        top_k: int | None = 64,
        teacher: Literal["last_task", "base"] = "last_task",
    ) -> None:
        super().__init__()
        if teacher not in ("last_task", "base"):
            raise ValueError(f"`teacher` must be 'last_task' or 'base', got {teacher!r}.")
        self.teacher = teacher
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(
                f"`top_k` must be a positive integer (the old model's largest logits kept per token) or None (all of "
                f"them), got {top_k!r}."
            )
        self.top_k = top_k
        if not alpha >= 0:
            raise ValueError(f"`alpha` must be >= 0, got {alpha}.")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        if distillation not in DISTILLATIONS:
            raise ValueError(f"`distillation` must be one of {DISTILLATIONS}, got {distillation!r}.")
        check_submodule_argument("logits_module", logits_module)
        self.alpha, self.temperature, self.distillation = float(alpha), float(temperature), distillation
        self.logits_module = logits_module
        self.model_interface = check_interface_argument(model_interface)
        self.old = OldModel()
        self.old_tasks: list[list[int]] = []  # the classes of every completed task ([] when unknown)
        self._labels_seen: Tensor | None = None  # this task's class labels, as a mask over the outputs

    @property
    def old_model(self) -> nn.Module | None:
        """The frozen copy of the model at the last task end (``None`` before the first task ends, and for a
        ``fully_shard``-ed model, whose old weights are kept as shards by
        :class:`~lightning_incremental.core.OldModel`)."""
        return self.old.module

    @override
    def place_state(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.old.materialize(pl_module)
        if self._labels_seen is not None:
            self._labels_seen = self._labels_seen.to(pl_module.device)

    @override
    def on_task_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._labels_seen = None
        if self.teacher == "base" and not self.old.kept:  # the model before any task: the pretrained base
            self.old.keep(pl_module)

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.teacher == "last_task":
            self.old.keep(pl_module)
        if self.task is not None:
            classes = list(self.task.classes)
        else:  # the user's own data: the class labels its batches carried (one host sync per task)
            seen = self._labels_seen
            classes = seen.nonzero().flatten().tolist() if seen is not None else []
        self.old_tasks.append(classes)

    @override
    def wrap_training_step(self, trainer: Trainer, pl_module: LightningModule, batch: Any, step: Step) -> STEP_OUTPUT:
        output = step(batch)
        if output is None or self.alpha == 0:  # the user skipped the batch: nothing to add
            return output
        interface = interface_of(pl_module, self.model_interface)
        new_logits = step.logits_for(batch)
        mode = self._mode(interface, new_logits, batch)
        if mode == "softmax" and self.task is None and new_logits.ndim == 2:
            self._remember_labels(interface, new_logits, batch)
        if not self.old.kept:
            return output
        old_logits = self.old.logits(trainer, batch, interface)
        if mode == "mse":
            return add_to_loss(output, self.alpha * mse_distillation_loss(new_logits, old_logits))
        new_logits = new_logits[..., : old_logits.shape[-1]]  # columns past the old model's: grown classes
        loss = distillation_loss if mode == "softmax" else sigmoid_distillation_loss
        if new_logits.ndim == 3 and mode == "softmax":  # token-level (a language model): answer tokens, every column
            positions = interface.answer_positions(pl_module, new_logits, batch)
            new_rows, old_rows = new_logits[positions], old_logits[positions]
            del old_logits  # held from here on: the answer tokens' old logits, or their top k
            if not len(new_rows):  # no answer token in the batch
                return output
            if self.top_k is None or old_rows.shape[-1] <= self.top_k:
                return add_to_loss(output, self.alpha * loss(new_rows, old_rows, self.temperature))
            old_top, old_indices = old_rows.float().topk(self.top_k, dim=-1)
            del old_rows
            term = top_k_distillation_loss(new_rows, old_top, old_indices, self.temperature)
            return add_to_loss(output, self.alpha * term)
        new_rows, old_rows = new_logits.flatten(0, -2), old_logits.flatten(0, -2)
        term = sum(
            loss(new_rows[:, columns], old_rows[:, columns], self.temperature) * (new_rows.shape[0] / len(new_logits))
            for columns in self._heads(batch, old_logits.shape[-1], old_logits.device)
        )
        return add_to_loss(output, self.alpha * term)

    def _mode(self, interface: ModelInterface, logits: Tensor, batch: Any) -> str:
        """What to distil: the argument, or what the outputs and targets are (see the class docstring)."""
        if self.distillation != "auto":
            return self.distillation
        if interface.has_targets(batch):
            likelihood = interface.likelihood_of(logits, interface.targets(batch))
            return {"categorical": "softmax", "bernoulli": "sigmoid"}.get(likelihood, "mse")
        return "mse" if logits.shape[-1] == 1 else "softmax"

    def _remember_labels(self, interface: ModelInterface, logits: Tensor, batch: Any) -> None:
        """Mark the class labels of this batch (on the device, no host sync)."""
        if not interface.has_targets(batch):
            return
        labels = interface.targets(batch).flatten()
        labels = labels[(labels >= 0) & (labels < logits.shape[-1])]
        if self._labels_seen is None or self._labels_seen.numel() != logits.shape[-1]:
            self._labels_seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        self._labels_seen[labels] = True

    def _heads(self, batch: Any, num_outputs: int, device: torch.device | str = "cpu") -> list[Tensor | slice]:
        """The groups of output columns distilled separately, as indices on ``device``."""
        old_tasks = tuple(tuple(classes) for classes in self.old_tasks)
        return list(_column_groups(old_tasks, task_labels_of(batch) is not None, num_outputs, device))

    @override
    def state_dict(self) -> dict[str, Any]:
        seen = self._labels_seen
        return {
            **super().state_dict(),
            "old_tasks": self.old_tasks,
            "old_model": self.old.state_dict(),
            "labels_seen": seen.cpu() if seen is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.old_tasks = [list(map(int, classes)) for classes in state_dict["old_tasks"]]
        self.old.load_state_dict(state_dict["old_model"])
        self._labels_seen = state_dict.get("labels_seen")


@functools.lru_cache(maxsize=16)
def _column_groups(
    old_tasks: tuple[tuple[int, ...], ...], multi_head: bool, num_outputs: int, device: torch.device | str
) -> tuple[Tensor | slice, ...]:
    """The column groups of :meth:`LwF._heads`, built once per (tasks, layout, device): no copy per step."""
    known = [classes for classes in old_tasks if classes]
    if len(known) < len(old_tasks):  # some task without class metadata: every column, together
        return (slice(None),)
    if multi_head:  # one head per old task
        return tuple(torch.tensor(classes, device=device) for classes in known)
    return (class_columns(tuple(c for classes in known for c in classes), num_outputs, device),)
