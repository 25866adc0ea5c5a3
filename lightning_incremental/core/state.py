"""A method's state between processes: its checkpoint key, and carrying it back from spawned DDP workers.

- **Keys.** Every :class:`~lightning_incremental.core.ContinualCallback` in a Trainer gets the key
  ``ClassName`` (``ClassName#k`` for the k-th repeat of a class) from its position in the callback list, so
  a new process that builds the same list finds its state in a checkpoint.
- **Spawned workers.** Under ``ddp_spawn`` / ``ddp_fork`` (what a notebook runs) the fit happens in worker
  processes and only the model's weights come back by themselves. Every method's state is sent back with
  rank 0's results: the worker writes it to a temporary file and a small :class:`_CarriedState` travels
  through Lightning's result queue; unpickling it in the main process loads the file into the twin callback
  there. (A payload above a pipe's 64 KiB in that queue would block the worker forever: the main process
  reads the queue only after the workers exit.)
"""

import os
import tempfile
import weakref
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, Trainer

from lightning_incremental.core._lightning import spawned_launcher

if TYPE_CHECKING:
    from lightning_incremental.core.base import ContinualCallback

_CARRY_PREFIX = "lightning_incremental_state/"
_LIVE_INSTANCES: "weakref.WeakValueDictionary[str, ContinualCallback]" = weakref.WeakValueDictionary()


def register_instance(callback: "ContinualCallback") -> None:
    """Make ``callback`` findable by its instance id when its state comes back from a worker."""
    _LIVE_INSTANCES[callback.instance_id] = callback


def assign_state_keys(callbacks: list[Callback]) -> None:
    """Give every ContinualCallback its checkpoint key: its class name, ``#k`` for the k-th repeat of a class."""
    from lightning_incremental.core.base import ContinualCallback

    seen: dict[type, int] = {}
    for callback in callbacks:
        if isinstance(callback, ContinualCallback):
            position = seen.get(type(callback), 0)
            seen[type(callback)] = position + 1
            callback.key_suffix = "" if position == 0 else f"#{position}"


def carry_state_to_main_process(callback: "ContinualCallback", trainer: Trainer) -> None:
    """Under ddp_spawn / ddp_fork, send ``callback``'s state back with rank 0's results (a no-op otherwise)."""
    launcher = spawned_launcher(trainer)
    if launcher is None:
        return
    state = callback.state_dict()  # on every rank: a state_dict may gather across ranks
    if trainer.global_rank != 0:
        return
    handle, path = tempfile.mkstemp(suffix=".pt", prefix="lightning_incremental_state_")
    with os.fdopen(handle, "wb") as file:
        torch.save(state, file)
    carried = _CarriedState(callback.instance_id, path)
    collect = launcher.get_extra_results  # this worker's launcher, possibly patched by another method

    def get_extra_results(trainer: Trainer) -> dict[str, Any]:
        return {**collect(trainer), _CARRY_PREFIX + callback.instance_id: carried}

    launcher.get_extra_results = get_extra_results


class _CarriedState:
    """Travels from the rank-0 worker to the main process; unpickling it loads the state there."""

    def __init__(self, instance_id: str, path: str) -> None:
        self.instance_id, self.path = instance_id, path

    def __reduce__(self) -> tuple:
        return _deliver_state, (self.instance_id, self.path)


def _deliver_state(instance_id: str, path: str) -> None:
    try:
        callback = _LIVE_INSTANCES.get(instance_id)
        if callback is not None:
            callback.load_state_dict(torch.load(path, weights_only=True))
    finally:
        os.remove(path)
