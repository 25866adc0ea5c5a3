"""Model fusion at task boundaries: merge the weights after a task with those from before it."""

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from lightning_incremental.core import ContinualCallback

Mode = Literal["interpolate", "average"]


class WeightMerging(ContinualCallback):
    r"""At the end of every task, replace the trained weights by a merge with the earlier ones.

    - ``mode="interpolate"``: at task start a copy of the weights ``theta_old`` is kept (fp32, on the
      model's device); at task end ``theta = (1 - alpha) * theta_old + alpha * theta_new``. ``alpha=0`` gives
      the old weights back and ``alpha=1`` keeps the new ones, both bit for bit.
    - ``mode="average"``: ``theta`` becomes the mean of the post-task weights of every task so far, kept as
      a running average ``avg_k = avg_{k-1} + (theta_k - avg_{k-1}) / k`` (fp32); ``alpha`` is not used.

    The first task this callback trains has nothing to merge with: its weights stay as trained. The next task
    starts from the merged weights.

    Buffers are merged like the weights: floating-point buffers such as BatchNorm's ``running_mean`` and
    ``running_var`` get the same interpolation or average, integer buffers such as ``num_batches_tracked``
    keep the new value. The merge runs in ``on_train_end``, so callbacks after this one in the list (e.g.
    :class:`~lightning_incremental.ContinualEvaluation`) see the merged model.

    The copy of the weights from the task start (``interpolate``) and the running average (``average``) are
    in ``state_dict``, so a fit resumed mid-task merges exactly as the uninterrupted one. Under DDP every
    rank holds the same weights, so every rank computes the same merge.

    For an average of the weights *during* a task (EMA, SWA), use Lightning's own
    ``lightning.pytorch.callbacks.EMAWeightAveraging`` or its base ``WeightAveraging`` (or
    ``StochasticWeightAveraging``) next to this callback rather than this one.

    Args:
        alpha: the weight of the new task's weights in ``"interpolate"`` mode, in ``[0, 1]``.
        mode: ``"interpolate"`` or ``"average"``.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,))
        >>> merge = WeightMerging(alpha=0.0)  # alpha=0: every later task's training is undone at its end
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[merge], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        ...     if task.index == 0:
        ...         after_first = model.net[0].weight.detach().clone()
        >>> torch.equal(model.net[0].weight, after_first)
        True
    """

    def __init__(self, alpha: float = 0.5, mode: Mode = "interpolate") -> None:
        super().__init__()
        if not isinstance(alpha, int | float) or not math.isfinite(alpha) or not 0 <= alpha <= 1:
            raise ValueError(f"`alpha` must be in [0, 1] (0 keeps the old weights, 1 the new ones), got {alpha!r}.")
        if mode not in ("interpolate", "average"):
            raise ValueError(f"`mode` must be 'interpolate' or 'average', got {mode!r}.")
        self.alpha, self.mode = float(alpha), mode
        self.start_weights: dict[str, Tensor] = {}  # interpolate: the weights at the start of the current task
        self.average: dict[str, Tensor] = {}  # average: the running mean of the post-task weights
        self.averaged_tasks = 0

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for weights in (self.start_weights, self.average):  # restored from a checkpoint on the CPU
            for name, tensor in weights.items():
                weights[name] = tensor.to(pl_module.device)
        super().on_fit_start(trainer, pl_module)

    def on_task_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "interpolate" and self.tasks_completed > 0:
            self.start_weights = _snapshot(pl_module)

    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "interpolate":
            if self.start_weights:
                _merge_into(pl_module, self.start_weights, self.alpha)
                self.start_weights = {}
            return
        self.averaged_tasks += 1
        if self.averaged_tasks == 1:
            self.average = _snapshot(pl_module)
            return
        self.average = _merge_into(pl_module, self.average, 1.0 / self.averaged_tasks)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "start_weights": _to_cpu(self.start_weights),
            "average": _to_cpu(self.average),
            "averaged_tasks": self.averaged_tasks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.start_weights = dict(state_dict["start_weights"])
        self.average = dict(state_dict["average"])
        self.averaged_tasks = int(state_dict["averaged_tasks"])


def _floating_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The floating-point parameters and buffers of ``module`` by name (shared tensors once)."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {name: tensor for name, tensor in named.items() if tensor.is_floating_point()}


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().to(torch.float32, copy=True) for name, t in _floating_tensors(module).items()}


def _to_cpu(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in weights.items()}


@torch.no_grad()
def _merge_into(module: nn.Module, reference: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    """``t = lerp(reference, t, weight)`` for every floating-point tensor of ``module``; returns the fp32 merge."""
    current = _floating_tensors(module)
    if current.keys() != reference.keys() or any(current[n].shape != reference[n].shape for n in reference):
        changed = sorted(
            name
            for name in current.keys() | reference.keys()
            if name not in current or name not in reference or current[name].shape != reference[name].shape
        )
        raise RuntimeError(
            f"WeightMerging: the model's tensors changed during the task ({', '.join(changed[:8])}); merging "
            "needs the same names and shapes before and after a task."
        )
    merged = {name: torch.lerp(reference[name], tensor.float(), weight) for name, tensor in current.items()}
    for name, tensor in current.items():
        tensor.copy_(merged[name])
    return merged
