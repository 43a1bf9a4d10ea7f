"""quantize_model on timm models and the CIFAR ResNet: first/last detection, policies, patterns, idempotence."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import sdq_lightning as sq
from sdq_lightning.surgery import find_first_last

MODELS = {  # name: (input resolution, first conv, classifier) as timm's pretrained_cfg names them
    "resnet20": (32, "conv1", "fc"),
    "resnet18": (64, "conv1", "fc"),
    "mobilenetv2_100": (64, "conv_stem", "classifier"),
    "efficientnet_b0": (64, "conv_stem", "classifier"),
    "regnetx_002": (64, "stem.conv", "head.fc"),
}


def _model(name):
    return timm.create_model(name, pretrained=False, num_classes=10)


def _targets(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("name", list(MODELS))
def test_default_8bit_policy(name):
    res, first, last = MODELS[name]
    model = _model(name)
    names = _targets(model)
    assert find_first_last(model) == (first, last)
    rep = sq.quantize_model(model, sq.QuantSpec(weight_bits=(2, 4, 8), activation_bits=4))
    assert (rep.first_layer, rep.last_layer) == (first, last)
    assert rep.changed and rep.quantized == names and not rep.kept_float and not rep.unsupported
    assert rep.fixed == {first: 8, last: 8}
    assert rep.searched == [n for n in names if n not in (first, last)]
    q = sq.quant_layers(model)
    for edge in (first, last):
        assert q[edge].weight_quant.candidates == (8,) and q[edge].weight_quant.frozen
        assert q[edge].act_quant.bits == 8
    inner = q[rep.searched[0]]
    assert inner.weight_quant.candidates == (2, 4, 8) and inner.act_quant.bits == 4
    # layer ids differ per layer (independent sampling streams)
    assert len({m.weight_quant.layer_id for m in q.values()}) == len(q)
    model.train()
    out = model(torch.randn(2, 3, res, res))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert "quantized" in str(rep) and f"first={first}" in str(rep)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_100"])
def test_fp_policy_keeps_first_and_last_float(name):
    _, first, last = MODELS[name]
    model = _model(name)
    rep = sq.quantize_model(model, sq.QuantSpec(first_last="fp"))
    assert rep.kept_float == [first, last]
    assert type(model.get_submodule(first)) is nn.Conv2d and type(model.get_submodule(last)) is nn.Linear
    assert first not in rep.quantized and last not in rep.quantized and not rep.fixed


def test_search_policy_searches_first_and_last():
    model = _model("resnet20")
    rep = sq.quantize_model(model, sq.QuantSpec(first_last="search", weight_bits=(1, 2), activation_bits=None))
    assert "conv1" in rep.searched and "fc" in rep.searched and not rep.fixed
    assert sq.quant_layers(model)["conv1"].act_quant is None


def test_include_exclude_patterns():
    model = _model("resnet20")
    rep = sq.quantize_model(model, sq.QuantSpec(include=(r"layer[12]\..*",), exclude=(r".*downsample.*",)))
    names = _targets(model)
    expected = [n for n in names if n.startswith(("layer1.", "layer2.")) and "downsample" not in n]
    assert rep.searched == expected
    assert set(rep.fixed) == {"conv1", "fc"}  # first/last follow their policy whatever the patterns say
    assert set(rep.kept_float) == set(names) - set(expected) - {"conv1", "fc"}
    assert "layer2.0.downsample.0" in rep.kept_float


def test_exact_names_in_patterns():
    model = _model("resnet20")
    rep = sq.quantize_model(model, sq.QuantSpec(exclude=("layer1.0.conv1",)))
    assert "layer1.0.conv1" in rep.kept_float and "layer1.0.conv2" in rep.searched


def test_quantize_model_is_idempotent():
    model = _model("regnetx_002")
    first = sq.quantize_model(model, sq.QuantSpec(weight_bits=(2, 4)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    second = sq.quantize_model(model, sq.QuantSpec(weight_bits=(1, 8)))
    assert first.changed and not second.changed
    assert second.quantized == first.quantized
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert sq.quant_layers(model)["s1.b1.conv2.conv"].weight_quant.candidates == (2, 4)


def test_layer_bits_fix_single_layers():
    model = _model("resnet20")
    rep = sq.quantize_model(model, sq.QuantSpec(layer_bits={"layer1.0.conv1": 3, "layer3.2.conv2": None},
                                                layer_act_bits={"layer1.0.conv1": 6}))
    assert rep.fixed["layer1.0.conv1"] == 3 and "layer3.2.conv2" in rep.kept_float
    assert sq.quant_layers(model)["layer1.0.conv1"].act_quant.bits == 6


def test_dequantize_restores_float_layers():
    model = _model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    sq.quantize_model(model)
    names = sq.dequantize_model(model)
    assert len(names) == len(_targets(model)) and not sq.quant_layers(model)
    assert torch.equal(model(x), ref)
