"""Model fusion at task boundaries: merge the weights after a task with those from before it."""

import math
from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from lightning_incremental.core import ContinualCallback
from lightning_incremental.core.selection import Pattern, as_patterns, matching
from lightning_incremental.core.sharding import is_sharded, local
from lightning_incremental.methods.fusion.functional import Statistics, TensorDict
from lightning_incremental.methods.fusion.strategies import STRATEGIES, MergeSettings, MergeStrategy

Mode = Literal["interpolate", "average", "task_arithmetic", "ties", "dare", "magmax", "fisher"]


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
        with ``scale=1`` the model is ``sum_t F_t theta_t / sum_t F_t``. ``F_t`` is the diagonal Fisher of
        task ``t`` alone, on the trained weights ``theta_t``, that the Trainer's one Fisher source gives at
        the task end (a callback implementing :class:`~lightning_incremental.core.FisherSource`, such as
        :class:`~lightning_incremental.methods.regularization.EWC`), floored at ``fisher_floor`` as Matena &
        Raffel do. The source must come *before* this callback in ``callbacks=[...]`` (both act at the task
        end, in list order); ``EWC(lambda_=0.0)`` gives the Fisher without adding a penalty, and EWC must
        consolidate only at task ends. Parameters the source does not cover in a task (frozen ones) get
        Fisher 0 for it, so only the floor weights them; buffers get weight 1 in every task, i.e. the mean of
        their task vectors.

    This definition applies from the first task on: with ``"ties"`` or ``"dare"`` even the first task's
    weights are trimmed or dropped. Each mode is a strategy of
    :mod:`lightning_incremental.methods.fusion.strategies` (the attribute ``strategy``); the pure math is in
    :mod:`lightning_incremental.methods.fusion.functional`.

    Because every task starts from the merged model, ``tau_t`` contains what the earlier tasks contributed.
    The averaging merges (``ties``, ``magmax``, ``fisher``) with ``scale <= 1`` keep the merged model within
    the range of the task vectors, but a sum does not: with ``"task_arithmetic"`` and ``"dare"`` a task that
    changes nothing gives ``tau_t = scale * sum_{s<t} tau_s``, so the distance to ``theta_0`` grows like
    ``(1 + scale)^t`` over a long stream. Use a small ``scale`` (about ``1 / number of tasks``) with them.

    **Memory** does not depend on the number of tasks in any mode. In copies of the model's floating-point
    tensors (in fp32) held between tasks: ``interpolate`` none (one during a task), ``average`` one,
    ``task_arithmetic``, ``dare`` and ``magmax`` two (``theta_0`` and the running sum or largest-magnitude
    tensor), ``ties`` five (``theta_0``, the sums of the positive and of the negative trimmed entries and
    their counts), ``fisher`` three (``theta_0``, ``sum F tau``, ``sum F``), beside what the Fisher source
    keeps. A merge needs up to three more copies while it runs. The cost of a merge on a real model is measured by
    ``benchmarks/timing/merge_cost.py`` (numbers in ``benchmarks/RESULTS.md``).

    Buffers are merged like the weights: floating-point buffers such as BatchNorm's ``running_mean`` and
    ``running_var`` get the same merge, integer buffers such as ``num_batches_tracked`` keep the new value.
    The merge runs in ``on_train_end``, so callbacks after this one in the list (e.g.
    :class:`~lightning_incremental.ContinualEvaluation`) see the merged model. A tensor that is new since the
    first task (the head :class:`~lightning_incremental.GrowHeads` adds for a new task) has no earlier version
    to merge with: it keeps its trained value and joins ``theta_0`` for the later tasks. A tensor whose shape
    changed (a classifier grown in place, :class:`~lightning_incremental.IncrementalClassifier`) is refused.

    **State.** ``state_dict`` holds the mode and the active mode's state alone, as CPU tensors (weights
    and statistics in fp32): ``start_weights`` (interpolate), ``average`` and ``averaged_tasks`` (average),
    ``base`` and ``statistics`` (the task-vector modes; :attr:`base` and :attr:`statistics` read them) and
    DARE's ``generator_state``. So a fit resumed mid-task merges exactly as the uninterrupted one. Under DDP
    every rank holds the same weights (and the Fisher source the same Fisher), so every rank computes the same
    merge.

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
        >>> import torch
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

    Fisher merging beside EWC, the Fisher source, which must come first in the list:

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

    reads_trained_weights = True

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
        if mode not in STRATEGIES:
            raise ValueError(f"`mode` must be one of {', '.join(repr(m) for m in STRATEGIES)}, got {mode!r}.")
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
        settings = MergeSettings(self.alpha, self.scale, self.top_k, self.drop_prob, self.seed, self.fisher_floor)
        self.strategy: MergeStrategy = STRATEGIES[mode](settings)
        self.keeps_optimizer_state = self.strategy.keeps_optimizer_state

    # ------------------------------------------------------------------ the active mode's state
    @property
    def statistics(self) -> Statistics:
        """The running statistics of a task-vector mode's merge (named tensor dicts)."""
        return self._strategy_state("statistics")

    @property
    def base(self) -> TensorDict:
        """The base weights ``theta_0`` of a task-vector mode."""
        return self._strategy_state("base")

    @property
    def averaged_tasks(self) -> int:
        """How many tasks' weights ``mode="average"`` has averaged."""
        return self._strategy_state("averaged_tasks")

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.strategy.setup(trainer, self)  # e.g. refuse a Trainer without a Fisher source before the first step
            self._merged_tensors(pl_module)  # refuse an `exclude` pattern that matches nothing

    @override
    def place_state(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.sharded = {name: t for name, t in _floating_tensors(pl_module).items() if is_sharded(t)}
        self.strategy.to(pl_module.device)

    @override
    def on_task_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.start(self._merged_tensors(pl_module), first_task=self.tasks_completed == 0)

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.merge(self._merged_tensors(pl_module), trainer, pl_module)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mode": self.mode, **self.strategy.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            raise RuntimeError(
                f"This checkpoint holds the state of WeightMerging(mode={state_dict['mode']!r}), which cannot resume "
                f"as WeightMerging(mode={self.mode!r}). Build the callback with mode={state_dict['mode']!r}."
            )
        super().load_state_dict(state_dict)
        self.strategy.load_state_dict(state_dict)

    # ------------------------------------------------------------------ helpers
    def _merged_tensors(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """The floating-point tensors this callback merges: all of them but those ``exclude`` names; this rank's
        shards of sharded ones (a merge is element-wise, and the strategy's state is kept as shards)."""
        tensors = _floating_tensors(pl_module)
        excluded = matching("exclude", self.exclude, tensors, type(pl_module).__name__, noun="tensor")
        return {name: local(tensor) for name, tensor in tensors.items() if name not in excluded}

    def _strategy_state(self, field: str) -> Any:
        if field not in self.strategy.state_fields:
            raise AttributeError(f"WeightMerging(mode={self.mode!r}) keeps no `{field}`.")
        return getattr(self.strategy, field)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _floating_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The floating-point parameters and buffers of ``module`` by name (shared tensors once)."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {name: tensor for name, tensor in named.items() if tensor.is_floating_point()}
