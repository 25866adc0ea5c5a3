"""The reference model of the benchmarks and the command line (DESIGN.md §6): an MLP classifier."""

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_incremental.core.batch import split_batch


class MLPClassifier(LightningModule):
    """A plain LightningModule: an MLP trained with cross-entropy and Adam.

    Nothing in it knows about continual learning: the methods are callbacks added to its Trainer.

    Args:
        in_features: input size; inputs are flattened.
        num_classes: number of output logits.
        hidden: the hidden layer sizes (ReLU between layers).
        lr: Adam's learning rate.

    >>> model = MLPClassifier(64, 10)
    >>> model(torch.zeros(2, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256), lr: float = 1e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for size_in, size_out in itertools.pairwise(sizes):
            layers += [nn.Linear(size_in, size_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = split_batch(batch)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
