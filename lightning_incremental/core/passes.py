"""Passes a method makes over data for itself (an importance estimate, a buffer fill, features for a head, an
evaluation), written once: :func:`task_rows` says which rows, :func:`own_pass` how they are read.

They must leave the user's training exactly as it would have been without them: the model's train/eval mode
comes back even on an exception, and the global random stream the user's shuffling and dropout draw from is
untouched (a shuffled DataLoader draws its seed from it at every ``iter``).
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lightning_incremental.core.batch import batch_size_of, index_batch


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block; its own mode (and every submodule's) back after, even on error.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> net[1].eval()  # a submodule the user keeps in eval mode stays so
    Dropout(p=0.5, inplace=False)
    >>> with eval_mode(net):
    ...     net.training
    False
    >>> net.training, net[1].training
    (True, False)
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes:
            submodule.training = training


@contextmanager
def private_pass(module: nn.Module) -> Iterator[nn.Module]:
    """A pass of a method's own: eval mode and the global RNG state (CPU and the
    module's accelerator) restored after, so the user's random stream is the same as without the pass.

    >>> net = nn.Linear(2, 2)
    >>> before = torch.rand(1)
    >>> state = torch.get_rng_state()
    >>> with private_pass(net):
    ...     _ = torch.rand(1000)
    >>> torch.equal(torch.get_rng_state(), state)
    True
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(module):
        yield module


Rows = Literal["loader", "rank_share", "all"]
ROWS = ("loader", "rank_share", "all")


def task_rows(trainer: Trainer, rows: Rows = "loader") -> Iterable[Any]:
    """The batches of the fit's training data a method reads again, in one of three layouts.

    - ``"loader"``: the fit's train dataloader as it is: this rank's shard, in the order the loader draws.
    - ``"rank_share"``: every row once, over the ranks: this rank reads every ``world_size``-th row of the
      dataset in dataset order, so neither shuffling nor a distributed sampler's padding (which repeats rows)
      changes what is summed over the ranks.
    - ``"all"``: every row of the dataset in dataset order, on every rank (all ranks compute the same thing).

    The two dataset layouts keep the user's batch size and collate function. A loader without a map-style
    dataset is read as it is.
    """
    if rows not in ROWS:
        raise ValueError(f"`rows` must be one of {ROWS}, got {rows!r}.")
    loader = trainer.train_dataloader
    if rows == "loader" or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    rank, world_size = (trainer.global_rank, trainer.world_size) if rows == "rank_share" else (0, 1)
    return rows_of(loader.dataset, loader.batch_size or 1, loader.collate_fn, rank, world_size)


def rows_of(
    dataset: Dataset, batch_size: int, collate_fn: Callable | None = None, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """A loader of this rank's share of ``dataset``: every ``world_size``-th row from ``rank`` on, in order.

    >>> [batch.tolist() for batch in rows_of(torch.arange(5), batch_size=2, rank=1, world_size=2)]
    [[1, 3]]
    """
    share = Subset(dataset, range(rank, len(dataset), world_size))  # type: ignore[arg-type]
    return DataLoader(share, batch_size=batch_size, collate_fn=collate_fn)


@contextmanager
def own_pass(
    trainer: Trainer,
    pl_module: nn.Module,
    batches: Iterable[Any],
    *,
    limit: int | None = None,
    grad: bool = False,
    autocast: bool = True,
) -> Iterator[Iterator[Any]]:
    """A method's own pass over ``batches``: inside the block, iterate what it yields, each batch on the model's
    device, up to ``limit`` rows (the last batch cut).

    The pass runs in :func:`private_pass` (eval mode, the global random stream untouched), with the state of
    the generators the loader shuffles with restored after, without gradient unless ``grad``, and under the
    Trainer's precision context unless ``autocast=False`` (a pass that must compute in fp32).

    >>> import lightning as L
    >>> trainer, net = L.Trainer(logger=False, enable_progress_bar=False), nn.Linear(2, 2).train()
    >>> with own_pass(trainer, net, [torch.ones(3, 2), torch.ones(3, 2)], limit=4) as batches:
    ...     shapes = [tuple(net(batch).shape) for batch in batches]
    ...     net.training
    False
    >>> shapes, net.training
    ([(3, 2), (1, 2)], True)
    """
    with (
        private_pass(pl_module),
        _generators_kept(batches),
        torch.no_grad() if not grad else nullcontext(),
        trainer.precision_plugin.forward_context() if autocast else nullcontext(),
    ):
        yield _on_device(batches, _device_of(pl_module), limit)


def _on_device(batches: Iterable[Any], device: torch.device, limit: int | None) -> Iterator[Any]:
    seen = 0
    for batch in batches:
        if limit is not None and seen >= limit:
            return
        batch = move_data_to_device(batch, device)
        if limit is not None and seen + batch_size_of(batch) > limit:
            batch = index_batch(batch, slice(0, limit - seen))
        seen += batch_size_of(batch)
        yield batch


def _device_of(module: nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    return next((p.device for p in module.parameters()), torch.device("cpu"))


@contextmanager
def _generators_kept(loader: Any) -> Iterator[None]:
    """The state of the generators a DataLoader shuffles with (``generator=``) restored after the block."""
    owners = [
        loader,
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ]
    generators = {id(g): g for g in (getattr(o, "generator", None) for o in owners) if isinstance(g, torch.Generator)}
    states = [(g, g.get_state()) for g in generators.values()]
    try:
        yield
    finally:
        for generator, state in states:
            generator.set_state(state)
