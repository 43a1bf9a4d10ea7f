"""QuantConv2d / QuantLinear with quantizers off are the float layers; from_float / to_float round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdq_lightning import ActQuantizer, QuantConv2d, QuantLinear, SDQWeightQuantizer

CONVS = {
    "conv": lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True),
    "grouped": lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False),
    "depthwise": lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True),
    "dilated-1x1-nobias": lambda: nn.Conv2d(8, 4, 1, dilation=2, bias=False),
}


@pytest.mark.parametrize("kind", list(CONVS))
def test_quant_conv_without_quantizers_is_exact(kind):
    conv = CONVS[kind]()
    x = torch.randn(2, 8, 9, 9)
    ref = conv(x)
    q = QuantConv2d.from_float(conv)
    assert q.weight is conv.weight and q.bias is conv.bias  # shared, not copied
    assert torch.equal(q(x), ref)
    back = q.to_float()
    assert type(back) is nn.Conv2d and torch.equal(back(x), ref)
    assert (back.stride, back.padding, back.dilation, back.groups) == (conv.stride, conv.padding, conv.dilation,
                                                                        conv.groups)


def test_quant_linear_without_quantizers_is_exact():
    lin = nn.Linear(20, 7)
    x = torch.randn(5, 20)
    q = QuantLinear.from_float(lin)
    assert torch.equal(q(x), lin(x))
    back = q.to_float()
    assert type(back) is nn.Linear and torch.equal(back(x), lin(x))


def test_gradients_equal_without_quantizers():
    conv = CONVS["grouped"]()
    x = torch.randn(2, 8, 9, 9)
    conv(x).square().sum().backward()
    ref = conv.weight.grad.clone()
    conv.weight.grad = None
    QuantConv2d.from_float(conv)(x).square().sum().backward()
    assert torch.equal(conv.weight.grad, ref)


@pytest.mark.parametrize("kind", ["conv", "depthwise"])
def test_bake_keeps_the_quantized_output(kind):
    conv = CONVS[kind]()
    wq = SDQWeightQuantizer((4,), weight=conv.weight.detach())
    q = QuantConv2d.from_float(conv, wq, None).eval()
    x = torch.randn(2, 8, 9, 9)
    baked = q.to_float(bake=True)
    assert torch.equal(baked(x), q(x))
    assert not torch.equal(baked.weight, conv.weight)


def test_act_quantizer_only_changes_the_input():
    lin = nn.Linear(6, 3)
    aq = ActQuantizer(4)
    q = QuantLinear.from_float(lin, None, aq)
    x = torch.rand(4, 6)
    assert torch.equal(q(x), lin(aq(x)))
