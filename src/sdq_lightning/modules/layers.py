"""``QuantConv2d`` and ``QuantLinear``: torch layers holding a weight and an input-activation quantizer.

A quantizer set to ``None`` is off; with both off the layer computes exactly what the float layer computes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sdq_lightning.modules.fused import quant_conv2d, quant_linear
from sdq_lightning.quantizers import ActQuantizer, SDQWeightQuantizer

__all__ = ["QuantConv2d", "QuantLinear", "QuantModule", "is_quant_layer"]


class QuantModule:
    """Mixin: ``weight_quant`` (an :class:`SDQWeightQuantizer` or None) and ``act_quant`` (an
    :class:`ActQuantizer` or None) are submodules, so their state travels with ``state_dict``."""

    weight_quant: SDQWeightQuantizer | None
    act_quant: ActQuantizer | None
    weight: nn.Parameter
    # set by sdq_lightning.modules.batched.BatchedWeights just before the network's forward, taken here once
    _batched_weight: Tensor | None = None

    def quantized_weight(self) -> Tensor:
        wq = self._batched_weight
        if wq is not None:
            self._batched_weight = None
            return wq
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def quantize_input(self, x: Tensor) -> Tensor:
        return x if self.act_quant is None else self.act_quant(x)


def _copy_common(new: nn.Module, old: nn.Module) -> None:
    new.weight = old.weight
    new.bias = old.bias
    new.train(old.training)


class QuantConv2d(QuantModule, nn.Conv2d):
    """``nn.Conv2d`` (grouped and depthwise included) with fake-quantized weight and input."""

    def __init__(self, *args, weight_quant: SDQWeightQuantizer | None = None, act_quant: ActQuantizer | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = weight_quant
        self.act_quant = act_quant

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quant: SDQWeightQuantizer | None = None,
                   act_quant: ActQuantizer | None = None) -> QuantConv2d:
        """Wrap ``conv``; the parameters are shared, not copied."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        _copy_common(new, conv)
        new.weight_quant = weight_quant
        new.act_quant = act_quant
        return new

    def to_float(self, bake: bool = False) -> nn.Conv2d:
        """Back to ``nn.Conv2d``; with ``bake`` the weight is replaced by its fake-quantized value."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode, device="meta")
        _copy_common(conv, self)
        if bake and self.weight_quant is not None:
            with torch.no_grad():
                conv.weight = nn.Parameter(self.weight_quant(self.weight).detach().clone())
        return conv

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            step, qn, qp, g = self.act_quant.prepare(x)
            return quant_conv2d(x, step, self.quantized_weight(), self.bias, qn, qp, g, self.stride, self.padding,
                                self.dilation, self.groups)
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantModule, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input."""

    def __init__(self, *args, weight_quant: SDQWeightQuantizer | None = None, act_quant: ActQuantizer | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = weight_quant
        self.act_quant = act_quant

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quant: SDQWeightQuantizer | None = None,
                   act_quant: ActQuantizer | None = None) -> QuantLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        _copy_common(new, linear)
        new.weight_quant = weight_quant
        new.act_quant = act_quant
        return new

    def to_float(self, bake: bool = False) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        _copy_common(lin, self)
        if bake and self.weight_quant is not None:
            with torch.no_grad():
                lin.weight = nn.Parameter(self.weight_quant(self.weight).detach().clone())
        return lin

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None:
            step, qn, qp, g = self.act_quant.prepare(x)
            return quant_linear(x, step, self.quantized_weight(), self.bias, qn, qp, g)
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


def is_quant_layer(module: nn.Module) -> bool:
    return isinstance(module, (QuantConv2d, QuantLinear))
