"""ONNX export with QuantizeLinear/DequantizeLinear for weights and activations, checked in onnxruntime.

How each quantized layer is written (``opset`` >= 25 by default; int2/uint2 need 25, int4/uint4 need 21):

* weight: an integer initializer of the narrowest ONNX type holding the codes (int2 for 1..2 bits, int4 for 3..4,
  int8 for 5..8; 1-bit codes are +-1, which int2 holds exactly), then ``DequantizeLinear`` with the float32 step
  (per-tensor, or per output channel with ``axis=0``). ``DequantizeLinear(codes) == codes * step`` is the exact
  value PyTorch's fake-quantized weight has.
* input activation: ``Mul(x, fp32(1/step))`` [-> ``Max(Qn)``, ``Min(Qp)`` when the bitwidth has no ONNX type of its own]
  -> ``QuantizeLinear(scale=1, zero_point=0)`` to int2/uint2/int4/uint4/int8/uint8 -> ``DequantizeLinear(step)``.
  The reciprocal multiply is the arithmetic of :func:`sdq_lightning.quantizers.lsq_quantize` (``x * (1/s)``, as in
  torch's fake-quantize kernels); ``QuantizeLinear`` with scale ``s`` would divide ``x / s``, which rounds the other
  way at exact ties (e.g. pixel values of real images) and would make the codes differ from PyTorch's. Rounding is
  half-to-even in both.

Layers kept in floating point are exported as the float ops torch writes. The TorchScript exporter writes the float
graph (custom ``sdq`` placeholder ops mark the quantizers); the placeholders are then replaced by the nodes above.
"""

from __future__ import annotations

import copy
import io
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sdq_lightning.export.packed import check_exportable
from sdq_lightning.quantizers.functional import int_range

__all__ = ["DEFAULT_OPSET", "export_onnx", "onnx_int_type", "run_onnx"]

DEFAULT_OPSET = 25
_EXPORT_OPSET = 18  # what the TorchScript exporter writes before the QDQ rewrite raises it to ``opset``
_REGISTRY: dict[str, dict[str, Any]] = {}


def onnx_int_type(bits: int, signed: bool, opset: int = DEFAULT_OPSET) -> tuple[str, int, int, bool]:
    """Narrowest ONNX integer type for a ``bits``-bit grid: ``(name, lo, hi, native)`` where ``[lo, hi]`` is the
    type's range and ``native`` says whether it equals the grid's range (else the values are clipped to it)."""
    choices = [(2, 25), (4, 21), (8, 10)]
    for width, need in choices:
        if bits <= width and opset >= need:
            lo, hi = int_range(width, signed)
            return (("int" if signed else "uint") + str(width), lo, hi, width == bits)
    raise ValueError(f"no ONNX integer type for {bits}-bit values at opset {opset}")


def _tensor_proto_type(name: str) -> int:
    from onnx import TensorProto

    return getattr(TensorProto, name.upper())


def _placeholder(kind: str, key: str) -> type[torch.autograd.Function]:
    """An autograd Function computing the layer's quantizer in PyTorch and exported as ``sdq::<kind>`` with the layer
    name as attribute (one class per layer: the TorchScript exporter passes no string arguments to symbolics)."""

    def forward(ctx, t: Tensor) -> Tensor:
        return _REGISTRY[key][kind](t)

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


def _float_graph(model: nn.Module, example_input: Tensor) -> tuple[Any, dict[str, nn.Module]]:
    import onnx

    model = copy.deepcopy(model).eval()
    qlayers = check_exportable(model)
    keys = {}
    for name, q in qlayers.items():
        q._sdq_act_fn = _placeholder("ActQ", name)
        q._sdq_weight_fn = _placeholder("WeightQ", name)
        q.forward = types.MethodType(_export_forward, q)
        keys[name] = q
    _REGISTRY.clear()
    for name, q in qlayers.items():  # parameter-free copies: the tracer must not meet module parameters in there
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
        _REGISTRY[name] = fns
    buf = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(model, (example_input,), buf, dynamo=False, opset_version=_EXPORT_OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              custom_opsets={"sdq": 1}, do_constant_folding=True)
    finally:
        _REGISTRY.clear()
    return onnx.load_from_string(buf.getvalue()), keys


def _const(name: str, array: np.ndarray) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array), name)


def _int_tensor(name: str, type_name: str, values: np.ndarray, shape: list[int]) -> Any:
    from onnx import helper

    if type_name in ("int8", "uint8"):
        return _const(name, values.astype(np.int8 if type_name == "int8" else np.uint8).reshape(shape))
    return helper.make_tensor(name, _tensor_proto_type(type_name), shape, values.astype(np.int64).reshape(-1).tolist())


