"""Hypothesis properties of the weight quantizers: grid, idempotence, frozen layers' distinct values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sdq_lightning import QuantConv2d, SDQWeightQuantizer
from sdq_lightning.quantizers import int_range, quantize_weight, weight_step_init

bits_st = st.integers(1, 8)
seed_st = st.integers(0, 2**31 - 1)
scale_st = st.floats(1e-3, 1e3)
shape_st = st.sampled_from([(7,), (4, 3), (8, 4, 3, 3), (3, 1, 3, 3)])


def _weight(seed: int, shape, scale: float) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@given(bits=bits_st, seed=seed_st, scale=scale_st, shape=shape_st, step_mult=st.floats(0.05, 20))
def test_values_lie_on_the_grid(bits, seed, scale, shape, step_mult):
    w = _weight(seed, shape, scale)
    s = weight_step_init(w, bits) * step_mult
    q = quantize_weight(w, s, bits)
    if bits == 1:
        assert torch.equal(q.abs(), s.expand_as(q))  # exactly +-s
        assert torch.equal(torch.sign(q), torch.where(w >= 0, 1.0, -1.0))
        return
    qn, qp = int_range(bits, signed=True)
    codes = q / s
    assert torch.allclose(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.round().min() >= qn and codes.round().max() <= qp


@given(bits=bits_st, seed=seed_st, scale=scale_st, shape=shape_st, step_mult=st.floats(0.05, 20))
def test_quantization_is_idempotent(bits, seed, scale, shape, step_mult):
    w = _weight(seed, shape, scale)
    s = weight_step_init(w, bits) * step_mult
    q = quantize_weight(w, s, bits)
    assert torch.equal(quantize_weight(q, s, bits), q)


@given(bits=bits_st, seed=seed_st, per_channel=st.booleans(), groups=st.sampled_from([1, 4]))
def test_frozen_layer_has_at_most_2_to_the_b_values(bits, seed, per_channel, groups):
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 8, 3, groups=groups)
    wq = SDQWeightQuantizer(tuple(range(1, 9)), weight=conv.weight.detach(), per_channel=per_channel)
    layer = QuantConv2d.from_float(conv, wq, None)
    assert wq.freeze(bits) == bits
    for mode in (True, False):  # train and eval forward use the frozen bits
        layer.train(mode)
        w = layer.quantized_weight().detach()
        rows = w.flatten(1) if per_channel else w.reshape(1, -1)
        for row in rows:
            assert row.unique().numel() <= (2 if bits == 1 else 2**bits)
    codes, step, b = wq.integer_weight(conv.weight.detach())
    assert b == bits and torch.equal(codes.float() * step, layer.quantized_weight().detach())


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("candidates", [tuple(range(1, 9)), (2, 4, 8)])
def test_dynamic_candidate_equals_the_fixed_quantizer(per_channel, candidates):
    """The searching forward gathers Qn, Qp and the LSQ gradient factor from a per-candidate table on the device:
    values and weight gradients equal quantize_at's, step gradients up to float32 rounding of the factor."""
    torch.manual_seed(0)
    w0 = torch.randn(6, 3, 3, 3) * 0.2
    q = SDQWeightQuantizer(candidates, weight=w0, per_channel=per_channel)
    for i in range(len(candidates)):
        outs = []
        for dynamic in (False, True):
            q.zero_grad()
            w = w0.clone().requires_grad_()
            y = q.quantize_dynamic(w, torch.tensor([i])) if dynamic else q.quantize_at(w, i)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            outs.append((y.detach(), w.grad.clone(), q.steps.grad.clone()))
        (ya, gwa, gsa), (yb, gwb, gsb) = outs
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)
        torch.testing.assert_close(gwb, gwa, rtol=0, atol=0)
        torch.testing.assert_close(gsb, gsa, rtol=1e-6, atol=1e-9)
        assert gsa[i].abs().sum() > 0


def test_a_quantizer_built_without_its_weight_fills_its_table_at_the_first_forward():
    w = torch.randn(4, 8) * 0.1
    late, early = SDQWeightQuantizer((1, 2, 4)), SDQWeightQuantizer((1, 2, 4), weight=w)
    late.steps.data.copy_(early.steps.data)
    for i in range(3):
        torch.testing.assert_close(late.quantize_dynamic(w, torch.tensor([i])),
                                   early.quantize_dynamic(w, torch.tensor([i])), rtol=0, atol=0)
    torch.testing.assert_close(late.lsq_table, early.lsq_table, rtol=0, atol=0)
