"""The registry of ONNX lowerings: form name -> function writing a model as that ONNX form.

Built in: ``int8`` (integer kernels, :mod:`~sdq_lightning.export.lower_int8`), ``qdq`` (QuantizeLinear/
DequantizeLinear at the true bitwidths, :mod:`~sdq_lightning.export.lower_qdq`) and ``integer_only`` (the integer
graph of a network trained in the integer-only mode, :mod:`~sdq_lightning.export.integer_only`). A lowering gets a
:class:`LoweringContext` and returns the path it wrote; one that lowers the traced graph of a fake-quantized model
builds on :func:`sdq_lightning.export.trace.float_graph` and :mod:`sdq_lightning.export.graph` (see
``docs/extending.md``)::

    def lower_mine(ctx: LoweringContext) -> Path:
        graph_model, qlayers = float_graph(ctx.model, ctx.example_input)
        ...                                   # replace the sdq placeholders
        return finish(graph_model, new_nodes, new_inits, drop, ctx.opset, ctx.check, ctx.path)

    register_lowering("mine", lower_mine)

A lowering registered with ``fake_quant=True`` (the default) is one of :data:`ONNX_FORMS`: ``export_onnx(form=)``,
``export_model(options={"onnx_form": ...})`` and ``sdq-export --onnx-form`` accept it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from sdq_lightning.registry import Registry, RegistryNames

__all__ = ["INTEGER_ONLY_FORM", "LOWERINGS", "ONNX_FORMS", "Lowering", "LoweringContext", "get_lowering",
           "register_lowering", "unregister_lowering"]


@dataclass
class LoweringContext:
    """What every lowering gets: the frozen quantized model (eval mode), the file to write, an example input batch,
    the ONNX opset, whether to run ``onnx.checker`` and the form's own options."""

    model: nn.Module
    path: Path
    example_input: Tensor | None
    opset: int
    check: bool = True
    options: dict[str, Any] = field(default_factory=dict)


Lowering = Callable[[LoweringContext], Path]
INTEGER_ONLY_FORM = "integer_only"
INTEGER_ONLY_QDQ_FORM = "integer_only_qdq"


@dataclass(frozen=True)
class _Entry:
    fn: Lowering
    description: str
    fake_quant: bool


_LOWERINGS: Registry[_Entry] = Registry("ONNX lowering", hint=" (register_lowering adds one)")

LOWERINGS = RegistryNames(_LOWERINGS)
"""Names of every registered lowering (live)."""

ONNX_FORMS = RegistryNames(_LOWERINGS, keep=lambda e: e.fake_quant)
"""The forms a fake-quantized model can be exported in (live)."""

INTEGER_FORMS = RegistryNames(_LOWERINGS, keep=lambda e: not e.fake_quant)
"""The forms a network trained in the integer-only mode can be exported in (live)."""


def register_lowering(name: str, fn: Lowering, *, description: str = "", fake_quant: bool = True,
                      replace: bool = False) -> Lowering:
    """Register ``fn(ctx: LoweringContext) -> Path`` as ONNX form ``name``; ``fake_quant=False`` for a lowering of
    something other than a fake-quantized model (it is then not among :data:`ONNX_FORMS`). ``replace=True``
    overrides an existing one (else ``ValueError``). Returns ``fn``."""
    if not callable(fn):
        raise ValueError(f"register_lowering({name!r}, fn) needs a function (ctx) -> Path, got {type(fn).__name__}")
    _LOWERINGS.add(name, _Entry(fn, description or (fn.__doc__ or "").strip().split("\n")[0], bool(fake_quant)),
                   replace=replace)
    return fn


def unregister_lowering(name: str) -> None:
    """Remove a registered lowering (``ValueError`` for an unknown name)."""
    _LOWERINGS.remove(name)


def get_lowering(name: str) -> Lowering:
    """The lowering registered as ``name``; ``ValueError`` naming the registered lowerings otherwise."""
    return _LOWERINGS.lookup(name).fn


# --------------------------------------------------------------------------------------------- built-in lowerings
def _int8(ctx: LoweringContext) -> Path:
    from sdq_lightning.export.lower_int8 import lower_int8

    return lower_int8(ctx)


def _qdq(ctx: LoweringContext) -> Path:
    from sdq_lightning.export.lower_qdq import lower_qdq

    return lower_qdq(ctx)


def _integer_only(ctx: LoweringContext, form: str = "int8") -> Path:
    from sdq_lightning.checkpoint import network_of
    from sdq_lightning.export.integer_only import export_integer_onnx

    return export_integer_onnx(network_of(ctx.model), ctx.path, bool(ctx.options.get("intermediates", False)),
                               ctx.check, form=form)


register_lowering("int8", _int8, description="integer kernels (QLinearConv, ConvInteger, MatMulInteger) on the "
                                             "codes in int8/uint8 containers")
register_lowering("qdq", _qdq, description="QuantizeLinear/DequantizeLinear in the narrowest ONNX integer types")
register_lowering(INTEGER_ONLY_FORM, _integer_only, fake_quant=False,
                  description="onnxruntime's integer graph of a network trained in the integer-only mode")
register_lowering(INTEGER_ONLY_QDQ_FORM, lambda ctx: _integer_only(ctx, "qdq"), fake_quant=False,
                  description="the same integer graph as QuantizeLinear/DequantizeLinear around standard ops, for QDQ "
                              "readers (OpenVINO); onnxruntime fuses it back into the integer kernels")
