"""EBR and KD against hand-written references."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

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
