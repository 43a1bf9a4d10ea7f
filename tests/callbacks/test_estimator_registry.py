"""Issue 12.4: a bitwidth estimator is added by one function plus one registration (docs/extending.md), and the new
name works for the quantizer, QuantSpec and the SDQ callback."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from sdq_lightning import SDQ, SDQClassifier
from sdq_lightning.quantizers import SDQWeightQuantizer, estimator_names, register_estimator, unregister_estimator
from sdq_lightning.surgery import QuantSpec


CALLS = []


def linear_ste(beta, mixed, u, temperature):
    """Hard sample with probability beta; the surrogate is the mixed DBP itself (a gradient at beta = 0 and 1)."""
    CALLS.append(1)
    return (u < beta.detach()).to(beta.dtype), mixed


@pytest.fixture
def toy_estimator():
    register_estimator("linear_ste", linear_ste)
    yield "linear_ste"
    unregister_estimator("linear_ste")


def test_registered_estimator_samples_with_probability_beta_and_passes_gradient(toy_estimator):
    CALLS.clear()
    assert toy_estimator in estimator_names()
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    q = SDQWeightQuantizer(candidates=(2, 4), estimator=toy_estimator, weight=w).train()
    with torch.no_grad():
        q.dbp[1] = 0.3
    picks = []
    for _ in range(600):
        out = q(w)
        picks.append(q.last_bits == 4)
    assert abs(sum(picks) / len(picks) - 0.3) < 0.06
    assert len(CALLS) >= 600  # the registered function made every draw
    out.sum().backward()
    assert q.dbp.grad[1] != 0
    decoded = SDQWeightQuantizer.decode_extra_state(q.get_extra_state())
    assert decoded["estimator"] == toy_estimator


def test_unknown_and_progressive_only_estimators_are_refused_in_one_line(toy_estimator):
    with pytest.raises(ValueError, match=r"estimator must be one of \('gumbel', 'ste', 'linear_ste'\), got 'nope'"):
        QuantSpec(estimator="nope")
    with pytest.raises(ValueError, match="has no cascade form"):
        SDQWeightQuantizer(candidates=(2, 4), reading="cascade", estimator=toy_estimator)
    with pytest.raises(ValueError, match="already registered"):
        register_estimator(toy_estimator, linear_ste)


def test_sdq_callback_searches_with_a_registered_estimator(toy_estimator, make_trainer, digits):
    CALLS.clear()
    L.seed_everything(0, verbose=False)
    model = SDQClassifier("digits_cnn", in_chans=1, lr=0.05)
    sdq = SDQ(weight_bits=(1, 2, 4, 8), activation_bits=None, budget={"metric": "avg_bits", "target": 3.0},
              search_epochs=1, search={"estimator": toy_estimator}, runtime={"guard": False})
    make_trainer(max_epochs=2, callbacks=[sdq], limit_train_batches=8).fit(model, digits.train())
    quantizers = [m for m in model.modules() if isinstance(m, SDQWeightQuantizer) and len(m.candidates) > 1]
    assert quantizers and all(q.estimator == toy_estimator for q in quantizers)
    assert len(CALLS) >= 8 * len(quantizers)
    assert sdq.plan.average_bits <= 3.0
