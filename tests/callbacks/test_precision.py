"""Precision: 16-mixed with a gradient scaler searches and trains like 32-true (issue 12).

The first implementation stepped its own optimizers on scaled gradients (DBP and step gradients ~65,000x too large,
no skip on inf) and added unscaled penalty/EBR/KD gradients: DBPs moved by up to 0.89 and steps by 45 % against a
32-bit run. Here the same user module, seed and draws run under both precisions.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.nn import functional as F

from sdq_lightning import SDQ
from sdq_lightning.quantizers import ActQuantizer, SDQWeightQuantizer


class UserNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class FirstGrads(SDQ):
    """SDQ that records the unscaled DBP and step gradients of the first optimizer step."""

    first: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.first is None:
            from sdq_lightning.callbacks.sdq import grad_scaler
            scaler = grad_scaler(trainer)
            scale = 1.0 if scaler is None else float(scaler.get_scale())
            self.first = {}
            for name, m in pl_module.named_modules():
                if isinstance(m, SDQWeightQuantizer) and m.dbp.grad is not None:
                    self.first[name + ".dbp"] = m.dbp.grad.detach().clone() / scale
                    self.first[name + ".steps"] = m.steps.grad.detach().clone() / scale
                elif isinstance(m, ActQuantizer) and m.step.grad is not None:
                    self.first[name + ".step"] = m.step.grad.detach().clone() / scale
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


def _fit(make_trainer, digits, precision):
    L.seed_everything(0, verbose=False)
    module = UserNet()
    sdq = FirstGrads(activation_bits=4, budget={"metric": "avg_bits", "target": 3.0}, search_epochs=3, ebr_weight=0.1)
    kwargs = dict(max_epochs=4, callbacks=[sdq])
    if precision == "16-mixed":
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    else:
        kwargs["precision"] = precision
    make_trainer(**kwargs).fit(module, digits.train())
    return sdq


@pytest.mark.slow
def test_fp16_with_scaler_matches_fp32(make_trainer, digits):
    ref = _fit(make_trainer, digits, "32-true")
    amp = _fit(make_trainer, digits, "16-mixed")
    # the first step's unscaled quantizer gradients agree within 1 %
    assert ref.first.keys() == amp.first.keys() and ref.first
    for key, g in ref.first.items():
        rel = float((amp.first[key] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel <= 0.01, (key, rel)
    # the search follows the same course and ends in the same plan
    for a, b in zip(ref.history[:3], amp.history[:3]):
        assert abs(a["expected_avg_bits"] - b["expected_avg_bits"]) <= 0.15, (a, b)
    assert dict(amp.plan) == dict(ref.plan)
