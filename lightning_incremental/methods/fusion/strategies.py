"""One merge strategy per :class:`~lightning_incremental.methods.fusion.WeightMerging` mode.

A strategy keeps the state its mode needs between tasks, and only that (:attr:`MergeStrategy.state_fields`);
:meth:`MergeStrategy.start` runs at every task start and :meth:`MergeStrategy.merge` at every task end, on the
tensors ``WeightMerging`` selected (its ``exclude=`` applied). :data:`STRATEGIES` maps every mode's name to its
class. The math of the task-vector merges is in :mod:`lightning_incremental.methods.fusion.functional`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_incremental.core import FisherSource
from lightning_incremental.core.sharding import gather_full, shard_of
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


@dataclass(frozen=True)
class MergeSettings:
    """The arguments of :class:`~lightning_incremental.methods.fusion.WeightMerging` (validated there); each
    strategy reads those of its mode."""

    alpha: float = 0.5
    scale: float = 1.0
    top_k: float = 0.2
    drop_prob: float = 0.5
    seed: int = 0
    fisher_floor: float = 1e-6


class MergeStrategy:
    """How one mode merges: what it keeps between tasks, what it does at a task's start and end.

    A subclass names the attributes it keeps in :attr:`state_fields`: tensors, dicts of them (nested too) and
    numbers. The base class puts their tensors on a device (:meth:`to`) and saves them as CPU copies
    (:meth:`state_dict`); a subclass overrides those only for state that is not of this kind.
    """

    mode: ClassVar[str]
    state_fields: ClassVar[tuple[str, ...]] = ()
    # whether the optimizer's state carried across tasks helps this mode (``None``: not measured); measured:
    # RESULTS.md "The optimizer's state across tasks"
    keeps_optimizer_state: ClassVar[bool | None] = None

    def __init__(self, settings: MergeSettings) -> None:
        self.settings = settings
        # the model's sharded tensors by name (set at every fit start): the state of those is this rank's shards,
        # gathered into full tensors for a checkpoint
        self.sharded: dict[str, Tensor] = {}

    def setup(self, trainer: Trainer, owner: Callback) -> None:
        """Refuse, before the first step, a Trainer this mode cannot merge in (``owner`` is the callback)."""

    def start(self, tensors: dict[str, Tensor], first_task: bool) -> None:
        """Called at a task's start with the model's tensors to merge; ``first_task``: the callback has finished
        no task yet."""

    def merge(self, tensors: dict[str, Tensor], trainer: Trainer, pl_module: LightningModule) -> None:
        """Called at a task's end: replace the trained ``tensors`` (in place) by the merge."""
        raise NotImplementedError

    def to(self, device: torch.device) -> None:
        """Put the state's tensors on ``device`` (a checkpoint restores them on the CPU); a full tensor of a sharded
        one (from a checkpoint) becomes this rank's shard."""

        def place(name: str | None, tensor: Tensor) -> Tensor:
            like = self.sharded.get(name) if name is not None else None
            if like is not None and tensor.shape == like.shape:
                return shard_of(tensor, like)
            return tensor.to(device)

        for field in self.state_fields:
            setattr(self, field, _map_tensors(getattr(self, field), place))

    def state_dict(self) -> dict[str, Any]:
        """The state of this mode alone, its tensors as CPU copies, full (gathered from the ranks' shards of sharded
        tensors: a collective under sharding)."""

        def full(name: str | None, tensor: Tensor) -> Tensor:
            like = self.sharded.get(name) if name is not None else None
            return (tensor if like is None else gather_full(tensor, like)).detach().to("cpu", copy=True)

        return {field: _map_tensors(getattr(self, field), full) for field in self.state_fields}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for field in self.state_fields:
            setattr(self, field, _map_tensors(state_dict[field], lambda name, tensor: tensor))


class Interpolate(MergeStrategy):
    """``theta = lerp(theta_old, theta_new, alpha)``, ``theta_old`` the weights at the task start."""

    keeps_optimizer_state = False

    mode = "interpolate"
    state_fields = ("start_weights",)

    def __init__(self, settings: MergeSettings) -> None:
        super().__init__(settings)
        self.start_weights: TensorDict = {}  # the weights at the start of the current task

    @override
    def start(self, tensors: dict[str, Tensor], first_task: bool) -> None:
        if not first_task:
            self.start_weights = _snapshot_of(tensors)

    @override
    def merge(self, tensors: dict[str, Tensor], trainer: Trainer, pl_module: LightningModule) -> None:
        if self.start_weights:
            _merge_into(tensors, self.start_weights, self.settings.alpha)
            self.start_weights = {}


