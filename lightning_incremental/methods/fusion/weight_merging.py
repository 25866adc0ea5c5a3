"""Model fusion at task boundaries: merge the weights after a task with those from before it."""

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from lightning_incremental.core import ContinualCallback
from lightning_incremental.core.selection import Pattern, as_patterns, matching
from lightning_incremental.methods.fusion.functional import (
    Statistics,
    TensorDict,
    drop_and_rescale,
    fisher_merge,
    fisher_update,
    magmax_merge,
    magmax_update,
    sum_merge,
    sum_update,
    task_vector,
    ties_merge,
    ties_update,
    trim_top_k,
)
from lightning_incremental.methods.regularization.ewc import EWC

Mode = Literal["interpolate", "average", "task_arithmetic", "ties", "dare", "magmax", "fisher"]
_MODES: tuple[str, ...] = ("interpolate", "average", "task_arithmetic", "ties", "dare", "magmax", "fisher")
_TASK_VECTOR_MODES: tuple[str, ...] = ("task_arithmetic", "ties", "dare", "magmax", "fisher")


class WeightMerging(ContinualCallback):
    r"""At the end of every task, replace the trained weights by a merge with the earlier ones.

    **Merging with the previous weights.**

    - ``mode="interpolate"``: at task start a copy of the weights ``theta_old`` is kept (fp32, on the
      model's device); at task end ``theta = (1 - alpha) * theta_old + alpha * theta_new``. ``alpha=0`` gives
      the old weights back and ``alpha=1`` keeps the new ones, both bit for bit.
    - ``mode="average"``: ``theta`` becomes the mean of the post-task weights of every task so far, kept as
      a running average ``avg_k = avg_{k-1} + (theta_k - avg_{k-1}) / k`` (fp32); ``alpha`` is not used.

    In these two modes the first task this callback trains has nothing to merge with: its weights stay as
    trained.

    **Merging task vectors** (``"task_arithmetic"``, ``"ties"``, ``"dare"``, ``"magmax"``, ``"fisher"``). The
    sequential setting, precisely:

    - the base weights ``theta_0`` are the weights at the start of the first task this callback trains;
    - every task starts from the current merged model and trains it to ``theta_t``;
    - its task vector is ``tau_t = theta_t - theta_0``;
    - at its end the model becomes ``theta_0 + scale * merge(tau_1, ..., tau_t)``, where ``merge`` is

      - ``"task_arithmetic"``: the sum ``sum_t tau_t`` (Ilharco et al., 2023);
      - ``"dare"``: the sum of the task vectors after DARE's drop-and-rescale (Yu et al., 2024): each entry
        is zeroed with probability ``drop_prob`` and the kept ones are divided by ``1 - drop_prob``, so each
        term equals ``tau_t`` in expectation; the draws come from a generator seeded with ``seed``, whose
        state is in the checkpoint;
      - ``"ties"`` (Yadav et al., 2023): trim each task vector to the ``top_k`` fraction of its entries of
        largest magnitude (over the whole model), elect each entry's sign as that of the sum of the trimmed
        vectors, and take the mean of the trimmed values that agree with it (the disjoint mean);
      - ``"magmax"`` (Marczak et al., 2024): per entry, the value of the task vector of largest magnitude;
      - ``"fisher"`` (Matena & Raffel, 2022): the Fisher-weighted mean ``sum_t F_t tau_t / sum_t F_t``, so
        with ``scale=1`` the model is ``sum_t F_t theta_t / sum_t F_t``. ``F_t`` is the diagonal Fisher that
        an :class:`~lightning_incremental.methods.regularization.EWC` callback in the same Trainer computes
        at the end of task ``t`` on the trained weights ``theta_t``, floored at ``fisher_floor`` as Matena &
        Raffel do. EWC must come *before* this callback in ``callbacks=[...]`` (both act at the task end, in
        list order) and consolidate only at task ends; ``EWC(lambda_=0.0)`` gives the Fisher without adding
        a penalty. Parameters EWC does not cover in a task (frozen ones) get Fisher 0 for it, so only the
        floor weights them; buffers get weight 1 in every task, i.e. the mean of their task vectors.

    This definition applies from the first task on: with ``"ties"`` or ``"dare"`` even the first task's
    weights are trimmed or dropped. The pure math is in :mod:`lightning_incremental.methods.fusion.functional`.

    Because every task starts from the merged model, ``tau_t`` contains what the earlier tasks contributed.
    The averaging merges (``ties``, ``magmax``, ``fisher``) with ``scale <= 1`` keep the merged model within
    the range of the task vectors, but a sum does not: with ``"task_arithmetic"`` and ``"dare"`` a task that
    changes nothing gives ``tau_t = scale * sum_{s<t} tau_s``, so the distance to ``theta_0`` grows like
    ``(1 + scale)^t`` over a long stream. Use a small ``scale`` (about ``1 / number of tasks``) with them.

    **Memory** does not depend on the number of tasks in any mode. In copies of the model's floating-point
    tensors (in fp32) held between tasks: ``interpolate`` none (one during a task), ``average`` one,
    ``task_arithmetic``, ``dare`` and ``magmax`` two (``theta_0`` and the running sum or largest-magnitude
    tensor), ``ties`` five (``theta_0``, the sums of the positive and of the negative trimmed entries and
    their counts), ``fisher`` three (``theta_0``, ``sum F tau``, ``sum F``) plus one during a task
    (EWC's importance at the task start, whose growth gives the task's Fisher), beside EWC's own two. A merge
    needs up to three more copies while it runs. The cost of a merge on a real model is measured by
    ``benchmarks/merge_cost.py`` (numbers in ``benchmarks/RESULTS.md``).

    Buffers are merged like the weights: floating-point buffers such as BatchNorm's ``running_mean`` and
    ``running_var`` get the same merge, integer buffers such as ``num_batches_tracked`` keep the new value.
    The merge runs in ``on_train_end``, so callbacks after this one in the list (e.g.
    :class:`~lightning_incremental.ContinualEvaluation`) see the merged model. A tensor that is new since the
    first task (the head :class:`~lightning_incremental.GrowHeads` adds for a new task) has no earlier version
    to merge with: it keeps its trained value and joins ``theta_0`` for the later tasks. A tensor whose shape
    changed (a classifier grown in place, :class:`~lightning_incremental.IncrementalClassifier`) is refused.

    **State.** Everything a merge needs (the copy of the weights, the running statistics, the DARE
    generator's state) is in ``state_dict`` as CPU tensors (weights and statistics in fp32), so a fit resumed
    mid-task merges exactly as the uninterrupted one. Under DDP every rank holds the same weights (and EWC the
    same Fisher), so every rank computes the same merge.

    For an average of the weights *during* a task (EMA, SWA), use Lightning's own
    ``lightning.pytorch.callbacks.EMAWeightAveraging`` or its base ``WeightAveraging`` (or
    ``StochasticWeightAveraging``) next to this callback rather than this one.

    Args:
        alpha: the weight of the new task's weights in ``"interpolate"`` mode, in ``[0, 1]``.
        mode: ``"interpolate"``, ``"average"``, ``"task_arithmetic"``, ``"ties"``, ``"dare"``, ``"magmax"``
            or ``"fisher"``.
        scale: the scale ``lambda`` of the merged task vector (> 0), in the task-vector modes.
        top_k: the fraction of each task vector's entries that TIES keeps, in ``(0, 1]``.
        drop_prob: the probability with which DARE drops an entry, in ``[0, 1)``.
        seed: the seed of DARE's random generator (an integer >= 0).
        fisher_floor: the smallest Fisher value Fisher merging uses (> 0).
        exclude: names of tensors not to merge (glob strings like ``"head.*"`` or ``re.compile`` patterns):
            they keep the value the task trained them to and take no memory here. Exclude a class-incremental
            head: its rows for a new task's classes are trained only in that task, and a merge that scales or
            averages them (every mode but ``interpolate`` with ``alpha=1``) weakens exactly those classes.

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

    Fisher merging beside EWC, which must come first in the list:

        >>> from lightning_incremental.methods.regularization import EWC
        >>> merge = WeightMerging(mode="fisher")
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[EWC(lambda_=0.0), merge], logger=False,
        ...                         enable_progress_bar=False, enable_checkpointing=False,
        ...                         enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> sorted(merge.statistics), sorted(merge.statistics["fisher_sum"])[:2]
        (['fisher_sum', 'weighted_sum'], ['net.0.bias', 'net.0.weight'])
    """

    def __init__(
        self,
        alpha: float = 0.5,
        mode: Mode = "interpolate",
        scale: float = 1.0,
        top_k: float = 0.2,
        drop_prob: float = 0.5,
        seed: int = 0,
        fisher_floor: float = 1e-6,
        exclude: Pattern | Sequence[Pattern] | None = None,
    ) -> None:
        super().__init__()
        self.exclude = as_patterns("exclude", exclude)
        if not _is_number(alpha) or not 0 <= alpha <= 1:
            raise ValueError(f"`alpha` must be in [0, 1] (0 keeps the old weights, 1 the new ones), got {alpha!r}.")
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {', '.join(repr(m) for m in _MODES)}, got {mode!r}.")
        if not _is_number(scale) or not scale > 0:
            raise ValueError(
                f"`scale` must be a finite number > 0 (1 adds the merged task vector as is), got {scale!r}."
            )
        if not _is_number(top_k) or not 0 < top_k <= 1:
            raise ValueError(f"`top_k` must be in (0, 1] (the fraction of each task vector TIES keeps), got {top_k!r}.")
        if not _is_number(drop_prob) or not 0 <= drop_prob < 1:
            raise ValueError(f"`drop_prob` must be in [0, 1) (the probability DARE drops an entry), got {drop_prob!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be an integer >= 0, got {seed!r}.")
        if not _is_number(fisher_floor) or not fisher_floor > 0:
            raise ValueError(
                f"`fisher_floor` must be a finite number > 0 (it keeps every entry's total weight positive), got "
                f"{fisher_floor!r}; 1e-6 is Matena & Raffel's."
            )
        self.alpha, self.mode, self.scale = float(alpha), mode, float(scale)
        self.top_k, self.drop_prob = float(top_k), float(drop_prob)
        self.seed, self.fisher_floor = seed, float(fisher_floor)
        self.start_weights: dict[str, Tensor] = {}  # interpolate: the weights at the start of the current task
        self.average: dict[str, Tensor] = {}  # average: the running mean of the post-task weights
        self.averaged_tasks = 0
        self.base: dict[str, Tensor] = {}  # task-vector modes: theta_0
        self.statistics: Statistics = {}  # task-vector modes: the running statistics of the merge
        self.fisher_at_task_start: dict[str, Tensor] = {}  # fisher: EWC's importance when the task started
        self.generator = torch.Generator().manual_seed(seed)  # dare: the drop masks, on the CPU

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.mode == "fisher":
            self._ewc(trainer)  # refuse a Trainer without a usable EWC before the first step
        if stage == "fit":
            self._merged_tensors(pl_module)  # refuse an `exclude` pattern that matches nothing

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for weights in (
            self.start_weights,
            self.average,
            self.base,
            self.fisher_at_task_start,
            *self.statistics.values(),
        ):
            for name, tensor in weights.items():  # restored from a checkpoint on the CPU
                weights[name] = tensor.to(pl_module.device)
        super().on_fit_start(trainer, pl_module)

    def on_task_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "interpolate" and self.tasks_completed > 0:
            self.start_weights = _snapshot_of(self._merged_tensors(pl_module))
        if self.mode in _TASK_VECTOR_MODES and not self.base:
            self.base = _snapshot_of(self._merged_tensors(pl_module))
        if self.mode == "fisher":
            importance = self._ewc(trainer).importance
            self.fisher_at_task_start = {name: tensor.detach().clone() for name, tensor in importance.items()}

    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "interpolate":
            if self.start_weights:
                _merge_into(self._merged_tensors(pl_module), self.start_weights, self.alpha)
                self.start_weights = {}
        elif self.mode == "average":
            self.averaged_tasks += 1
            if self.averaged_tasks == 1:
                self.average = _snapshot_of(self._merged_tensors(pl_module))
            else:
                self.average = _merge_into(self._merged_tensors(pl_module), self.average, 1.0 / self.averaged_tasks)
        else:
            self._merge_task_vector(trainer, pl_module)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "start_weights": _to_cpu(self.start_weights),
            "average": _to_cpu(self.average),
            "averaged_tasks": self.averaged_tasks,
            "base": _to_cpu(self.base),
            "statistics": {key: _to_cpu(statistic) for key, statistic in self.statistics.items()},
            "fisher_at_task_start": _to_cpu(self.fisher_at_task_start),
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.start_weights = dict(state_dict["start_weights"])
        self.average = dict(state_dict["average"])
        self.averaged_tasks = int(state_dict["averaged_tasks"])
        self.base = dict(state_dict["base"])
        self.statistics = {key: dict(statistic) for key, statistic in state_dict["statistics"].items()}
        self.fisher_at_task_start = dict(state_dict["fisher_at_task_start"])
        self.generator.set_state(state_dict["generator_state"])

    # ------------------------------------------------------------------ helpers
    def _merged_tensors(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """The floating-point tensors this callback merges: all of them but those ``exclude`` names."""
        tensors = _floating_tensors(pl_module)
        excluded = matching("exclude", self.exclude, tensors, type(pl_module).__name__, noun="tensor")
        return {name: tensor for name, tensor in tensors.items() if name not in excluded}

    @torch.no_grad()
    def _merge_task_vector(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fold this task's vector into the statistics and set the model to ``theta_0 + scale * merge``."""
        trained = self._merged_tensors(pl_module)
        added = {name: tensor for name, tensor in trained.items() if name not in self.base}  # a grown head
        current = {name: tensor for name, tensor in trained.items() if name in self.base}
        _check_same_tensors(current, self.base, "since the first task")
        tau = task_vector(current, self.base)
        if self.mode == "task_arithmetic":
            merged = sum_merge(sum_update(self.statistics, tau))
        elif self.mode == "dare":
            merged = sum_merge(sum_update(self.statistics, drop_and_rescale(tau, self.drop_prob, self.generator)))
        elif self.mode == "ties":
            merged = ties_merge(ties_update(self.statistics, trim_top_k(tau, self.top_k)))
        elif self.mode == "magmax":
            merged = magmax_merge(magmax_update(self.statistics, tau))
        else:
            fisher = self._task_fisher(trainer, pl_module, tau)
            merged = fisher_merge(fisher_update(self.statistics, tau, fisher, self.fisher_floor))
            self.fisher_at_task_start = {}
        del tau
        for name, tensor in current.items():  # the merge functions return new tensors: reuse them
            tensor.copy_(torch.add(self.base[name], merged[name], alpha=self.scale, out=merged[name]))
        self.base.update(_snapshot_of(added))

    def _task_fisher(self, trainer: Trainer, pl_module: LightningModule, tau: TensorDict) -> dict[str, Tensor]:
        """This task's diagonal Fisher per tensor: what EWC's importance gained since the task started.

        EWC folds each task's Fisher ``F_t`` into its importance, ``sum_t F_t`` (``"separate"``) or
        ``decay * old + F_t`` (``"online"``), so ``F_t`` is the new importance minus (decay times) the one
        recorded at the task start; a rounding below zero is clipped. Parameters EWC did not cover in this
        task (they did not require grad) get 0 and buffers 1.
        """
        ewc = self._ewc(trainer)
        decay = ewc.decay if ewc.mode == "online" else 1.0
        covered = {name for name, p in pl_module.named_parameters() if p.requires_grad and name in ewc.importance}
        parameters = dict(pl_module.named_parameters())
        fisher = {}
        for name, vector in tau.items():
            if name not in parameters:
                fisher[name] = torch.ones_like(vector)
            elif name not in covered:
                fisher[name] = torch.zeros_like(vector)
            else:
                before = self.fisher_at_task_start.get(name)
                importance = ewc.importance[name].float()
                gained = importance.clone() if before is None else torch.sub(importance, before, alpha=decay)
                fisher[name] = gained.clamp_(min=0)
        return fisher

    def _ewc(self, trainer: Trainer) -> EWC:
        """The one EWC callback before this one in the Trainer, whose Fisher ``mode="fisher"`` merges with."""
        found = [callback for callback in trainer.callbacks if isinstance(callback, EWC)]
        fix = (
            "callbacks=[EWC(...), WeightMerging(mode='fisher'), ...] (EWC(lambda_=0.0) computes the Fisher without "
            "a penalty)"
        )
        if not found:
            raise RuntimeError(
                "WeightMerging(mode='fisher') weights every task vector by the diagonal Fisher information that "
                f"EWC computes at each task end, and this Trainer has no EWC callback. Add one before it: {fix}."
            )
        if len(found) > 1:
            raise RuntimeError(
                f"WeightMerging(mode='fisher') found {len(found)} EWC callbacks in this Trainer and cannot tell whose "
                f"Fisher to merge with; keep one: {fix}."
            )
        ewc = found[0]
        if trainer.callbacks.index(ewc) > trainer.callbacks.index(self):
            raise RuntimeError(
                "WeightMerging(mode='fisher') comes before EWC in the Trainer's callbacks, but both act at the task "
                "end in list order and the merge needs the Fisher EWC computes there, on the trained weights. Put "
                f"EWC first: {fix}."
            )
        if ewc.consolidate_every_n_steps is not None:
            raise RuntimeError(
                "WeightMerging(mode='fisher') needs one Fisher per task, but EWC(consolidate_every_n_steps="
                f"{ewc.consolidate_every_n_steps}) also consolidates during the task. Use EWC(consolidate_every_n_steps"
                "=None) beside it."
            )
        return ewc


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _floating_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The floating-point parameters and buffers of ``module`` by name (shared tensors once)."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {name: tensor for name, tensor in named.items() if tensor.is_floating_point()}


def _snapshot_of(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().to(torch.float32, copy=True) for name, t in tensors.items()}


def _to_cpu(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in weights.items()}


def _check_same_tensors(current: dict[str, Tensor], reference: dict[str, Tensor], since: str) -> None:
    """Refuse to merge when the model's floating-point tensors are not those of ``reference`` (names, shapes)."""
    changed = sorted(
        name
        for name in current.keys() | reference.keys()
        if name not in current or name not in reference or current[name].shape != reference[name].shape
    )
    if changed:
        raise RuntimeError(
            f"WeightMerging: the model's tensors changed {since} ({', '.join(changed[:8])}); merging needs the "
            "same names and shapes before and after a task."
        )


@torch.no_grad()
def _merge_into(current: dict[str, Tensor], reference: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    """``t = lerp(reference, t, weight)`` for every tensor ``t`` of ``current``; returns the fp32 merge."""
    _check_same_tensors(current, reference, "during the task")
    merged = {name: torch.lerp(reference[name], tensor.float(), weight) for name, tensor in current.items()}
    for name, tensor in current.items():
        tensor.copy_(merged[name])
    return merged
