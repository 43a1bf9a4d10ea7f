"""EBR and KD against hand-written references."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from helpers.quantized import freeze_spread, quantized_model
from sdq_lightning.losses import EntropyBinRegularizer, bin_regularization, kd_loss


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bin_regularization_matches_per_bin_formula(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * 0.1
    s = torch.tensor(0.05)
    loss, occ = bin_regularization(w, s, bits)
    x = (w * (1.0 / s)).flatten()
    if bits == 1:
        c = torch.where(x >= 0, 1.0, -1.0)
    else:
        c = x.round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    terms = [(x[c == k].mean() - k) ** 2 + x[c == k].var(unbiased=False) for k in c.unique()]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    assert abs(float(occ.sum()) - 1.0) < 1e-6


def test_ebr_weighting_and_validation():
    with pytest.raises(ValueError, match="EBR weighting must be one of"):
        EntropyBinRegularizer("bits")
    reg = EntropyBinRegularizer("inv_pow2")
    assert reg.layer_factor(3, torch.tensor([0.5, 0.5])) == 1 / 8


def test_kd_loss_is_soft_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    ref = -(F.softmax(t / 2, -1) * F.log_softmax(s / 2, -1)).sum(-1).mean() * 4
    torch.testing.assert_close(kd_loss(s, t, 2.0), ref)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("weighting,entropy", [("uniform", 0.0), ("inv_bits", 0.5), ("inv_pow2", 0.0)])
def test_batched_ebr_equals_the_per_layer_sum(per_channel, weighting, entropy):
    """EBR over every frozen layer in one pass (the form the callback runs each phase-2 step) against the layer-by-
    layer reference, 1-bit layers included: value and weight gradients within float rounding."""
    import sdq_lightning as sq

    net = quantized_model("resnet20", 0, weight_bits=(1, 2, 3, 4, 8), activation_bits=None, per_channel=per_channel)
    freeze_spread(net)
    layers = [m for m in sq.quant_layers(net).values() if m.weight_quant is not None]
    assert {m.weight_quant.bits for m in layers} >= {1, 2, 8}
    reg = EntropyBinRegularizer(weighting, entropy)
    weights = [m.weight for m in layers]
    batched = reg(layers)
    assert reg._batched is not None  # the batched form ran
    ref = reg.per_layer(layers)
    torch.testing.assert_close(batched, ref, rtol=1e-5, atol=0)
    for a, b in zip(torch.autograd.grad(batched, weights), torch.autograd.grad(ref, weights)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    assert reg(layers[:0]).item() == 0.0
    big = EntropyBinRegularizer(weighting, entropy)
    big.batched_max_weights = 1000  # more weights than that: the per-layer form (bounded memory on large models)
    torch.testing.assert_close(big(layers), ref, rtol=0, atol=0)
    assert getattr(big, "_batched", None) is None
