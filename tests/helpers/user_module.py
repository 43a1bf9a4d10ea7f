"""``UserNet``: a user's own LightningModule (not timm, not SDQClassifier) for the tests that train one with the SDQ
callback. It knows nothing of SDQ: a plain ``nn.Sequential`` body under ``self.net``, cross-entropy, its own
optimizer. The bodies are named so that a checkpoint's hyperparameters rebuild the module (``load_quantized``,
``load_from_checkpoint``), also in a fresh process that imports this file."""

from __future__ import annotations

from typing import Callable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F


def _cnn_bn(width: int) -> nn.Sequential:
    """Three 3x3 convs of ``width`` channels with BatchNorm (the last one strided), pooled, one linear layer."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def _cnn_widening(width: int) -> nn.Sequential:
    """``width`` then 2x``width`` channels (BatchNorm on the first two convs), pooled, one linear layer."""
    w2 = 2 * width
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, w2, 3, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
                         nn.Conv2d(w2, w2, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(w2, 10))


def _cnn_plain(width: int) -> nn.Sequential:
    """Two convs without BatchNorm (``width``, then 2x``width`` strided), pooled, one linear layer."""
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def _cnn_fc(width: int) -> nn.Sequential:
    """A larger CNN: ``width``, 2x``width``, 2x``width`` (strided) channels with BatchNorm, then two linear layers
    (no pooling: the classifier sees the 4x4 feature map)."""
    w2 = 2 * width
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, w2, 3, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
                         nn.Conv2d(w2, w2, 3, stride=2, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(w2 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


def _rgb_tiny(width: int) -> nn.Sequential:
    """Two convs on 3-channel inputs, pooled, a 4-class linear layer."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4))


BODIES: dict[str, Callable[[int], nn.Sequential]] = {
    "cnn_bn": _cnn_bn, "cnn_widening": _cnn_widening, "cnn_plain": _cnn_plain, "cnn_fc": _cnn_fc,
    "rgb_tiny": _rgb_tiny,
}


class UserNet(pl.LightningModule):
    """A user's own module. ``body``/``width``: the network (:data:`BODIES`); ``optimizer`` ("sgd" or "adamw"),
    ``lr``, ``momentum`` (SGD only) and ``weight_decay`` (on every parameter; AdamW's own default when None);
    ``test_metric``: the name ``test_step`` logs the accuracy under (None: no test step)."""

    def __init__(self, body: str = "cnn_bn", width: int = 16, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float | None = 0.0, optimizer: str = "sgd", test_metric: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = BODIES[body](width)
        if test_metric is not None:
            from torchmetrics.classification import MulticlassAccuracy

            self.acc = MulticlassAccuracy(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.acc(self(x), y)
        self.log(self.hparams.test_metric, self.acc)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "adamw":
            kw = {} if hp.weight_decay is None else {"weight_decay": hp.weight_decay}
            return torch.optim.AdamW(self.parameters(), lr=hp.lr, **kw)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay or 0.0)


# test_user_cnn.py's CNN: a fresh user network at a high learning rate (AdamW 1e-2), accuracy logged as test_acc
USER_CNN = dict(body="cnn_fc", width=32, optimizer="adamw", lr=1e-2, weight_decay=None, test_metric="test_acc")
