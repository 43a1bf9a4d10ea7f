"""The registry of quantized layer types: a float layer class -> the builder of its quantized replacement.

Built in: ``nn.Conv2d`` -> :meth:`QuantConv2d.from_float`, ``nn.Linear`` -> :meth:`QuantLinear.from_float`. The
match is on the exact class: a subclass (e.g. timm's ``Conv2dSame``, which pads in its forward) may compute
something the built-in replacement does not, so :func:`quantize_model` refuses to quantize one that has no
registration of its own (see ``docs/extending.md``)::

    register_quant_layer(MyConv2d, QuantMyConv2d.from_float)   # builder(float_layer, weight_quant, act_quant)

A builder gets the float layer, its :class:`SDQWeightQuantizer` and its :class:`ActQuantizer` (None: FP input) and
returns a :class:`QuantConv2d` or :class:`QuantLinear` (or a subclass), which the rest of the package (plans,
freezing, export) works with.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from sdq_lightning.modules import QuantConv2d, QuantLinear, is_quant_layer
from sdq_lightning.quantizers import ActQuantizer, SDQWeightQuantizer
from sdq_lightning.registry import Registry, RegistryNames

__all__ = ["QUANT_LAYER_TYPES", "QuantBuilder", "build_quant_layer", "check_quant_layer_type", "has_quant_layer_type",
           "quantizable_types", "register_quant_layer", "unregister_quant_layer"]

QuantBuilder = Callable[[nn.Module, SDQWeightQuantizer, "ActQuantizer | None"], nn.Module]

_TYPES: Registry[tuple[type, QuantBuilder]] = Registry(
    "quantized layer type", (re.compile(r"^[A-Za-z_][\w.<>]*$"), "a class's module.qualname"),
    hint=" (sdq_lightning.surgery.register_quant_layer adds one)")

QUANT_LAYER_TYPES = RegistryNames(_TYPES)
"""``module.qualname`` of every float layer class with a registered quantized replacement (live)."""


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_quant_layer(float_cls: type[nn.Module], builder: QuantBuilder, replace: bool = False) -> QuantBuilder:
    """Register ``builder(layer, weight_quant, act_quant) -> quantized layer`` for layers of exactly ``float_cls``
    (an ``nn.Module`` class with a ``weight``). ``replace=True`` overrides an existing one (else ``ValueError``).
    Returns ``builder``."""
    if not (isinstance(float_cls, type) and issubclass(float_cls, nn.Module)):
        raise ValueError(f"register_quant_layer needs an nn.Module class, got {float_cls!r}")
    if not callable(builder):
        raise ValueError(f"register_quant_layer({float_cls.__name__}, builder) needs a function (layer, weight_quant, "
                         f"act_quant) -> quantized layer, got {type(builder).__name__}")
    _TYPES.add(_name(float_cls), (float_cls, builder), replace=replace)
    return builder


def unregister_quant_layer(float_cls: type[nn.Module]) -> None:
    """Remove the registration of ``float_cls`` (``ValueError`` if it has none)."""
    _TYPES.remove(_name(float_cls))


def quantizable_types() -> tuple[type, ...]:
    """The registered float classes: a layer that is an instance of one is a candidate for quantization."""
    return tuple(cls for cls, _ in _TYPES.values())


def has_quant_layer_type(layer: nn.Module) -> bool:
    """Whether the exact class of ``layer`` has a registered quantized layer type."""
    entry = _TYPES.get(_name(type(layer)))
    return entry is not None and entry[0] is type(layer)


def check_quant_layer_type(layer: nn.Module, name: str) -> QuantBuilder:
    """The builder registered for the class of ``layer`` (named ``name``); a one-line ``ValueError`` naming the
    class and the registered ones otherwise."""
    if not has_quant_layer_type(layer):
        base = next((c.__name__ for c in quantizable_types() if isinstance(layer, c)), "a registered class")
        raise ValueError(f"layer {name!r} is a {_name(type(layer))}, a subclass of {base} that its quantized "
                         f"replacement may not compute exactly (e.g. padding in forward): register a quantized layer "
                         f"type for it (sdq_lightning.surgery.register_quant_layer) or keep it in FP (layer_bits None, "
                         f"exclude, or first_last='fp' for the first/last layer); registered: "
                         f"{tuple(QUANT_LAYER_TYPES)}")
    return _TYPES[_name(type(layer))][1]


def build_quant_layer(layer: nn.Module, name: str, weight_quant: SDQWeightQuantizer,
                      act_quant: ActQuantizer | None) -> nn.Module:
    """The quantized replacement of ``layer`` (named ``name``) from its registered builder; a one-line
    ``ValueError`` for an unregistered class or a builder that does not return a quantized layer."""
    new = check_quant_layer_type(layer, name)(layer, weight_quant, act_quant)
    if not is_quant_layer(new):
        raise ValueError(f"the quantized layer type registered for {_name(type(layer))} built a "
                         f"{type(new).__name__} for layer {name!r}, not a QuantConv2d/QuantLinear (or a subclass)")
    return new


register_quant_layer(nn.Conv2d, QuantConv2d.from_float)
register_quant_layer(nn.Linear, QuantLinear.from_float)
