"""The quantized layer type registry: the worked example of docs/extending.md ("A new quantized layer type") is run
as written and quantizes the subclass exactly as nn.Linear; an unregistered subclass (timm's Conv2dSame, StdConv2d) is
refused by name before any layer is swapped, and listed as unsupported when kept in FP."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Conv2dSame, StdConv2d
from torch import nn

import sdq_lightning as sq
from sdq_lightning.modules import QuantLinear
from sdq_lightning.surgery import QUANT_LAYER_TYPES, register_quant_layer, unregister_quant_layer
from test_export_registry import doc_example  # runs a python block of docs/extending.md


def _net(conv: nn.Module, head: nn.Module) -> nn.Sequential:
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def test_doc_layer_type_quantizes_like_its_base() -> None:
    ex = doc_example("A new quantized layer type")
    try:
        assert "doc_example.ZeroInitLinear" in QUANT_LAYER_TYPES
        torch.manual_seed(0)
        ours = _net(nn.Conv2d(3, 8, 3, padding=1), ex.ZeroInitLinear(8, 10))
        nn.init.normal_(ours[4].weight)
        plain = _net(nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10))
        plain.load_state_dict(ours.state_dict())
        spec = sq.QuantSpec(weight_bits=(2, 4), activation_bits=4, first_last="search")
        reports = [sq.quantize_model(m, spec) for m in (ours, plain)]
        assert reports[0].quantized == reports[1].quantized == ["0", "4"] and not reports[0].unsupported
        assert type(ours[4]) is QuantLinear
        x = torch.randn(4, 3, 8, 8)
        for m in (ours, plain):
            m.train()
            torch.manual_seed(1)
            m.out = m(x)
        assert torch.equal(ours.out, plain.out)
        with pytest.raises(ValueError, match="quantized layer type 'doc_example.ZeroInitLinear' is already"):
            register_quant_layer(ex.ZeroInitLinear, QuantLinear.from_float)
    finally:
        unregister_quant_layer(ex.ZeroInitLinear)
    assert "doc_example.ZeroInitLinear" not in QUANT_LAYER_TYPES


@pytest.mark.parametrize("conv", [Conv2dSame(3, 8, 3, stride=2), StdConv2d(3, 8, 3)], ids=lambda m: type(m).__name__)
def test_unregistered_subclass_is_refused_by_name(conv: nn.Conv2d) -> None:
    net = _net(conv, nn.Linear(8, 10))
    with pytest.raises(ValueError, match=rf"layer '0' is a {type(conv).__module__}\.{type(conv).__name__}, a subclass "
                                         r"of Conv2d .*register_quant_layer.*registered: \('torch\.nn\.modules\."
                                         r"conv\.Conv2d', 'torch\.nn\.modules\.linear\.Linear'\)") as err:
        sq.quantize_model(net, sq.QuantSpec(first_last="search"))
    assert "\n" not in str(err.value)
    assert not sq.quant_layers(net)  # refused before any layer was swapped
    rep = sq.quantize_model(net, sq.QuantSpec(layer_bits={"0": None}, first_last="search"))
    assert rep.quantized == ["4"] and rep.unsupported == ["0"] and type(net[0]) is type(conv)


def test_timm_model_with_conv2d_same_is_refused_by_name() -> None:
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match=r"layer 'conv_stem' is a timm\.layers\.conv2d_same\.Conv2dSame"):
        sq.quantize_model(model)
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.0\.conv_dw' is a timm\.layers\.conv2d_same\.Conv2dSame"):
        sq.quantize_model(model, sq.QuantSpec(first_last="fp"))
    assert not sq.quant_layers(model)


def test_builder_must_return_a_quantized_layer() -> None:
    class Tagged(nn.Linear):
        pass

    register_quant_layer(Tagged, lambda layer, wq, aq: layer)
    try:
        with pytest.raises(ValueError, match=r"built a Tagged for layer '4', not a QuantConv2d/QuantLinear"):
            sq.quantize_model(_net(nn.Conv2d(3, 8, 3), Tagged(8, 10)), sq.QuantSpec(first_last="search"))
    finally:
        unregister_quant_layer(Tagged)
    with pytest.raises(ValueError, match="register_quant_layer needs an nn.Module class"):
        register_quant_layer("Linear", QuantLinear.from_float)
