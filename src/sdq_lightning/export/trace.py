"""Tracing: the float ONNX graph of a frozen SDQ model, written by the TorchScript exporter with custom ``sdq``
placeholder ops where the quantizers are, for a lowering to replace.

Each quantized layer's input quantizer becomes ``sdq::ActQ`` and its weight quantizer ``sdq::WeightQ`` (attribute
``key``: the layer's name, :func:`sdq_lightning.export.graph.key_of`); everything else is the float ops torch writes.
"""

from __future__ import annotations

import copy
import io
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sdq_lightning.export.packed import check_exportable

__all__ = ["EXPORT_OPSET", "export_float_onnx", "float_graph"]

EXPORT_OPSET = 18  # what the TorchScript exporter writes before a lowering raises it
_QUANT_FNS: dict[str, dict[str, Any]] = {}  # layer -> placeholder kind -> its quantizer, during one trace


def _placeholder(kind: str, key: str) -> type[torch.autograd.Function]:
    """An autograd Function computing the layer's quantizer in PyTorch and exported as ``sdq::<kind>`` with the layer
    name as attribute (one class per layer: the TorchScript exporter passes no string arguments to symbolics)."""

    def forward(ctx, t: Tensor) -> Tensor:
        return _QUANT_FNS[key][kind](t)

    def symbolic(g, t):
        out = g.op(f"sdq::{kind}", t, key_s=key)
        out.setType(t.type())
        return out

    return type(f"_{kind}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "symbolic": staticmethod(symbolic)})


def _export_forward(self: nn.Module, x: Tensor) -> Tensor:
    if self.act_quant is not None:
        x = self._sdq_act_fn.apply(x)
    w = self._sdq_weight_fn.apply(self.weight) if self.weight_quant is not None else self.weight
    if isinstance(self, nn.Conv2d):
        return self._conv_forward(x, w, self.bias)
    return F.linear(x, w, self.bias)


def _quant_fns(q: nn.Module) -> dict[str, Any]:
    """Parameter-free copies of a layer's quantizers (the tracer must not meet module parameters in there)."""
    fns: dict[str, Any] = {}
    if q.act_quant is not None:
        qn, qp = q.act_quant.qrange
        step = q.act_quant.step.detach().clone()

        def act(t: Tensor, step: Tensor = step, qn: int = qn, qp: int = qp) -> Tensor:
            return torch.round(torch.clamp(t * (1.0 / step), qn, qp)) * step

        fns["ActQ"] = act
    if q.weight_quant is not None:
        qw = q.weight_quant(q.weight).detach().clone()
        fns["WeightQ"] = lambda t, qw=qw: qw.clone()
    return fns


def float_graph(model: nn.Module, example_input: Tensor) -> tuple[Any, dict[str, nn.Module]]:
    """The traced graph (an ``onnx.ModelProto`` at opset :data:`EXPORT_OPSET`, input ``input``, output ``logits``,
    dynamic batch) of a copy of ``model``, and that copy's quantized layers by name."""
    import onnx

    model = copy.deepcopy(model).eval()
    qlayers = check_exportable(model)
    for name, q in qlayers.items():
        q._sdq_act_fn = _placeholder("ActQ", name)
        q._sdq_weight_fn = _placeholder("WeightQ", name)
        q.forward = types.MethodType(_export_forward, q)
    _QUANT_FNS.clear()
    _QUANT_FNS.update({name: _quant_fns(q) for name, q in qlayers.items()})
    buf = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(model, (example_input,), buf, dynamo=False, opset_version=EXPORT_OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              custom_opsets={"sdq": 1}, do_constant_folding=True)
    finally:
        _QUANT_FNS.clear()
    return onnx.load_from_string(buf.getvalue()), dict(qlayers)


def export_float_onnx(model: nn.Module, path: str | Path, example_input: Tensor, opset: int = EXPORT_OPSET) -> Path:
    """The plain FP ONNX model (a float ``nn.Module``, e.g. the un-quantized network), for comparisons."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(copy.deepcopy(model).eval(), (example_input,), str(path), dynamo=False,
                          opset_version=opset, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path