class Average(MergeStrategy):
    """The running mean of the post-task weights of every task so far."""

    mode = "average"
    state_fields = ("average", "averaged_tasks")

    def __init__(self, settings: MergeSettings) -> None:
        super().__init__(settings)
        self.average: TensorDict = {}
        self.averaged_tasks = 0

    @override
    def merge(self, tensors: dict[str, Tensor], trainer: Trainer, pl_module: LightningModule) -> None:
        self.averaged_tasks += 1
        if self.averaged_tasks == 1:
            self.average = _snapshot_of(tensors)
        else:
            self.average = _merge_into(tensors, self.average, 1.0 / self.averaged_tasks)


class TaskVectorMerge(MergeStrategy):
    """The task-vector modes: ``theta = theta_0 + scale * m``, ``m`` the merge of ``tau_t = theta_t - theta_0``.

    A subclass names its pair of :mod:`~lightning_incremental.methods.fusion.functional` functions in
    :attr:`functions` (the update that folds a task vector into :attr:`statistics`, the merge that reads the
    merged task vector from them) and may change each task vector first (:meth:`prepare`); or it overrides
    :meth:`fold`.
    """

    state_fields = ("base", "statistics")
    functions: ClassVar[tuple[Callable[[Statistics, TensorDict], Statistics], Callable[[Statistics], TensorDict]]]

    def __init__(self, settings: MergeSettings) -> None:
        super().__init__(settings)
        self.base: TensorDict = {}  # theta_0
        self.statistics: Statistics = {}  # the running statistics of the merge

    def prepare(self, tau: TensorDict) -> TensorDict:
        """This task's vector as it enters the statistics (trimmed, dropped); as it is by default."""
        return tau

    def fold(self, tau: TensorDict, trainer: Trainer, pl_module: LightningModule) -> TensorDict:
        """Fold this task's vector into :attr:`statistics` and return the merged task vector (new tensors)."""
        update, merge = self.functions
        return merge(update(self.statistics, self.prepare(tau)))

    @override
    def start(self, tensors: dict[str, Tensor], first_task: bool) -> None:
        if not self.base:
            self.base = _snapshot_of(tensors)

    @override
    @torch.no_grad()
    def merge(self, tensors: dict[str, Tensor], trainer: Trainer, pl_module: LightningModule) -> None:
        added = {name: tensor for name, tensor in tensors.items() if name not in self.base}  # a grown head
        current = {name: tensor for name, tensor in tensors.items() if name in self.base}
        _check_same_tensors(current, self.base, "since the first task")
        tau = task_vector(current, self.base)
        merged = self.fold(tau, trainer, pl_module)
        del tau
        for name, tensor in current.items():  # the merge functions return new tensors: reuse them
            tensor.copy_(torch.add(self.base[name], merged[name], alpha=self.settings.scale, out=merged[name]))
        self.base.update(_snapshot_of(added))


class TaskArithmetic(TaskVectorMerge):
    """``m = sum_t tau_t``."""

    keeps_optimizer_state = True

    mode = "task_arithmetic"
    functions = (sum_update, sum_merge)


class Dare(TaskVectorMerge):
    """The sum of the task vectors after drop-and-rescale, with draws from a seeded generator (in the state)."""

    keeps_optimizer_state = True

    mode = "dare"
    functions = (sum_update, sum_merge)

    def __init__(self, settings: MergeSettings) -> None:
        super().__init__(settings)
        self.generator = torch.Generator().manual_seed(settings.seed)  # the drop masks, on the CPU

    @override
    def prepare(self, tau: TensorDict) -> TensorDict:
        return drop_and_rescale(tau, self.settings.drop_prob, self.generator, self.sharded)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator_state": self.generator.get_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.generator.set_state(state_dict["generator_state"])


class Ties(TaskVectorMerge):
    """Trim to the ``top_k`` fraction, elect signs, take the disjoint mean."""

    mode = "ties"
    functions = (ties_update, ties_merge)

    @override
    def prepare(self, tau: TensorDict) -> TensorDict:
        return trim_top_k(tau, self.settings.top_k, sharded=bool(self.sharded))


class MagMax(TaskVectorMerge):
    """Per entry, the value of largest magnitude over the task vectors."""

    mode = "magmax"
    functions = (magmax_update, magmax_merge)


