"""The optimizer's state carried from one task to the next: the carrying math, and which callback of a Trainer
carries it."""

import copy
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from lightning_incremental.core.sharding import gather_full, is_sharded, shard_of_dtensor
from lightning_incremental.core.tensors import grow_to, is_growth


def grow_param_state(state: dict[str, Any], old_shape: torch.Size, new_shape: torch.Size) -> dict[str, Any]:
    """One parameter's optimizer state, moved to the parameter's grown shape.

    Tensors shaped like the parameter (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's ``momentum_buffer``) are
    zero-padded, the old entries in front; scalars (the step count) and other values are kept as they are.
    A tensor of any other shape cannot be padded (it would need the optimizer's own layout, e.g. factored
    second moments): ``ValueError``.

    >>> state = {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}
    >>> grown = grow_param_state(state, torch.Size([2, 2]), torch.Size([3, 2]))
    >>> grown["step"].item(), grown["exp_avg"].tolist()
    (3.0, [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    """
    if old_shape == new_shape:
        return dict(state)
    grown: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.ndim > 0:
            if value.shape != old_shape:
                raise ValueError(
                    f"cannot pad the optimizer state {key!r} of shape {tuple(value.shape)} to a parameter grown "
                    f"from {tuple(old_shape)} to {tuple(new_shape)}"
                )
            value = grow_to(value, new_shape)
        grown[key] = value
    return grown


