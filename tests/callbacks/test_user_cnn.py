"""A user's own CNN trained from scratch at a high learning rate, with the README's SDQ line (issue 10).

The first implementation collapsed silently here: the classifier's 8-bit input step went negative in epoch 0 (its
absolute-Adam update outran the step's size) and the run ended at 10 % while the plan "met" the budget.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from sdq_lightning import SDQ
from sdq_lightning.quantizers import ActQuantizer, SDQWeightQuantizer


class UserCNN(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.c3, self.b3 = nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64)
        self.f1, self.f2 = nn.Linear(64 * 4 * 4, 128), nn.Linear(128, 10)
        self.acc = MulticlassAccuracy(num_classes=10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.b3(self.c3(x)))
        return self.f2(F.relu(self.f1(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.acc(self(x), y)
        self.log("test_acc", self.acc)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_fresh_user_cnn_at_high_lr_learns_under_two_bits(make_trainer, digits):
    L.seed_everything(0, verbose=False)
    model = UserCNN()
    sdq = SDQ(weight_bits=(1, 2, 3, 4, 5, 6, 7, 8), activation_bits=4,
              budget={"metric": "avg_bits", "target": 2.0}, search_epochs=3)
    trainer = make_trainer(max_epochs=6, callbacks=[sdq])
    trainer.fit(model, digits.train())
    acc = trainer.test(model, digits.test(), verbose=False)[0]["test_acc"]
    steps = [float(m.step) for m in model.modules() if isinstance(m, ActQuantizer)]
    steps += [float(s) for m in model.modules() if isinstance(m, SDQWeightQuantizer) for s in m.steps.flatten()]
    assert min(steps) > 0, f"a quantizer step is not positive: {min(steps)}"
    assert sdq.plan.average_bits <= 2.0, sdq.plan.average_bits
    assert acc >= 0.90, f"test accuracy {acc:.4f} below 0.90 (plan {dict(sdq.plan)})"
