"""The quadratic penalty shared by EWC, online EWC, SI, MAS and L2Anchor.

Every one of them penalises ``lambda / 2 * sum_i Omega_i (theta_i - theta*_i)^2`` and differs only in how it
builds the importance ``Omega`` and the anchor ``theta*`` at a consolidation. The penalty enters training
as its closed-form gradient ``lambda * Omega * (theta - theta*)``, added to ``p.grad`` before the
optimizer step (``docs/architecture.md``): no autograd graph, and with ``c = -lambda * Omega * theta*`` precomputed
at consolidation it is two fused passes per step, ``grad += lambda*Omega * theta`` and ``grad += c``.
"""

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_incremental.core import ContinualCallback, all_reduce_sum, grow_to, should_update_logs
from lightning_incremental.core.sharding import full_state, is_sharded, local, shard_state


def validate_lambda(lambda_: float) -> float:
    if not isinstance(lambda_, (int, float)) or not math.isfinite(lambda_) or lambda_ < 0:
        raise ValueError(f"`lambda_` must be a finite number >= 0, got {lambda_!r}; 0 turns the penalty off.")
    return float(lambda_)


def validate_state_dtype(state_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating-point dtype, given as one or by its name (``"bfloat16"``, as a YAML config spells it), or ``None``.

    >>> validate_state_dtype("bfloat16")
    torch.bfloat16
    """
    dtype = getattr(torch, state_dtype, None) if isinstance(state_dtype, str) else state_dtype
    if state_dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"`state_dtype` must be a floating-point torch.dtype or its name (torch.bfloat16, 'bfloat16') or None, "
            f"got {state_dtype!r}."
        )
    return dtype


class QuadraticPenalty(ContinualCallback):
    """Base class: holds ``importance`` and ``anchor`` per parameter name and adds the penalty's gradient.

    Subclasses implement :meth:`consolidate`, which updates ``self.importance`` and ``self.anchor`` (fp32,
    on the parameters' device) from the model as it is now. The base calls it at every task end, and every
    ``consolidate_every_n_steps`` optimizer steps when that is set (task-free use).

    Args:
        lambda_: the penalty strength.
        consolidate_every_n_steps: also consolidate every N optimizer steps (task-free, online use).
        state_dtype: the dtype of the importance, the anchor and the cached penalty terms (e.g. ``torch.bfloat16``:
            half their bytes; ``benchmarks/RESULTS.md``, "Sharded models", measures the accuracy); ``None`` keeps
            the importance and the anchor in fp32 and the terms in the parameters' dtype.
    """

    reads_trained_weights = True
    keeps_optimizer_state = True  # measured: RESULTS.md "The optimizer's state across tasks"
    # the attributes holding one tensor per parameter name: local shards of a sharded model, full in a checkpoint
    per_parameter_state: tuple[str, ...] = ("importance", "anchor")

    def __init__(
        self, lambda_: float, consolidate_every_n_steps: int | None = None, state_dtype: torch.dtype | str | None = None
    ) -> None:
        super().__init__()
        self.lambda_ = validate_lambda(lambda_)
        self.state_dtype = validate_state_dtype(state_dtype)
        if consolidate_every_n_steps is not None and consolidate_every_n_steps < 1:
            raise ValueError(
                f"`consolidate_every_n_steps` must be a positive integer or None, got {consolidate_every_n_steps}."
            )
        self.consolidate_every_n_steps = consolidate_every_n_steps
        self.importance: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self._terms: dict[int, tuple[Tensor, Tensor]] = {}  # id(param) -> (lambda * Omega, -lambda * Omega * theta*)
        self._steps = 0  # optimizer steps counted for `consolidate_every_n_steps`
        self._last_global_step = 0
        self._sharded: dict[str, Tensor] = {}  # the sharded parameters by name: the layout of their state
        self._state_is_full = False  # loaded from a checkpoint: full tensors, this rank's shards at the next fit

    # ------------------------------------------------------------------ what a method implements
    def consolidate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Update ``self.importance`` and ``self.anchor`` from the current model."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks
    @override
    def place_state(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_global_step = trainer.global_step
        self._build_terms(pl_module)

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._consolidate(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.consolidate_every_n_steps is None or trainer.global_step == self._last_global_step:
            return
        self._last_global_step = trainer.global_step
        self._steps += 1
        if self._steps % self.consolidate_every_n_steps == 0:
            self._consolidate(trainer, pl_module)

    @override
    def add_gradient_terms(
        self, trainer: Trainer, pl_module: LightningModule, params: list[Tensor], grads: list[Tensor], scale: float
    ) -> None:
        if not self._terms or self.lambda_ == 0:
            return
        selected = [(p, g, self._terms[id(p)]) for p, g in zip(params, grads, strict=True) if id(p) in self._terms]
        if not selected:
            return
        params_in, grads_in, terms = zip(*selected, strict=True)
        thetas = [local(p) for p in params_in]
        weights, offsets = [t[0] for t in terms], [t[1] for t in terms]
        torch._foreach_addcmul_(grads_in, thetas, weights, value=scale)
        torch._foreach_add_(grads_in, offsets, alpha=scale)
        if should_update_logs(trainer):
            self._log_penalty(pl_module, thetas, weights, offsets)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """The state with full tensors, gathered from the ranks' shards of a sharded model (a collective there)."""
        per_parameter = {
            attribute: full_state(getattr(self, attribute), self._sharded) for attribute in self.per_parameter_state
        }
        return {**super().state_dict(), **per_parameter, "steps": self._steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for attribute in self.per_parameter_state:
            setattr(self, attribute, dict(state_dict[attribute]))
        self._steps = int(state_dict["steps"])
        self._terms = {}
        self._state_is_full = True

    # ------------------------------------------------------------------ helpers
    def _consolidate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.consolidate(trainer, pl_module)
        if self.state_dtype is not None:
            self.importance = {name: t.to(self.state_dtype) for name, t in self.importance.items()}
            self.anchor = {name: t.to(self.state_dtype) for name, t in self.anchor.items()}
        self._build_terms(pl_module)

    def _build_terms(self, pl_module: LightningModule) -> None:
        """Cache ``lambda * Omega`` and ``-lambda * Omega * theta*`` per live parameter, padded to grown shapes.

        Parameters that did not exist at the last consolidation get no term (zero importance). A loaded state's
        full tensors become this rank's shards of a sharded model first; terms are keyed by the parameter and hold
        its shard's shape.
        """
        params = dict(pl_module.named_parameters())
        self._sharded = {name: p for name, p in params.items() if is_sharded(p)}
        if self._state_is_full:
            for attribute in self.per_parameter_state:
                setattr(self, attribute, shard_state(getattr(self, attribute), params))
            self._state_is_full = False
        self._terms = {}
        for name, sharded_param in params.items():
            if name not in self.importance:
                continue
            param = local(sharded_param)  # the term's shape, device and dtype: this rank's shard
            importance, anchor = self.importance[name], self.anchor[name]
            if importance.shape != param.shape:
                try:
                    importance, anchor = grow_to(importance, param.shape), grow_to(anchor, param.shape)
                except ValueError:
                    rank_zero_warn(
                        f"{type(self).__name__}: `{name}` shrank from {tuple(importance.shape)} to "
                        f"{tuple(param.shape)} since the last consolidation; it is no longer penalised."
                    )
                    continue
                self.importance[name], self.anchor[name] = importance, anchor
            if self.lambda_ == 0:  # no penalty (EWC(lambda_=0) estimating the Fisher for a merge): no terms to hold
                continue
            weight = (self.lambda_ * importance).to(device=param.device, dtype=self.state_dtype or param.dtype)
            self._terms[id(sharded_param)] = (weight, -(weight * anchor.to(weight)))

    def _log_penalty(
        self, pl_module: LightningModule, thetas: tuple[Tensor, ...], weights: list[Tensor], offsets: list[Tensor]
    ) -> None:
        # lambda/2 * Omega (theta - theta*)^2 = 1/2 * theta * (w * theta + 2c) + const with w = lambda*Omega,
        # c = -w*theta*; computed exactly as 1/2 * (w*theta + c) * (theta - theta*) = 1/2 * (w*theta + c)^2 / w.
        with torch.no_grad():
            residuals = torch._foreach_addcmul(offsets, thetas, weights)  # w * (theta - theta*)
            penalty = sum(
                (r.square() / w.clamp_min(1e-30)).masked_fill(w == 0, 0).sum()
                for r, w in zip(residuals, weights, strict=True)
            )
        pl_module.log(f"cl/{self.state_key.lower()}_penalty", 0.5 * penalty, on_step=True, on_epoch=False)


def named_trainable_parameters(pl_module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a consolidation covers: those that require grad."""
    return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """An fp32 copy of the parameters' current values (this rank's shards of sharded ones)."""
    return {name: local(p).detach().float().clone() for name, p in params.items()}


def all_reduce_sums(sums: dict[str, Tensor], count: int) -> tuple[dict[str, Tensor], int]:
    """Sum per-rank importance sums and sample counts over the ranks, in one collective."""
    if not sums:
        return sums, count
    names = list(sums)
    *reduced, total = all_reduce_sum([*sums.values(), torch.tensor([float(count)], device=sums[names[0]].device)])
    return dict(zip(names, reduced, strict=True)), int(total.item())