class FisherMerge(TaskVectorMerge):
    """``m = sum_t F_t tau_t / sum_t F_t``, ``F_t`` the task's Fisher from the Trainer's one
    :class:`~lightning_incremental.core.FisherSource`, floored at ``fisher_floor``."""

    keeps_optimizer_state = False

    mode = "fisher"
    _FIX = (
        "callbacks=[EWC(...), WeightMerging(mode='fisher'), ...] (EWC(lambda_=0.0) computes the Fisher without a "
        "penalty)"
    )

    @override
    def setup(self, trainer: Trainer, owner: Callback) -> None:
        source = self.source(trainer)
        name = type(source).__name__
        if trainer.callbacks.index(source) > trainer.callbacks.index(owner):
            raise RuntimeError(
                f"WeightMerging(mode='fisher') comes before {name} in the Trainer's callbacks, but both act at the "
                f"task end in list order and the merge needs the Fisher {name} computes there, on the trained weights. "
                f"Put {name} first: callbacks=[{name}(...), WeightMerging(mode='fisher'), ...]."
            )
        source.check_task_fisher()

    def source(self, trainer: Trainer) -> FisherSource:
        """The one callback of the Trainer that gives each task's Fisher."""
        found = [callback for callback in trainer.callbacks if isinstance(callback, FisherSource)]
        if not found:
            raise RuntimeError(
                "WeightMerging(mode='fisher') weights every task vector by the task's diagonal Fisher information, "
                "which a Fisher source (a callback with `task_fisher()`, lightning_incremental.core.FisherSource, "
                f"such as EWC) computes at each task end, and this Trainer has no Fisher source. Add one before it: "
                f"{self._FIX}."
            )
        if len(found) > 1:
            names = ", ".join(type(callback).__name__ for callback in found)
            raise RuntimeError(
                f"WeightMerging(mode='fisher') found {len(found)} Fisher sources in this Trainer ({names}) and cannot "
                f"tell whose Fisher to merge with; keep one: {self._FIX}."
            )
        return found[0]

    @override
    def fold(self, tau: TensorDict, trainer: Trainer, pl_module: LightningModule) -> TensorDict:
        fisher = self.task_fisher(trainer, pl_module, tau)
        return fisher_merge(fisher_update(self.statistics, tau, fisher, self.settings.fisher_floor))

    def task_fisher(self, trainer: Trainer, pl_module: LightningModule, tau: TensorDict) -> TensorDict:
        """This task's diagonal Fisher for every tensor of ``tau``: the source's, where it gives one; 0 for the
        parameters it does not cover (frozen in this task, so only the floor weights them), 1 for buffers."""
        given = self.source(trainer).task_fisher()
        parameters = {name for name, _ in pl_module.named_parameters()}
        fisher = {}
        for name, vector in tau.items():
            if name in given:
                if given[name].shape != vector.shape:
                    raise RuntimeError(
                        f"WeightMerging(mode='fisher'): the Fisher source gives {name!r} the shape "
                        f"{tuple(given[name].shape)}, but the tensor has {tuple(vector.shape)}."
                    )
                fisher[name] = given[name].to(vector.device)
            elif name in parameters:
                fisher[name] = torch.zeros_like(vector)
            else:
                fisher[name] = torch.ones_like(vector)
        return fisher


STRATEGIES: dict[str, type[MergeStrategy]] = {
    strategy.mode: strategy for strategy in (Interpolate, Average, TaskArithmetic, Ties, Dare, MagMax, FisherMerge)
}
"""Every mode's strategy class, by the mode's name."""


def _map_tensors(value: Any, function: Callable[[str | None, Tensor], Tensor], key: str | None = None) -> Any:
    """``value`` with ``function(name, tensor)`` applied to its tensors, its dicts copied (nested ones too); ``name``
    is the tensor's key in the innermost dict (a tensor's name in the model), ``None`` for a tensor outside one."""
    if isinstance(value, Tensor):
        return function(key, value)
    if isinstance(value, dict):
        return {name: _map_tensors(item, function, name) for name, item in value.items()}
    return value


def _snapshot_of(tensors: dict[str, Tensor]) -> TensorDict:
    return {name: t.detach().to(torch.float32, copy=True) for name, t in tensors.items()}


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
def _merge_into(current: dict[str, Tensor], reference: dict[str, Tensor], weight: float) -> TensorDict:
    """``t = lerp(reference, t, weight)`` for every tensor ``t`` of ``current``; returns the fp32 merge."""
    _check_same_tensors(current, reference, "during the task")
    merged = {name: torch.lerp(reference[name], tensor.float(), weight) for name, tensor in current.items()}
    for name, tensor in current.items():
        tensor.copy_(merged[name])
    return merged
