"""Method state laid out like sharded parameters (FSDP2: ``fully_shard`` under ``ModelParallelStrategy``).

A sharded parameter is a ``DTensor``: every rank holds its shard (``Shard(0)``: a block of rows), and plain tensors
and ``DTensor`` s do not mix in one op. Every method keeps its per-parameter state (anchors, importances, SI's path
integral, merge bases, task vectors, an old model's weights) as **the local shard**, a plain tensor of the rank's
part of the parameter, and does its math on the local shards of the parameters and their gradients (:func:`local`):
no ``DTensor`` dispatch in a step, and a rank holds 1/world of the state. On an unsharded parameter every function
here is the identity, so the same code runs under a single device and DDP.

Checkpoints hold full tensors (:func:`gather_full`): Lightning saves the callbacks' states from rank 0 alone, with a
distributed checkpoint as with a full one, so a shard would lose the other ranks' parts. Rank 0's ``state_dict()`` thus
holds the whole state; another rank's holds its shards. A loaded full tensor becomes
this rank's shard again in ``place_state`` (:func:`shard_of`), on any number of ranks, without communication.
"""

from collections.abc import Iterable

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, distribute_tensor

from lightning_incremental.core.distributed import all_reduce_sum, rank_and_world_size
from lightning_incremental.core.tensors import grow_to, is_growth


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter of a ``fully_shard``-ed module, or its gradient).

    >>> is_sharded(torch.zeros(2))
    False
    """
    return isinstance(tensor, DTensor)


def any_sharded(params: Iterable[Tensor]) -> bool:
    """Whether any of ``params`` is sharded: the model was ``fully_shard``-ed."""
    return any(isinstance(p, DTensor) for p in params)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of ``tensor`` as a plain tensor sharing its storage (in-place ops write the parameter or
    gradient); ``tensor`` itself when it is not sharded. Not the same object at every call: key state by the
    parameter, never by its shard.

    >>> t = torch.ones(2)
    >>> local(t) is t
    True
    """
    if isinstance(tensor, DTensor):
        with torch.no_grad():  # a view of the stored shard, outside any autograd graph
            return tensor.to_local()
    return tensor


