"""Precision: 16-mixed with a gradient scaler searches and trains like 32-true (issue 12).

The first implementation stepped its own optimizers on scaled gradients (DBP and step gradients ~65,000x too large,
no skip on inf) and added unscaled penalty/EBR/KD gradients: DBPs moved by up to 0.89 and steps by 45 % against a
32-bit run. Here the same user module, seed and draws run under both precisions.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from helpers import user_module
from sdq_lightning import SDQ
from sdq_lightning.quantizers import ActQuantizer, SDQWeightQuantizer


# the user module of these tests (experiments/precision_grads.py imports it under this name)
UserNet = partial(user_module.UserNet, body="cnn_widening", width=16, lr=0.05, momentum=0.9)


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

    after: dict[str, torch.Tensor] | None = None
    before: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _values(pl_module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in pl_module.named_parameters() if n.endswith(("dbp", "steps", "step"))}

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.before is None:  # after the first forward (which initialises the activation steps)
            self.before = self._values(pl_module)
        super().on_before_backward(trainer, pl_module, loss)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.after is None:
            self.after = self._values(pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _fit(make_trainer, digits, precision, init_scale=2.0**16, **kw):
    L.seed_everything(0, verbose=False)
    module = UserNet()
    sdq = FirstGrads(activation_bits=4, budget={"metric": "avg_bits", "target": 3.0}, search_epochs=3, ebr={"weight": 0.1})
    kwargs = dict(max_epochs=4, callbacks=[sdq])
    kwargs.update(kw)
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**6)
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    else:
        kwargs["precision"] = precision
    make_trainer(**kwargs).fit(module, digits.train())
    return sdq


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_scaled_and_unscaled_fp16_steps_agree(make_trainer, digits):
    """The scaling itself: a scale of 2^16 and one of 2^4 must give the same unscaled quantizer gradients on the
    first step (powers of two scale exactly; the first implementation's optimizers saw them 65,536x too large)."""
    big = _fit(make_trainer, digits, "16-mixed", 2.0**16, max_epochs=4, limit_train_batches=1)
    small = _fit(make_trainer, digits, "16-mixed", 2.0**4, max_epochs=4, limit_train_batches=1)
    assert big.first.keys() == small.first.keys() and big.first
    for key, g in small.first.items():
        assert _rel(big.first[key], g) <= 0.01, (key, _rel(big.first[key], g))
    # the callback's optimizers step on unscaled gradients: the same DBPs and step sizes after the first step
    moved = [k for k in small.after if not torch.equal(small.after[k], small.before[k])]
    assert any(k.endswith("dbp") for k in moved) and any(k.endswith(("steps", "step")) for k in moved), moved
    for key in small.after:
        assert torch.allclose(big.after[key], small.after[key], rtol=1e-3, atol=1e-6), key


def test_overflowing_fp16_step_is_skipped_for_the_quantizer_parameters(make_trainer, digits):
    """A scale that overflows fp16 gives inf gradients: the user's step is skipped by the scaler, and so are the
    callback's (the first implementation stepped its own optimizers on them)."""
    run = _fit(make_trainer, digits, "16-mixed", 2.0**100, max_epochs=4, limit_train_batches=1)
    for key in run.after:
        assert torch.equal(run.after[key], run.before[key]), key


@pytest.mark.slow
def test_fp16_with_scaler_matches_fp32(make_trainer, digits):
    """Against 32-true, the first step's unscaled gradients differ only by the fp16 forward's own rounding. On this
    model the LSQ step and DBP gradients are small cancelling sums (norms 1e-5..1e-3), which autocast changes by
    1-50 % in fp16 and 1-100 % in bf16 (measured, same seed and draws): the bound checks that no gradient is off by
    anything like the 65,536x of a missing unscale. The search then follows the same course."""
    ref = _fit(make_trainer, digits, "32-true")
    amp = _fit(make_trainer, digits, "16-mixed")
    assert ref.first.keys() == amp.first.keys() and ref.first
    for key, g in ref.first.items():
        assert _rel(amp.first[key], g) <= 0.6, (key, _rel(amp.first[key], g))
    dbps = [k for k in ref.first if k.endswith(".dbp")]
    assert dbps and all(_rel(amp.first[k], ref.first[k]) <= 0.15 for k in dbps)
    # expected bits after each search epoch before the freeze epoch (in the freeze epoch the hardening lets the
    # expected cost settle under the target, and what is compared there is the plan)
    # Both searches meet the budget and end close. NOT asserted, because measured otherwise (docs/RESULTS.md
    # section 15): the "expected bits within 0.15 after each search epoch and the same plan" held with one
    # thread but not with two (0.39 bits apart after epoch 1, plans {net.3: 4, net.6: 2} vs {2, 3}) on this
    # two-searched-layer net, whose expected cost moves in coarse steps.
    assert ref.plan.average_bits <= 3.0 and amp.plan.average_bits <= 3.0
    assert abs(ref.plan.average_bits - amp.plan.average_bits) <= 0.5
    assert abs(ref.history[2]["expected_avg_bits"] - amp.history[2]["expected_avg_bits"]) <= 0.25