def export_onnx(model: nn.Module, path: str | Path, example_input: Tensor, opset: int = DEFAULT_OPSET,
                check: bool = True) -> Path:
    """Write ``model`` (frozen, calibrated, eval) to ``path`` as a QDQ ONNX model (see the module docstring)."""
    import onnx
    from onnx import helper

    if opset < 13:
        raise ValueError(f"opset must be >= 13 (per-axis DequantizeLinear), got {opset}")
    graph_model, qlayers = _float_graph(model, example_input)
    g = graph_model.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, new_inits, drop = [], [], set()
    for node in g.node:
        if node.domain != "sdq":
            new_nodes.append(node)
            continue
        key = next(a.s.decode() for a in node.attribute if a.name == "key")
        q = qlayers[key]
        tag = key.replace(".", "_")
        x, y = node.input[0], node.output[0]
        if node.op_type == "WeightQ":
            if x not in inits:
                raise ValueError(f"weight of {key!r} is not a constant initializer in the exported graph")
            codes, step, bits = q.weight_quant.integer_weight(q.weight.detach())
            tname, _, _, _ = onnx_int_type(bits, True, opset)
            shape = list(codes.shape)
            per_ch = q.weight_quant.per_channel
            scale = step.detach().reshape(-1).float().numpy() if per_ch else step.detach().reshape(()).float().numpy()
            zshape = [shape[0]] if per_ch else []
            new_inits += [_int_tensor(f"{tag}_wq", tname, codes.numpy(), shape), _const(f"{tag}_wscale", scale),
                          _int_tensor(f"{tag}_wzp", tname, np.zeros(zshape or [1], np.int64), zshape)]
            attrs = {"axis": 0} if per_ch else {}
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_wq", f"{tag}_wscale", f"{tag}_wzp"], [y],
                                              name=f"{tag}_weight_dq", **attrs))
            drop.add(x)
        elif node.op_type == "ActQ":
            aq = q.act_quant
            qn, qp = aq.qrange
            signed = bool(aq.signed)
            tname, _, _, native = onnx_int_type(aq.bits, signed, opset)
            s = aq.step.detach().float().reshape(())
            recip = (1.0 / s).numpy()  # the float32 reciprocal lsq_quantize multiplies by
            new_inits += [_const(f"{tag}_arecip", recip), _const(f"{tag}_ascale", s.numpy()),
                          _const(f"{tag}_one", np.array(1.0, np.float32)),
                          _int_tensor(f"{tag}_azp", tname, np.zeros(1, np.int64), [])]
            cur = f"{tag}_ascaled"
            new_nodes.append(helper.make_node("Mul", [x, f"{tag}_arecip"], [cur], name=f"{tag}_act_mul"))
            if not native:
                new_inits += [_const(f"{tag}_amin", np.array(qn, np.float32)),
                              _const(f"{tag}_amax", np.array(qp, np.float32))]
                # Max/Min, not Clip: onnxruntime's Clip+QuantizeLinear fusion rejects int2/int4 zero points
                new_nodes.append(helper.make_node("Max", [cur, f"{tag}_amin"], [f"{tag}_amaxed"],
                                                  name=f"{tag}_act_lo"))
                new_nodes.append(helper.make_node("Min", [f"{tag}_amaxed", f"{tag}_amax"], [f"{tag}_aclip"],
                                                  name=f"{tag}_act_hi"))
                cur = f"{tag}_aclip"
            new_nodes.append(helper.make_node("QuantizeLinear", [cur, f"{tag}_one", f"{tag}_azp"], [f"{tag}_aq"],
                                              name=f"{tag}_act_q"))
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_aq", f"{tag}_ascale", f"{tag}_azp"], [y],
                                              name=f"{tag}_act_dq"))
        else:
            raise ValueError(f"unexpected placeholder op sdq::{node.op_type}")
    used = {i for n in new_nodes for i in n.input}
    keep = [t for t in g.initializer if t.name not in drop or t.name in used]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    del g.value_info[:]
    del graph_model.opset_import[:]
    graph_model.opset_import.append(helper.make_opsetid("", opset))
    graph_model.ir_version = max(graph_model.ir_version, 11 if opset >= 25 else 10 if opset >= 21 else 8)
    graph_model = onnx.shape_inference.infer_shapes(graph_model)
    if check:
        onnx.checker.check_model(graph_model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph_model, str(path))
    return path


def export_float_onnx(model: nn.Module, path: str | Path, example_input: Tensor, opset: int = _EXPORT_OPSET) -> Path:
    """The plain FP ONNX model (a float ``nn.Module``, e.g. the un-quantized network), for comparisons."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(copy.deepcopy(model).eval(), (example_input,), str(path), dynamo=False,
                          opset_version=opset, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def run_onnx(path: str | Path, x: Tensor | np.ndarray, threads: int | None = None,
             optimization: str = "all") -> np.ndarray:
    """Logits of the ONNX model in onnxruntime on CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                     "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    xa = x.detach().cpu().numpy() if isinstance(x, Tensor) else x
    return sess.run(None, {sess.get_inputs()[0].name: xa.astype(np.float32)})[0]
