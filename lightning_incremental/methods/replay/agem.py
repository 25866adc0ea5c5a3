"""Averaged Gradient Episodic Memory, A-GEM (Chaudhry et al., 2019)."""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor
from typing_extensions import override

from lightning_incremental.buffers import PadValue
from lightning_incremental.core import ModelInterface, Step, StepChain, all_reduce_sum
from lightning_incremental.core.sharding import any_sharded, local
from lightning_incremental.methods.replay._base import Fill, PolicyChoice, ReplayMethod

LossFn = Callable[[LightningModule, Any], Tensor]


def project_conflicting(grads: list[Tensor], references: list[Tensor], sharded: bool = False) -> Tensor:
    """A-GEM's projection, in place: if ``g . r < 0`` then ``g <- g - (g . r / r . r) r``, over all tensors at once.

    With ``sharded``, the tensors are this rank's shards and the dot products are summed over the ranks (a
    collective). Returns whether it projected, as a device tensor (no host sync).

    >>> g, r = [torch.tensor([1.0, -2.0])], [torch.tensor([0.0, 1.0])]
    >>> project_conflicting(g, r), g
    (tensor(True), [tensor([1., 0.])])
    """
    dot = torch.stack([(g * r).sum() for g, r in zip(grads, references, strict=True)]).sum()
    norm = torch.stack([r.square().sum() for r in references]).sum()
    if sharded:
        dot, norm = all_reduce_sum([dot, norm])
    coefficient = dot.clamp(max=0) / norm.clamp_min(1e-12)
    torch._foreach_add_(grads, torch._foreach_mul(references, -coefficient))
    return dot < 0


class AGEM(ReplayMethod):
    r"""Never let an update increase the loss on the memory: project the gradient when it would.

    As in the paper, the memory holds earlier tasks only: by default (``fill="task_end"``) each task's rows
    are offered to the buffer (reservoir) when the task ends. Before every optimizer step the reference gradient
    ``g_ref`` of the user's own loss (their ``training_step`` run on the rows, logging muted; or ``loss_fn``) on
    ``replay_batch_size`` buffer rows is computed with ``torch.autograd.grad`` (the
    parameters' ``.grad`` is not touched) and averaged over DDP ranks; if the update's gradient ``g``
    points against it (``g . g_ref < 0``) it is replaced by ``g - (g . g_ref / g_ref . g_ref) g_ref``.
    The test is done on the device, without a host sync, as ``g -= min(g . g_ref, 0) / |g_ref|^2 * g_ref``.

    Args:
        buffer_size: rows the buffer holds (over all DDP ranks).
        replay_batch_size: buffer rows per reference gradient (per rank). The default 64 (twice the reference
            batch) is the best setting on the permuted digits stream; on the class-incremental one 128 gains a
            little at more cost (``benchmarks/RESULTS.md``, "Replay ratio against wall time"). Do not carry the
            optimizer's state beside A-GEM on a class-incremental stream: it loses most of its accuracy there.
        loss_fn: ``loss_fn(pl_module, batch) -> loss``; default: the loss of the user's ``training_step``.
        policy: the buffer's policy.
        fill: when rows enter the buffer: ``"task_end"`` (the paper), ``"stream"`` (task-free; the memory then
            also holds the current task, which weakens the constraint) or ``"first_epoch"``.
        seed: seed of the buffer's sampling.
        model_interface: how to read the targets of a batch (for the buffer's policy); default: the model's
            ``continual_interface``, else :class:`~lightning_incremental.ModelInterface`'s defaults.
        pad_values: the pad value of sequence entries whose length varies, by key (inferred by default:
            -100 for integer labels, the data's pad id for ``input_ids``, 0 otherwise).

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,), lr=1e-2)
        >>> agem = AGEM(buffer_size=50, replay_batch_size=16)
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=2, callbacks=[agem], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> len(agem.buffer), agem.projections > 0
        (50, True)
    """

    keeps_optimizer_state = False  # measured: RESULTS.md "The optimizer's state across tasks"

    def __init__(
        self,
        buffer_size: int = 200,
        replay_batch_size: int = 64,
        loss_fn: LossFn | None = None,
        policy: PolicyChoice = "reservoir",
        fill: Fill = "task_end",
        seed: int = 0,
        model_interface: ModelInterface | None = None,
        pad_values: Mapping[str, PadValue] | None = None,
    ) -> None:
        super().__init__(buffer_size, policy, fill, seed, model_interface, pad_values)
        if replay_batch_size < 1:
            raise ValueError(f"`replay_batch_size` must be a positive integer, got {replay_batch_size}.")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"`loss_fn` must be a callable `loss_fn(pl_module, batch) -> loss` or None, got {loss_fn!r}."
            )
        self.replay_batch_size = replay_batch_size
        self.loss_fn = loss_fn
        self.projections = 0  # steps whose gradient was projected (read on the host only at task end)
        self._projected = torch.zeros((), dtype=torch.long)
        self._template: Any = None

    @override
    def wrap_training_step(self, trainer: Trainer, pl_module: LightningModule, batch: Any, step: Step) -> STEP_OUTPUT:
        output = step(batch)
        self._template = batch
        if self.inserts_now(trainer):
            self.insert(batch)
        return output

    @override
    def add_gradient_terms(
        self, trainer: Trainer, pl_module: LightningModule, params: list[Tensor], grads: list[Tensor], scale: float
    ) -> None:
        if not len(self.buffer) or self._template is None:
            return
        replayed, _ = self.replay(self._template, self.replay_batch_size)
        with torch.enable_grad(), trainer.precision_plugin.forward_context():
            loss = self._reference_loss(pl_module, replayed)
        if loss is None:  # the user's training_step skipped these rows
            return
        if any_sharded(params):
            projected = project_conflicting(grads, _sharded_gradient(pl_module, params, loss), sharded=True)
            self._projected = self._projected.to(projected.device) + projected
            return
        references = torch.autograd.grad(loss, params, allow_unused=True)
        references = [
            torch.zeros_like(p) if r is None else r.to(g.dtype)
            for p, r, g in zip(params, references, grads, strict=True)
        ]
        if trainer.world_size > 1:  # the mean reference gradient over the ranks, as DDP averages gradients
            references = all_reduce_sum(references)
            torch._foreach_div_(references, trainer.world_size)
        projected = project_conflicting(grads, references)
        self._projected = self._projected.to(projected.device) + projected

    def _reference_loss(self, pl_module: LightningModule, batch: Any) -> Tensor | None:
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch)
        chain = StepChain.of(pl_module)
        assert chain is not None  # AGEM wraps the step, so the chain is attached during the fit
        return chain.user_loss(batch)

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_task_end(trainer, pl_module)
        self.projections += int(self._projected)
        self._projected = torch.zeros((), dtype=torch.long)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "projections": self.projections}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.projections = int(state_dict["projections"])


def _sharded_gradient(pl_module: LightningModule, params: list[Tensor], loss: Tensor) -> list[Tensor]:
    """This rank's shards of the gradient of ``loss``, averaged over the ranks: a backward through FSDP, which
    reduce-scatters it (the sharded parameters are not in the autograd graph, ``torch.autograd.grad`` cannot reach
    them). The parameters' own gradients are put back as they were."""
    every = list(pl_module.parameters())
    saved = [p.grad for p in every]
    for p in every:
        p.grad = None
    try:
        loss.backward()
        return [torch.zeros_like(local(p)) if p.grad is None else local(p.grad).clone() for p in params]
    finally:
        for p, grad in zip(every, saved, strict=True):
            p.grad = grad
