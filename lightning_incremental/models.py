"""The reference models of the benchmarks and the command line (``docs/architecture.md``): an MLP classifier, and
a small MLP regressor."""

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F
from typing_extensions import override

from lightning_incremental.core.batch import split_batch, task_labels_of
from lightning_incremental.core.sharding import any_sharded
from lightning_incremental.heads import IncrementalClassifier, MultiHeadClassifier


class MLPClassifier(LightningModule):
    """A plain LightningModule: an MLP trained with cross-entropy and Adam.

    Nothing in it knows about continual learning: the methods are callbacks added to its Trainer. Under
    ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` it shards itself (FSDP2,
    :meth:`configure_model`).

    Args:
        in_features: input size; inputs are flattened.
        num_classes: number of output logits.
        hidden: the hidden layer sizes (ReLU between layers).
        lr: Adam's learning rate.
        head: ``"linear"``, or a growing head (:mod:`lightning_incremental.heads`, with ``GrowHeads``):
            ``"incremental"`` (classes added as they arrive; ``num_classes`` is where it starts) or
            ``"multihead"`` (a head per task label over the global ``num_classes``; ``(x, y, t)`` batches
            train each row on its own head).

    >>> model = MLPClassifier(64, 10)
    >>> model(torch.zeros(2, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        lr: float = 1e-3,
        head: Literal["linear", "incremental", "multihead"] = "linear",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for size_in, size_out in itertools.pairwise(sizes):
            layers += [nn.Linear(size_in, size_out), nn.ReLU()]
        if head == "linear":
            layers.append(nn.Linear(sizes[-1], num_classes))
        elif head == "incremental":
            layers.append(IncrementalClassifier(sizes[-1], num_classes))
        elif head == "multihead":
            layers.append(MultiHeadClassifier(sizes[-1], num_classes))
        else:
            raise ValueError(f"`head` must be 'linear', 'incremental' or 'multihead', got {head!r}.")
        self.net = nn.Sequential(*layers)
        self.lr = lr

    @property
    def head(self) -> nn.Module:
        """The last layer: the classifier head."""
        return self.net[-1]

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = split_batch(batch)
        logits, task_labels = self(x), task_labels_of(batch)
        if task_labels is not None and isinstance(self.head, MultiHeadClassifier):
            logits = self.head.mask(logits, task_labels)  # each row trains its own task's head
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``, shard each linear layer and then the whole model over the data-parallel
        ranks (FSDP2's ``fully_shard``), once: Lightning calls this at every fit. Nothing under other strategies."""
        if self.device_mesh is None or any_sharded(self.parameters()):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class MLPRegressor(LightningModule):
    """The reference regression model: ``Linear(in, 20) -> ReLU -> Linear(20, 1)``, MSE and Adam.

    A plain LightningModule like :class:`MLPClassifier`; the regression stream of the benchmarks and the
    conformance suite trains it (:func:`~lightning_incremental.scenarios.regression_stream`).

    >>> MLPRegressor(10)(torch.zeros(3, 10)).shape
    torch.Size([3, 1])
    """

    def __init__(self, in_features: int = 10, hidden: int = 20, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.lr = lr

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        loss = F.mse_loss(self(x).squeeze(-1), y.float())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
