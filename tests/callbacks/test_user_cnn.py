"""A user's own CNN trained from scratch at a high learning rate, with the README's SDQ line (issue 10).

The first implementation collapsed silently here: the classifier's 8-bit input step went negative in epoch 0 (its
absolute-Adam update outran the step's size) and the run ended at 10 % while the plan "met" the budget.
"""

from __future__ import annotations

import lightning as L

import pytest
from helpers.user_module import USER_CNN, UserNet
from sdq_lightning import SDQ
from sdq_lightning.quantizers import ActQuantizer, SDQWeightQuantizer


@pytest.mark.slow  # about 40 s on a 2-core CPU; the digits learning tests of test_sdq_training stay fast
def test_fresh_user_cnn_at_high_lr_learns_under_two_bits(make_trainer, digits):
    L.seed_everything(0, verbose=False)
    model = UserNet(**USER_CNN)
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
