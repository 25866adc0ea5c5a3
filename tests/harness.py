"""What the tests share: quiet Trainers, the tiny model, batch styles and the run of a method over a stream."""

import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from lightning_incremental import ContinualEvaluation, MLPClassifier, experiment
from lightning_incremental.catalog import MethodSpec
from lightning_incremental.experiment import MethodRun
from lightning_incremental.scenarios import Task, TaskStream

QUIET: dict[str, Any] = {
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "deterministic": True,
}

COLLATE: dict[str, Callable] = {
    "list": default_collate,  # torch collates (x, y) items into [x, y]
    "tuple": lambda items: tuple(default_collate(items)),
    "dict": lambda items: dict(zip(("x", "y"), default_collate(items), strict=False)),
}


def tiny_mlp(stream: TaskStream) -> MLPClassifier:
    """The conformance suite's model: one hidden layer of 32 units, Adam 1e-2."""
    return MLPClassifier(stream[0].train[0][0].numel(), stream.num_classes, hidden=(32,), lr=1e-2)


def tiny_model(stream: TaskStream, seed: int = 0) -> MLPClassifier:
    L.seed_everything(seed, verbose=False)
    return tiny_mlp(stream)


def train_loader(task: Task, style: str = "list", batch_size: int = 8) -> DataLoader:
    return DataLoader(task.train, batch_size=batch_size, shuffle=False, collate_fn=COLLATE[style])


def trainer(epochs: int = 2, callbacks: Sequence[Callback] = (), **kwargs: Any) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, callbacks=list(callbacks), **{**QUIET, **kwargs})


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def stream_for(spec: MethodSpec, stream: TaskStream) -> TaskStream:
    return stream.cumulative() if spec.cumulative else stream


def run_method(
    spec: MethodSpec, stream: TaskStream, epochs: int = 2, style: str = "list", **trainer_kwargs: Any
) -> MethodRun:
    """Train a fresh tiny model with fresh callbacks of ``spec`` over every task of ``stream``, in order, batches of
    8 in the given style, evaluated by the model's own predictions."""
    return experiment.run_method(
        spec,
        stream,
        model=tiny_mlp,
        epochs=epochs,
        batch_size=8,
        shuffle=False,
        dataloader_kwargs={"collate_fn": COLLATE[style]},
        trainer_kwargs={**QUIET, **trainer_kwargs},
        evaluation=ContinualEvaluation(stream),
    )


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=f"weights differ at {name}")


def assert_same_state(a: Any, b: Any, where: str = "state", atol: float = 0.0) -> None:
    """Two ``state_dict`` trees are equal: the same keys and lengths, tensors bit for bit (or to ``atol``), the rest by
    ``==``."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, equal_nan=True, msg=f"tensors differ at {where}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]", atol)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]", atol)
    else:
        assert a == b, f"values differ at {where}: {a!r} != {b!r}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_like_torchrun(worker: Callable[[int, Path], None], out_dir: Path, nprocs: int = 2) -> None:
    """Run ``worker(rank, out_dir)`` in ``nprocs`` forked processes set up as torchrun would.

    Every process lives through the whole task loop (the production path); a Trainer with
    ``strategy="ddp"`` in them joins the process group instead of launching processes.
    """
    port = free_port()

    def entry(rank: int) -> None:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(nprocs),
            NODE_RANK="0",
            LOCAL_RANK=str(rank),
            RANK=str(rank),
        )
        torch.set_num_threads(1)
        worker(rank, out_dir)

    torch.multiprocessing.start_processes(entry, nprocs=nprocs, start_method="fork")
