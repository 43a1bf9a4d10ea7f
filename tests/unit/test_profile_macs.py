"""profile_model's per-layer MACs against torch.utils.flop_counter (conv/linear FLOPs = 2 MACs)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import sdq_lightning as sq


@pytest.mark.parametrize(("name", "res", "classes"), [
    ("resnet20", 32, 10),
    ("resnet18", 224, 1000),
    ("mobilenetv2_100", 224, 1000),  # depthwise convs: MACs use in_channels / groups
])
def test_macs_match_flop_counter(name, res, classes):
    model = timm.create_model(name, pretrained=False, num_classes=classes).eval()
    x = torch.randn(1, 3, res, res)
    prof = sq.profile_model(model, x)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert sum(p.macs for p in prof.values()) * 2 == counter.get_total_flops()
    assert set(prof) == {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def test_mobilenetv2_depthwise_layer_macs():
    model = timm.create_model("mobilenetv2_100", pretrained=False).eval()
    prof = sq.profile_model(model, torch.randn(1, 3, 224, 224))
    dw = [p for p in prof.values() if p.groups > 1]
    assert dw, "mobilenetv2 has depthwise convs"
    for p in dw:
        c, h, w = p.out_shape
        assert p.groups == c and p.macs == c * h * w * 9  # one 3x3 filter per channel


def test_resnet20_size():
    model = timm.create_model("resnet20", num_classes=10)
    prof = sq.profile_model(model, torch.randn(1, 3, 32, 32))
    params = sum(p.numel() for p in model.parameters())
    macs = sum(p.macs for p in prof.values())
    assert 0.26e6 < params < 0.28e6  # 0.272 M with the three 1x1 projection shortcuts
    assert 40e6 < macs < 42e6  # 40.8 M
    assert prof["conv1"].macs == 16 * 32 * 32 * 27 and prof["fc"].macs == 640


def test_profile_leaves_model_state_alone():
    model = timm.create_model("resnet20", num_classes=10)
    sq.quantize_model(model, sq.QuantSpec(activation_bits=4))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sq.profile_model(model, torch.randn(2, 3, 32, 32))
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no BN update, no act-step init, no draw