def shard_of(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of ``full``, a tensor of the whole shape of the parameter ``like``, laid out as ``like`` is,
    on ``like``'s device; ``full`` on that device when ``like`` is not sharded. No communication: every rank holds
    ``full`` (a loaded checkpoint) and keeps its part.

    >>> shard_of(torch.arange(3.0), torch.zeros(3)).tolist()
    [0.0, 1.0, 2.0]
    """
    if not isinstance(like, DTensor):
        return full.to(like.device)
    if full.shape != like.shape:
        raise ValueError(f"cannot shard a tensor of shape {tuple(full.shape)} like a parameter of {tuple(like.shape)}")
    return shard_of_dtensor(full, like).to_local()


def shard_of_dtensor(full: Tensor, like: Tensor) -> Tensor:
    """:func:`shard_of` as a ``DTensor`` laid out as ``like`` (what an optimizer's state of a sharded parameter is);
    ``full`` on ``like``'s device when ``like`` is not sharded."""
    if not isinstance(like, DTensor) or isinstance(full, DTensor):
        return full.to(like.device)
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def gather_full(shard: Tensor, like: Tensor) -> Tensor:
    """For a checkpoint: on rank 0, the whole tensor of which ``shard`` is this rank's part, laid out as the parameter
    ``like`` is; on the other ranks, ``shard`` (Lightning saves rank 0's callback states only, so no other rank keeps a
    whole copy). A collective: every rank calls it. ``shard`` itself when ``like`` is not sharded.

    >>> gather_full(torch.ones(2), torch.zeros(2)).tolist()
    [1.0, 1.0]
    """
    if not isinstance(like, DTensor):
        return shard
    spread = DTensor.from_local(
        shard, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )
    whole = spread.full_tensor()  # an all-gather: every rank holds the whole tensor until it returns
    return whole if rank_and_world_size()[0] == 0 else shard


def sum_to_shard(partial: Tensor, like: Tensor) -> Tensor:
    """The sum over the ranks of ``partial`` (every rank's tensor of the whole shape of the parameter ``like``), as
    this rank's shard of it: one reduce-scatter, so no rank holds the summed whole (a collective: every rank calls
    it). Without sharding, the all-reduced sum."""
    if not isinstance(like, DTensor):
        return all_reduce_sum([partial])[0]
    partials = [Partial()] * like.device_mesh.ndim
    spread = DTensor.from_local(
        partial, like.device_mesh, partials, run_check=False, shape=like.shape, stride=partial.stride()
    )
    return spread.redistribute(like.device_mesh, like.placements).to_local()


def full_state(shards: dict[str, Tensor], sharded: dict[str, Tensor]) -> dict[str, Tensor]:
    """A per-parameter state on the CPU for a checkpoint: the names of ``sharded`` parameters gathered whole on rank 0
    (:func:`gather_full`; a collective: every rank calls it, with the same names), the others as they are.

    >>> full_state({"w": torch.ones(2)}, {})
    {'w': tensor([1., 1.])}
    """
    return {
        name: (gather_full(shard, sharded[name]) if name in sharded else shard).detach().cpu()
        for name, shard in shards.items()
    }


def shard_state(full: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
    """A per-parameter state of full tensors (a loaded checkpoint) as this rank's shards of ``params``, each first
    zero-padded to its parameter's shape when that grew; other names and shapes are kept as they are (the method says
    what it does with them)."""
    placed = {}
    for name, tensor in full.items():
        param = params.get(name)
        if param is not None and is_growth(tensor.shape, param.shape):
            tensor = shard_of(grow_to(tensor, param.shape), param)
        placed[name] = tensor
    return placed


SHARDING_FIX = (
    "Shard with `ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)` and "
    "`torch.distributed.fsdp.fully_shard(module, mesh=self.device_mesh['data_parallel'])` in `configure_model` "
    "(FSDP2), where every method runs"
)


def is_model_parallel(trainer: Trainer) -> bool:
    """Whether the Trainer runs under ``ModelParallelStrategy`` (FSDP2 and tensor parallelism)."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def refuse_unsupported_strategy(trainer: Trainer, method: str) -> None:
    """Refuse, before the first step and with the fix, a strategy under which ``method`` cannot work.

    - Lightning's ``FSDPStrategy`` (FSDP1) flattens a module's parameters into one ``FlatParameter``, and DeepSpeed
      keeps parameters, gradients and optimizer state behind its engine: per-parameter state and gradient terms do
      not reach them.
    - ``ModelParallelStrategy`` with a tensor-parallel dimension: its ranks share their rows of data, while the
      methods count every rank as a data-parallel one with rows of its own (replay buffers, importance estimates,
      evaluation). Its default ``"auto"`` sizes give one node's devices to tensor parallelism.
    """
    strategy = type(trainer.strategy)
    names = {cls.__name__ for cls in strategy.__mro__}
    for refused, why in (
        ("FSDPStrategy", "flattens each wrapped module's parameters into one FlatParameter (FSDP1)"),
        ("DeepSpeedStrategy", "keeps parameters, gradients and optimizer states inside its ZeRO engine"),
    ):
        if refused in names:
            raise RuntimeError(
                f"{method} keeps state per parameter and acts on each parameter's gradient, which {strategy.__name__} "
                f"does not expose: it {why}. {SHARDING_FIX}."
            )
    if is_model_parallel(trainer):
        tensor_parallel = trainer.strategy.device_mesh["tensor_parallel"].size()
        if tensor_parallel > 1:
            raise RuntimeError(
                f"{method} counts every rank as a data-parallel one with rows of its own, but this "
                f"ModelParallelStrategy gives {tensor_parallel} ranks to tensor parallelism (`tensor_parallel_size`; "
                f"'auto' gives it every device of a node), which share their rows. {SHARDING_FIX}."
            )
