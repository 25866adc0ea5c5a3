"""Synaptic Intelligence (Zenke, Poole & Ganguli, 2017)."""

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_incremental.core import grow_to
from lightning_incremental.core.sharding import local
from lightning_incremental.methods.regularization._quadratic import (
    QuadraticPenalty,
    named_trainable_parameters,
    snapshot,
)


class SI(QuadraticPenalty):
    r"""Penalise moving the parameters whose updates reduced the loss the most along the training path.

    Every optimizer step adds ``-g * delta_theta`` to a per-parameter path integral ``omega``, where ``g``
    is the gradient the step used (the loss's, with the penalty's gradient) and ``delta_theta`` the update
    the optimizer made. At the end of a task the importance grows by
    ``omega / ((theta_end - theta_start)^2 + epsilon)``, the anchor moves to the task's final weights and
    ``omega`` restarts; during later tasks ``lambda * Omega * (theta - theta*)`` is added to the gradient.
    The bookkeeping is three fused passes per step (a copy of the weights before the step, then
    ``omega += g * (theta_before - theta_after)``), on the parameters' device. Integrating the task loss's
    gradient alone (without the penalty's) would cost a copy of the gradients every step and measured the same
    (``benchmarks/RESULTS.md``, "The regularization methods' defaults").

    The defaults: ``epsilon=1.0`` is the best mean final accuracy of the regularization sweep on the permuted digits
    stream, ``lambda_=50`` the best with the optimizer's state carried (as SI carries it by default) on both
    permuted digits and permuted Fashion-MNIST; the numbers are in ``benchmarks/RESULTS.md`` ("Defaults across
    datasets").

    Args:
        lambda_: penalty strength (>= 0).
        epsilon: damping of the importance's denominator (> 0).
        consolidate_every_n_steps: also consolidate every N optimizer steps (task-free use).
        state_dtype: the dtype of the importance, the anchor and the cached penalty terms (e.g. ``torch.bfloat16``:
            half their bytes; ``benchmarks/RESULTS.md``, "Sharded models", measures the accuracy); the path
            integral and the start weights stay fp32. ``None`` keeps the importance and the anchor in fp32 and the
            terms in the parameters' dtype.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import ContinualEvaluation, MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model, si = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,)), SI(lambda_=1.0)
        >>> evaluation = ContinualEvaluation(stream)  # after SI in the list: it measures the consolidated model
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[si, evaluation], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> bool(si.importance["net.0.weight"].sum() > 0), len(evaluation.result().matrix)
        (True, 2)
    """

    per_parameter_state = (*QuadraticPenalty.per_parameter_state, "path", "start")

    def __init__(
        self,
        lambda_: float = 50.0,
        epsilon: float = 1.0,
        consolidate_every_n_steps: int | None = None,
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__(lambda_, consolidate_every_n_steps, state_dtype)
        if not epsilon > 0:
            raise ValueError(f"`epsilon` must be > 0 (it keeps the importance finite), got {epsilon}.")
        self.epsilon = float(epsilon)
        self.path: dict[str, Tensor] = {}  # omega, the path integral since the task (or consolidation) started
        self.start: dict[str, Tensor] = {}  # the weights when it started
        self._names: dict[int, str] = {}
        self._before: dict[str, Tensor] = {}  # reused buffers for the weights before a step
        self._pending: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None

    @override
    def place_state(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().place_state(trainer, pl_module)
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        for name, param in named_trainable_parameters(pl_module).items():  # a grown head: pad the path
            shard = local(param)
            if name in self.path and self.path[name].shape != shard.shape:
                self.path[name] = grow_to(self.path[name], shard.shape)
                self.start[name] = grow_to(self.start[name], shard.shape)

    @override
    def on_task_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restart_path(pl_module)

    @override
    def add_gradient_terms(
        self, trainer: Trainer, pl_module: LightningModule, params: list[Tensor], grads: list[Tensor], scale: float
    ) -> None:
        super().add_gradient_terms(trainer, pl_module, params, grads, scale)
        tracked = [(p, g) for p, g in zip(params, grads, strict=True) if self._names.get(id(p)) in self.path]
        if not tracked:
            return
        names = [self._names[id(p)] for p, _ in tracked]
        thetas, step_grads = [local(p) for p, _ in tracked], [g for _, g in tracked]
        for theta, name in zip(thetas, names, strict=True):
            if name not in self._before or self._before[name].shape != theta.shape:
                self._before[name] = torch.empty_like(theta)
        before = [self._before[name] for name in names]
        torch._foreach_copy_(before, thetas)
        self._pending = (thetas, step_grads, before, [self.path[name] for name in names])

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._pending is not None:  # the optimizer stepped in this batch: omega += g * (before - after)
            thetas, step_grads, before, paths = self._pending
            self._pending = None
            with torch.no_grad():
                torch._foreach_sub_(before, thetas)
                if paths[0].dtype == before[0].dtype:
                    torch._foreach_addcmul_(paths, step_grads, before)
                else:
                    for path, grad, delta in zip(paths, step_grads, before, strict=True):
                        path.addcmul_(grad.float(), delta.float())
        super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)

    @override
    def consolidate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        current = snapshot(named_trainable_parameters(pl_module))
        for name, theta in current.items():
            if name not in self.path:
                continue
            contribution = (self.path[name] / ((theta - self.start[name]).square() + self.epsilon)).clamp_min(0)
            old = self.importance.get(name)
            self.importance[name] = contribution if old is None else grow_to(old, theta.shape) + contribution
            self.anchor[name] = theta
        self._restart_path(pl_module)

    def _restart_path(self, pl_module: LightningModule) -> None:
        params = named_trainable_parameters(pl_module)
        self.start = snapshot(params)
        self.path = {name: torch.zeros_like(theta) for name, theta in self.start.items()}
