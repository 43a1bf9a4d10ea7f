"""A user's own LightningModule (not timm, not SDQClassifier), trained with the SDQ callback in the reload tests.
A module of its own so that a fresh process can import the class, as a user's project would."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


class LitNet(pl.LightningModule):
    def __init__(self, width: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def digits(n: int = 512, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as 1x8x8 in [-1, 1], with labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[offset:offset + n], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(d.target[offset:offset + n], dtype=torch.long)


def digits_loader(batch_size: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(*digits(512)), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))
