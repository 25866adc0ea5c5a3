"""A user's own Lightning project: an MLP classifier on scikit-learn's 8x8 digits, run with ``LightningCLI``.

Nothing here knows about continual learning. Each run of ``python main.py fit --config config.yaml --data.task k`` is
one update: it trains on the new data of update ``k`` (a new group of digits) and validates on every group seen so far.
The continual-learning methods, the evaluation and the checkpoint the next update starts from are callbacks that
``config.yaml`` adds to the Trainer.
"""

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

# The new data of each update: the digits of one group of classes.
CLASS_GROUPS = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))


class DigitsClassifier(L.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class DigitsUpdates(L.LightningDataModule):
    """The data of update ``task``: training rows of its class group only, validation rows of every group so far.

    Args:
        task: which update this run is (0, 1, 2): the class group of ``CLASS_GROUPS`` that arrives now.
        batch_size: training and validation batch size.
        val_fraction: share of each group's rows held out for validation (a fixed split, the same in every run).
        max_train_rows: keep only this many training rows of the group (``None``: all), for quick runs.
    """

    def __init__(
        self, task: int = 0, batch_size: int = 32, val_fraction: float = 0.25, max_train_rows: int | None = None
    ) -> None:
        super().__init__()
        if not 0 <= task < len(CLASS_GROUPS):
            raise ValueError(f"task must be in 0..{len(CLASS_GROUPS) - 1}, got {task}")
        self.task = task
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_train_rows = max_train_rows

    def setup(self, stage: str) -> None:
        digits = load_digits()
        x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # the same split in every run
        x, y = x[order], y[order]
        self.train_sets, self.val_sets = [], []
        for classes in CLASS_GROUPS:
            rows = torch.isin(y, torch.tensor(classes)).nonzero().squeeze(1)
            n_val = int(len(rows) * self.val_fraction)
            train_rows = rows[n_val:][: self.max_train_rows]
            self.val_sets.append(TensorDataset(x[rows[:n_val]], y[rows[:n_val]]))
            self.train_sets.append(TensorDataset(x[train_rows], y[train_rows]))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_sets[self.task], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.val_sets[j], batch_size=self.batch_size) for j in range(self.task + 1)]


if __name__ == "__main__":
    LightningCLI(DigitsClassifier, DigitsUpdates)
