"""Learning without Forgetting, LwF (Li & Hoiem, 2016)."""

import functools
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_incremental.core.batch import batch_size_of, split_inputs, task_labels_of
from lightning_incremental.core.callback import ContinualCallback, StepFn, add_to_loss
from lightning_incremental.core.logits import LogitsCapture
from lightning_incremental.core.modules import OldModel


def distillation_loss(new_logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    r"""``T^2 * KL(softmax(old / T) || softmax(new / T))``, averaged over the batch, in fp32.

    The ``T^2`` keeps the gradient's size independent of the temperature (Hinton et al., 2015).

    >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
    >>> distillation_loss(logits, logits, temperature=2.0).item()
    0.0
    >>> round(distillation_loss(torch.zeros(1, 2), torch.tensor([[10.0, -10.0]]), 1.0).item(), 4)
    0.6931
    """
    log_new = F.log_softmax(new_logits.float() / temperature, dim=-1)
    log_old = F.log_softmax(old_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_new, log_old, reduction="batchmean", log_target=True)


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

    The classes come from the stream's :class:`~lightning_incremental.scenarios.Task`; data without that
    metadata is distilled over all columns. The old model's weights are in ``state_dict``, so checkpoints
    and resumes restore it.

    Defaults (``alpha=1.0``, ``temperature=2.0``) are the sweep's choice in ``benchmarks/sweep_lwf.py``.

    Args:
        alpha: weight of the distillation term (>= 0).
        temperature: softmax temperature (> 0).
        logits_module: the submodule whose output is the logits (name or module); discovered by default.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model, lwf = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,)), LwF(alpha=1.0)
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[lwf], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> lwf.old_tasks, lwf.old_model.training
        ([[0, 1], [2, 3]], False)
    """

    def __init__(
        self, alpha: float = 1.0, temperature: float = 2.0, logits_module: str | nn.Module | None = None
    ) -> None:
        super().__init__()
        if not alpha >= 0:
            raise ValueError(f"`alpha` must be >= 0, got {alpha}.")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.capture = LogitsCapture(logits_module)
        self.old = OldModel()
        self.old_tasks: list[list[int]] = []  # the classes of every completed task ([] when unknown)

    @property
    def old_model(self) -> nn.Module | None:
        """The frozen copy of the model at the last task end (``None`` before the first task ends)."""
        return self.old.module

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.old.materialize(pl_module)
        super().on_fit_start(trainer, pl_module)

    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.old.keep(pl_module)
        self.old_tasks.append(list(self.task.classes) if self.task is not None else [])

    def wrap_training_step(self, trainer: Trainer, pl_module: LightningModule, batch: Any, step: StepFn) -> STEP_OUTPUT:
        if self.old_model is None or self.alpha == 0:
            return step(batch)
        size = batch_size_of(batch)
        with self.capture.recording(pl_module, batch_size=size) as record:
            output = step(batch)
        old_logits = self.old.logits(trainer, split_inputs(batch), size, self.capture.name_in(pl_module))
        new_logits = record.logits[:size, : old_logits.shape[1]]  # columns past the old model's: grown classes
        term = self.alpha * sum(
            distillation_loss(new_logits[:, columns], old_logits[:, columns], self.temperature)
            for columns in self._heads(batch, old_logits.shape[1], old_logits.device)
        )
        return add_to_loss(output, term)

    def _heads(self, batch: Any, num_outputs: int, device: torch.device | str = "cpu") -> list[Tensor | slice]:
        """The groups of output columns distilled separately, as indices on ``device``."""
        old_tasks = tuple(tuple(classes) for classes in self.old_tasks)
        return list(_column_groups(old_tasks, task_labels_of(batch) is not None, num_outputs, device))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "old_tasks": self.old_tasks, "old_model": self.old.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.old_tasks = [list(map(int, classes)) for classes in state_dict["old_tasks"]]
        self.old.load_state_dict(state_dict["old_model"])


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
    seen = sorted({c for classes in known for c in classes})
    return (slice(None),) if len(seen) == num_outputs else (torch.tensor(seen, device=device),)
