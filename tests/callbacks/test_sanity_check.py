"""Nothing a trainer does before the first training batch decides a quantizer's state.

Lightning's default ``num_sanity_val_steps=2`` runs validation batches through the untrained network (eval mode,
BatchNorm on its initial running statistics) before training. Activation quantizers take their sign mode and step at
the first TRAINING-mode forward; eval forwards before it quantize with their own batch's provisional step and store
nothing.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from helpers.user_module import USER_CNN, UserNet
from sdq_lightning import SDQ
from sdq_lightning.modules.fused import lsq_act_quantize
from sdq_lightning.quantizers import ActQuantizer


class ValidatedCNN(UserNet):
    """The user's CNN (test_user_cnn.py's) with a validation loop, as most Lightning projects have one."""

    def __init__(self) -> None:
        super().__init__(**USER_CNN)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())


def act_quantizers(module: torch.nn.Module) -> list[ActQuantizer]:
    return [m for m in module.modules() if isinstance(m, ActQuantizer)]


def test_eval_forward_before_training_stores_nothing() -> None:
    aq = ActQuantizer(4)
    x = torch.linspace(-1.0, 3.0, 64).reshape(4, 16)
    aq.eval()
    out = aq(x)
    step = 2 * x.abs().mean() / 7**0.5  # signed 4-bit: Qp = 7, from this batch only
    torch.testing.assert_close(out, lsq_act_quantize(x, step, -8, 7, 1.0), rtol=0, atol=0)
    assert not bool(aq.initialized) and not aq._initialized and aq.step.item() == 1.0
    y = torch.linspace(0.0, 2.0, 64).reshape(4, 16)
    aq.train()
    aq(y)  # the first training-mode forward decides: unsigned (no negative value), step from y
    assert bool(aq.initialized) and not aq._signed
    torch.testing.assert_close(aq.step.detach(), 2 * y.mean() / 15**0.5)
    aq.eval()
    aq(x)  # once initialised, eval forwards use the stored state
    assert not aq._signed


def test_validate_and_sanity_check_leave_the_quantizers_to_the_first_training_batch(make_trainer, digits,
                                                                                     monkeypatch) -> None:
    calls: list[bool] = []
    original = ActQuantizer.initialize

    def recording(self: ActQuantizer, x: torch.Tensor) -> None:
        calls.append(self.training)
        original(self, x)

    monkeypatch.setattr(ActQuantizer, "initialize", recording)
    L.seed_everything(0, verbose=False)
    model = ValidatedCNN()
    sdq = SDQ(weight_bits=(2,), activation_bits=4, search_epochs=0)
    trainer = make_trainer(max_steps=1, callbacks=[sdq], num_sanity_val_steps=2, limit_val_batches=1)
    trainer.validate(model, digits.test(), verbose=False)
    assert calls == [] and not any(q._initialized for q in act_quantizers(model))
    trainer.fit(model, digits.train(), digits.test())  # with its sanity check first
    assert calls == [True] * len(act_quantizers(model)) and all(q._initialized for q in act_quantizers(model))


def fit_and_test(make_trainer, digits, seed: int, sanity: bool, search: bool, epochs: int = 4) -> float:
    """Test accuracy of the CNN trained ``epochs`` epochs (half of them searching) under uniform W2/A4 or SDQ with
    ``avg_bits <= 2.0`` and 4-bit activations, with Lightning's default sanity check or without it."""
    L.seed_everything(seed, verbose=False)
    model = ValidatedCNN()
    if search:
        sdq = SDQ(weight_bits=(1, 2, 3, 4, 5, 6, 7, 8), activation_bits=4,
                  budget={"metric": "avg_bits", "target": 2.0}, search_epochs=epochs // 2)
    else:
        sdq = SDQ(weight_bits=(2,), activation_bits=4, search_epochs=0)
    kwargs = {} if sanity else {"num_sanity_val_steps": 0}  # Lightning's default: 2 sanity batches
    trainer = make_trainer(max_epochs=epochs, callbacks=[sdq], **kwargs)
    trainer.fit(model, digits.train(seed=seed), digits.test())
    return trainer.test(model, digits.test(), verbose=False)[0]["test_acc"]


# The sanity check evaluates but must not change what is trained: the same test accuracy with and without it (an
# activation state taken from the sanity batches cost 1.6-15.6 points here, docs/RESULTS.md "Newcomer fixes").
@pytest.mark.slow
@pytest.mark.parametrize("search", [False, True], ids=["uniform_w2a4", "sdq_avg2_a4"])
def test_default_sanity_check_trains_as_without_it(make_trainer, digits, search: bool) -> None:
    for seed in (0, 1, 2):
        with_check = fit_and_test(make_trainer, digits, seed, True, search)
        without = fit_and_test(make_trainer, digits, seed, False, search)
        assert abs(with_check - without) <= 0.002, f"seed {seed}: {with_check:.4f} with the sanity check, " \
                                                   f"{without:.4f} without"
        assert without >= 0.9, f"seed {seed}: {without:.4f}"