class CarriedOptimizerState:
    """The optimizer's state carried from the end of one task to the start of the next (the math of
    :class:`~lightning_incremental.KeepOptimizerState`, whose docstring states the matching rules).

    The method that carries it for a Trainer (:func:`optimizer_state_carrier`) calls :meth:`carry_into` when a task
    starts and :meth:`capture` when it ends, and keeps :meth:`state_dict` in its own state.

    Attributes:
        optimizers: the carried state, one entry per optimizer: its class, ``"params"`` (parameter name ->
            its shape and optimizer state; while a task trains, only the parameters its optimizer does not
            hold) and ``"lrs"`` (its parameter groups' learning rates).
        lr_schedulers: with ``schedulers=True``, every LR scheduler's class and state at the last task end.
    """

    def __init__(self, schedulers: bool = False) -> None:
        self.schedulers = schedulers
        # one entry per optimizer: {"type", "params": {name: {"shape", "state"}}, "lrs": [lr of every group]}
        self.optimizers: list[dict[str, Any]] = []
        # one entry per LR scheduler: {"type", "state"}; None when schedulers were not carried
        self.lr_schedulers: list[dict[str, Any]] | None = None
        self._identities: list[dict[str, weakref.ref]] = []  # per optimizer: name -> the parameter it was

    def reset(self, *names: str) -> None:
        """Drop the carried state of the parameters ``names`` (all of it, schedulers too, when none are given).

        They start fresh in the next task, as a new parameter does. Call it between two fits, e.g. when a
        parameter was replaced by one of another shape on purpose, or to switch optimizer classes.
        """
        if not names:
            self.optimizers, self.lr_schedulers, self._identities = [], None, []
            return
        carried = {name for entry in self.optimizers for name in entry["params"]}
        unknown = sorted(set(names) - carried)
        if unknown:
            raise ValueError(f"No carried optimizer state for {unknown}; it is carried for {sorted(carried)}.")
        for entry, identities in zip(self.optimizers, self._identities, strict=True):
            for name in names:
                entry["params"].pop(name, None)
                identities.pop(name, None)

    # ------------------------------------------------------------------ task boundaries
    def capture(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the state of this task's optimizers (and LR schedulers) at its end."""
        names = _parameter_names(trainer, pl_module)
        optimizers, identities = [], []
        for position, optimizer in enumerate(trainer.optimizers):
            kept = self.optimizers[position] if position < len(self.optimizers) else None
            same_class = kept is not None and kept["type"] == _type_name(optimizer)
            params = dict(kept["params"]) if same_class else {}  # parameters this optimizer did not train
            refs = dict(self._identities[position]) if same_class else {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    state = optimizer.state.get(p)
                    if state:
                        # a copy: the next task's optimizer trains it in place, the old Trainer's stays as it ended
                        params[names[id(p)]] = {"shape": list(p.shape), "state": copy.deepcopy(dict(state))}
                        if not is_sharded(p):  # a weak reference would stop fully_shard's module.to() next fit
                            refs[names[id(p)]] = weakref.ref(p)
            lrs = [group["lr"] for group in optimizer.param_groups]
            optimizers.append({"type": _type_name(optimizer), "params": params, "lrs": lrs})
            identities.append(refs)
        self.optimizers, self._identities = optimizers, identities
        if self.schedulers:
            self.lr_schedulers = [
                {"type": _type_name(config.scheduler), "state": config.scheduler.state_dict()}
                for config in trainer.lr_scheduler_configs
            ]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The carried state; a sharded parameter's state gathered whole on rank 0 (a collective: every rank calls
        it; :func:`~lightning_incremental.core.gather_full`)."""
        optimizers = [
            {**entry, "params": {name: _gathered(carried) for name, carried in entry["params"].items()}}
            for entry in self.optimizers
        ]
        return {"optimizers": optimizers, "lr_schedulers": self.lr_schedulers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizers = [
            {"type": entry["type"], "params": dict(entry["params"]), "lrs": list(entry["lrs"])}
            for entry in state_dict["optimizers"]
        ]
        self.lr_schedulers = state_dict["lr_schedulers"]
        self._identities = [{} for _ in self.optimizers]  # identities do not survive a process: names match

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a spawned worker: without the weak references to parameters (names match there)."""
        return {**self.__dict__, "_identities": [{} for _ in self._identities]}

    def carry_into(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Load the carried state into this task's optimizers (and LR schedulers), after checking they fit it."""
        names = _parameter_names(trainer, pl_module)
        if not self.optimizers:
            return
        optimizers = trainer.optimizers
        if len(optimizers) != len(self.optimizers):
            raise ValueError(
                f"KeepOptimizerState carries the state of {len(self.optimizers)} optimizer(s) from the last task, "
                f"but configure_optimizers returned {len(optimizers)} now. Optimizers are matched by position: "
                "return the same optimizers in the same order in every task, or call `reset()` on the callback "
                "before this fit to start them fresh."
            )
        for position, (optimizer, carried) in enumerate(zip(optimizers, self.optimizers, strict=True)):
            if _type_name(optimizer) != carried["type"]:
                raise ValueError(
                    f"Optimizer {position} is {_type_name(optimizer)} in this task but was {carried['type']} at the "
                    "end of the last one; their states do not carry over. Configure the same optimizer class in "
                    "every task, or call `reset()` on KeepOptimizerState before this fit to start it fresh."
                )
        restored = [
            self._restored_state(optimizer, carried, identities, names)
            for optimizer, carried, identities in zip(optimizers, self.optimizers, self._identities, strict=True)
        ]
        if self.schedulers and self.lr_schedulers is not None:
            self._check_schedulers(trainer)
        for optimizer, (state, taken), carried, identities in zip(
            optimizers, restored, self.optimizers, self._identities, strict=True
        ):
            optimizer.load_state_dict(state)
            for name in taken:  # the optimizer owns this state now; it comes back at the task's end
                carried["params"].pop(name)
                identities.pop(name, None)
        if self.schedulers and self.lr_schedulers is not None:
            self._restore_schedulers(trainer)

    def _restored_state(
        self,
        optimizer: torch.optim.Optimizer,
        carried: dict[str, Any],
        identities: dict[str, weakref.ref],
        names: dict[int, str],
    ) -> tuple[dict[str, Any], list[str]]:
        """The new optimizer's ``state_dict`` with the carried state of every parameter it matches.

        Returns it with the names whose state it holds. Parameters without a gradient keep their carried state.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        kept = carried["params"]
        alive = {name: ref() for name, ref in identities.items() if name in kept}
        by_identity = {id(p): name for name, p in alive.items() if p is not None}
        matched = {index: by_identity[id(p)] for index, p in enumerate(params) if id(p) in by_identity}
        taken = set(matched.values())
        for index, p in enumerate(params):
            name = names[id(p)]
            if index not in matched and name in kept and name not in taken:
                matched[index] = name
                taken.add(name)
        state_dict = optimizer.state_dict()
        state = dict(state_dict["state"])
        handed = []
        for index, name in sorted(matched.items()):
            p = params[index]
            if not p.requires_grad:
                continue
            old_shape = torch.Size(kept[name]["shape"])
            if not is_growth(old_shape, p.shape):
                renamed = f" (named {name!r} in the last task)" if names[id(p)] != name else ""
                raise ValueError(
                    f"Parameter {names[id(p)]!r}{renamed} had shape {tuple(old_shape)} at the end of the last task and "
                    f"has {tuple(p.shape)} now: KeepOptimizerState carries state only to the same or a grown shape. "
                    f"If it was replaced on purpose, call `reset({name!r})` on the callback before this fit to start "
                    "it fresh."
                )
            try:
                state[index] = _sharded_like(grow_param_state(kept[name]["state"], old_shape, p.shape), p)
            except ValueError as error:
                raise ValueError(
                    f"Parameter {name!r} grew, but its optimizer state cannot follow: {error}. Call "
                    f"`reset({name!r})` on KeepOptimizerState before this fit to start it fresh."
                ) from error
            handed.append(name)
        return {**state_dict, "state": state}, handed

    def _check_schedulers(self, trainer: Trainer) -> None:
        configs = trainer.lr_scheduler_configs
        carried = self.lr_schedulers or []
        if len(configs) != len(carried):
            raise ValueError(
                f"KeepOptimizerState(schedulers=True) carries {len(carried)} LR scheduler(s) from the last task, but "
                f"configure_optimizers returned {len(configs)} now. Return the same schedulers in every task, or "
                "use `KeepOptimizerState(schedulers=False)` to let every task's scheduler start over."
            )
        for position, (config, entry) in enumerate(zip(configs, carried, strict=True)):
            if _type_name(config.scheduler) != entry["type"]:
                raise ValueError(
                    f"LR scheduler {position} is {_type_name(config.scheduler)} in this task but was {entry['type']}; "
                    "configure the same scheduler in every task, or use `KeepOptimizerState(schedulers=False)`."
                )
        for position, (optimizer, entry) in enumerate(zip(trainer.optimizers, self.optimizers, strict=True)):
            if len(optimizer.param_groups) != len(entry["lrs"]):
                raise ValueError(
                    f"Optimizer {position} has {len(optimizer.param_groups)} parameter group(s) but had "
                    f"{len(entry['lrs'])}: the learning rates a schedule reached cannot be matched to them. Keep the "
                    "same parameter groups, or use `KeepOptimizerState(schedulers=False)`."
                )

    def _restore_schedulers(self, trainer: Trainer) -> None:
        for config, entry in zip(trainer.lr_scheduler_configs, self.lr_schedulers or [], strict=True):
            config.scheduler.load_state_dict(entry["state"])
        for optimizer, entry in zip(trainer.optimizers, self.optimizers, strict=True):
            for group, lr in zip(optimizer.param_groups, entry["lrs"], strict=True):
                group["lr"] = lr


def _gathered(carried: dict[str, Any]) -> dict[str, Any]:
    """One parameter's carried entry with its sharded state tensors gathered into full tensors."""
    state = {
        key: gather_full(value.to_local(), value) if is_sharded(value) else value
        for key, value in carried["state"].items()
    }
    return {**carried, "state": state}


def _sharded_like(state: dict[str, Any], param: Tensor) -> dict[str, Any]:
    """One parameter's optimizer state with every full tensor of the parameter's shape laid out as the (sharded)
    parameter is: a state carried through a checkpoint, for a ``fully_shard``-ed model."""
    if not is_sharded(param):
        return state
    return {
        key: shard_of_dtensor(value, param) if isinstance(value, Tensor) and value.shape == param.shape else value
        for key, value in state.items()
    }


def _type_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _parameter_names(trainer: Trainer, pl_module: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` for the LightningModule; every parameter of an optimizer must have one."""
    names = {id(p): name for name, p in pl_module.named_parameters()}
    for position, optimizer in enumerate(trainer.optimizers):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        f"Optimizer {position} holds a parameter of shape {tuple(p.shape)} that is not a parameter of "
                        f"{type(pl_module).__name__}; the carried optimizer state is keyed by parameter name. Register "
                        "it on the LightningModule (an `nn.Parameter` attribute or one of a submodule)."
                    )
    return names


def optimizer_state_carrier(callbacks: Sequence[Callback]) -> Callback | None:
    """The callback that carries the optimizer's state for a Trainer with these ``callbacks``, or ``None``.

    A callback whose ``decides_optimizer_state`` is true (:class:`~lightning_incremental.KeepOptimizerState`) decides
    for the Trainer, and carries it itself or not at all. Otherwise every method states what its benchmarks
    recommend in ``keeps_optimizer_state`` (``None``: no preference): the state is carried when at least one method
    asks for it and none asks against it, by the first that asks. A method that loses accuracy with the carried
    state (A-GEM, LoRA, merging by interpolation or Fisher) thus wins over the methods that gain a point or two.
    """
    if any(getattr(callback, "decides_optimizer_state", False) for callback in callbacks):
        return None
    preferences = [getattr(callback, "keeps_optimizer_state", None) for callback in callbacks]
    if False in preferences or True not in preferences:
        return None
    return callbacks[preferences.index(True)]
