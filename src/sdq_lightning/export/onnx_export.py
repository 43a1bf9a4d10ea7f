"""ONNX export of a frozen SDQ model, checked in onnxruntime. Two forms (see ``docs/export-onnx.md``):

``form="int8"`` (default): integer kernels. Every bitwidth 1..8 is a subset of the 8-bit grid with the same step and
zero point 0, so the trained codes go into int8/uint8 containers unchanged; see :func:`_rewrite_int`.

``form="qdq"``: QuantizeLinear/DequantizeLinear in the narrowest ONNX types (``opset`` >= 25 by default; int2/uint2
need 25, int4/uint4 need 21):

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
Every node written for a layer is named ``<layer with . as _>_<role>`` so that the capability report can attribute
the kernels onnxruntime runs to layers.
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

__all__ = ["DEFAULT_FORM", "DEFAULT_OPSET", "ONNX_FORMS", "export_onnx", "onnx_int_type", "run_onnx"]

DEFAULT_OPSET = 25
ONNX_FORMS = ("int8", "qdq")
DEFAULT_FUSE_TOLERANCE = 0.0  # output steps: only bit-exact QLinearConv fusion by default; see _rewrite_int
DEFAULT_FORM = "int8"  # onnxruntime (and other int8 runtimes) run it with integer kernels
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


def _emit_weight_qdq(q: nn.Module, tag: str, y: str, opset: int, new_nodes: list, new_inits: list) -> None:
    """Weight codes in the narrowest integer type the opset has, then ``DequantizeLinear(step[, axis=0])`` -> ``y``."""
    from onnx import helper

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


def _emit_act_codes(q: nn.Module, tag: str, x: str, out: str, opset: int, new_nodes: list,
                    new_inits: list) -> str:
    """``Mul(x, fp32(1/step))`` [-> ``Max(Qn)`` -> ``Min(Qp)``] -> ``QuantizeLinear(scale=1)`` -> ``out`` (the input's
    integer codes, in the narrowest type the opset has); returns the codes' ONNX type name."""
    from onnx import helper

    aq = q.act_quant
    qn, qp = aq.qrange
    tname, _, _, native = onnx_int_type(aq.bits, bool(aq.signed), opset)
    s = aq.step.detach().float().reshape(())
    recip = (1.0 / s).numpy()  # the float32 reciprocal lsq_quantize multiplies by
    new_inits += [_const(f"{tag}_arecip", recip), _const(f"{tag}_one", np.array(1.0, np.float32)),
                  _int_tensor(f"{tag}_azp", tname, np.zeros(1, np.int64), [])]
    cur = f"{tag}_ascaled"
    new_nodes.append(helper.make_node("Mul", [x, f"{tag}_arecip"], [cur], name=f"{tag}_act_mul"))
    if not native:
        new_inits += [_const(f"{tag}_amin", np.array(qn, np.float32)),
                      _const(f"{tag}_amax", np.array(qp, np.float32))]
        # Max/Min, not Clip: onnxruntime's Clip+QuantizeLinear fusion rejects int2/int4 zero points
        new_nodes.append(helper.make_node("Max", [cur, f"{tag}_amin"], [f"{tag}_amaxed"], name=f"{tag}_act_lo"))
        new_nodes.append(helper.make_node("Min", [f"{tag}_amaxed", f"{tag}_amax"], [f"{tag}_aclip"],
                                          name=f"{tag}_act_hi"))
        cur = f"{tag}_aclip"
    new_nodes.append(helper.make_node("QuantizeLinear", [cur, f"{tag}_one", f"{tag}_azp"], [out],
                                      name=f"{tag}_act_q"))
    return tname


def _emit_act_qdq(q: nn.Module, tag: str, x: str, y: str, opset: int, new_nodes: list, new_inits: list) -> None:
    from onnx import helper

    _emit_act_codes(q, tag, x, f"{tag}_aq", opset, new_nodes, new_inits)
    new_inits.append(_const(f"{tag}_ascale", q.act_quant.step.detach().float().reshape(()).numpy()))
    new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_aq", f"{tag}_ascale", f"{tag}_azp"], [y],
                                      name=f"{tag}_act_dq"))


def _finish(graph_model: Any, new_nodes: list, new_inits: list, drop: set[str], opset: int, check: bool,
            path: str | Path, meta: dict[str, str] | None = None) -> Path:
    import onnx
    from onnx import helper

    g = graph_model.graph
    needed = {o.name for o in g.output}
    live = []
    for n in reversed(new_nodes):  # drop nodes nothing reads any more (e.g. the Constants of a fused Clip)
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(n.input)
    new_nodes = live[::-1]
    used = {i for n in new_nodes for i in n.input}
    keep = [t for t in g.initializer if t.name in used and t.name not in drop]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(keep + [t for t in new_inits if t.name in used])
    del g.value_info[:]
    del graph_model.opset_import[:]
    graph_model.opset_import.append(helper.make_opsetid("", opset))
    graph_model.ir_version = max(graph_model.ir_version, 11 if opset >= 25 else 10 if opset >= 21 else 8)
    return save_model(onnx.shape_inference.infer_shapes(graph_model), path, meta, check)


def save_model(graph_model: Any, path: str | Path, meta: dict[str, str] | None = None, check: bool = True) -> Path:
    """Add ``meta`` to the model's metadata, check it (``onnx.checker``) and write it to ``path``."""
    import onnx

    for k, v in (meta or {}).items():
        graph_model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    if check:
        onnx.checker.check_model(graph_model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph_model, str(path))
    return path


def export_onnx(model: nn.Module, path: str | Path, example_input: Tensor, opset: int = DEFAULT_OPSET,
                check: bool = True, form: str = DEFAULT_FORM, fuse_tolerance: float = DEFAULT_FUSE_TOLERANCE,
                float_output_kernel: str = "integer") -> Path:
    """Write ``model`` (frozen, calibrated, eval) to ``path`` as ONNX.

    ``form="int8"`` (the default, for onnxruntime and other int8 runtimes): integer kernels (``QLinearConv``,
    ``ConvInteger``, ``MatMulInteger``) with the b-bit codes in int8/uint8 containers, see :func:`_rewrite_int`.
    ``form="qdq"``: QuantizeLinear/DequantizeLinear pairs in the narrowest ONNX types (int2/int4/int8), the form
    that carries the true bitwidths (onnxruntime runs it in float). See the module docstring for both.
    """
    if form not in ONNX_FORMS:
        raise ValueError(f"ONNX form must be one of {ONNX_FORMS}, got {form!r}")
    if opset < 13:
        raise ValueError(f"opset must be >= 13 (per-axis DequantizeLinear), got {opset}")
    graph_model, qlayers = _float_graph(model, example_input)
    if form == "int8":
        if float_output_kernel not in ("float", "integer"):
            raise ValueError(f"float_output_kernel must be 'float' or 'integer', got {float_output_kernel!r}")
        if not fuse_tolerance >= 0:
            raise ValueError(f"fuse_tolerance must be >= 0 (output steps), got {fuse_tolerance!r}")
        return _rewrite_int(graph_model, qlayers, opset, check, path, fuse_tolerance, float_output_kernel)
    new_nodes: list = []
    new_inits: list = []
    drop: set[str] = set()
    inits = {t.name for t in graph_model.graph.initializer}
    weight_out = {n.output[0]: next(a.s.decode() for a in n.attribute if a.name == "key").replace(".", "_")
                  for n in graph_model.graph.node if n.domain == "sdq" and n.op_type == "WeightQ"}
    for node in graph_model.graph.node:
        if node.domain != "sdq" and len(node.input) > 1 and node.input[1] in weight_out:
            node.name = f"{weight_out[node.input[1]]}_{node.op_type.lower()}"  # layer-named, for the kernel report
    for node in graph_model.graph.node:
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
            _emit_weight_qdq(q, tag, y, opset, new_nodes, new_inits)
            drop.add(x)
        elif node.op_type == "ActQ":
            _emit_act_qdq(q, tag, x, y, opset, new_nodes, new_inits)
        else:
            raise ValueError(f"unexpected placeholder op sdq::{node.op_type}")
    return _finish(graph_model, new_nodes, new_inits, drop, opset, check, path, {"sdq_form": "qdq"})


# ----------------------------------------------------------------------------------------------- integer form
_INT8_TYPES = 20  # type selection at this opset gives int8/uint8 containers only


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _rewrite_int(graph_model: Any, qlayers: dict[str, nn.Module], opset: int, check: bool, path: str | Path,
                 fuse_tolerance: float = DEFAULT_FUSE_TOLERANCE, float_output_kernel: str = "integer") -> Path:
    """The integer-kernel form.

    Per quantized layer with a quantized input and weight (every bitwidth 1..8 is a subset of the 8-bit grid with
    the same step and zero point 0):

    * input codes: ``Mul(x, fp32(1/s_x))`` [-> ``Max(Qn)`` -> ``Min(Qp)``] -> ``QuantizeLinear(scale=1)`` to uint8
      (unsigned quantizer) or int8 (signed), zero point 0 -- the PyTorch quantizer's arithmetic;
    * weight: the trained codes (1-bit: +-1), zero point 0, scale ``s_w`` (per channel when the quantizer is);
    * Conv: ``ConvInteger`` (weights as uint8 ``codes + 128`` with zero point 128: onnxruntime's u8u8 kernel is
      faster than its u8s8 one) -> ``Cast`` -> ``BatchNormalization(scale = s_x s_w [x BN scale],
      bias = [BN-folded] bias, mean 0, var 1, epsilon 0)``, one pass for the rescale, bias and the model's BatchNorm;
      a Linear (Gemm) becomes ``MatMulInteger -> Cast -> Mul -> Add``. The int32 accumulator is exact, so the
      output differs from PyTorch's float convolution of the fake-quantized tensors only by float rounding.
    * QLinearConv fusion: a Conv whose output runs only through ``BatchNormalization``, ``Relu``/``Clip`` into the
      next quantized layer's input quantizer becomes ``QLinearConv`` writing that layer's codes (BatchNorm folded
      into the per-channel weight scale and an int32 bias, the activation into a clamp of the codes, ``Clip`` on the
      integers where the bit range is narrower than the container) if the bias rounding, in output steps, is at most
      ``fuse_tolerance``. The default 0 fuses only chains without a BN/bias term (bit-exact); see
      ``docs/export-onnx.md`` for what the rounding does to agreement.
    * ``float_output_kernel="float"``: Convs that are not fused run as float Convs on the dequantized codes
      (faster than ``ConvInteger`` in onnxruntime on CPU, same numbers as the ``qdq`` form).

    Layers with FP activations (weight-only plans) keep a float Conv/Gemm whose weight is the fake-quantized weight
    baked into a float32 initializer, so onnxruntime's float fusions (Conv+BN+activation) apply and the layer runs
    as fast as FP. Layers with a quantized input but an FP weight keep the activation QDQ in 8-bit containers.
    The per-layer choice and the reason for every float layer are stored in the model's metadata (``sdq_layers``).
    """
    import json

    from onnx import helper

    g = graph_model.graph
    nodes = list(g.node)
    init_map = {t.name: t for t in g.initializer}
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def const(name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        while name not in init_map:
            p = producer.get(name)
            if p is not None and p.op_type == "Constant" and p.attribute and p.attribute[0].name == "value":
                return numpy_helper.to_array(p.attribute[0].t)
            if p is None or p.op_type != "Identity":
                return None
            name = p.input[0]
        return numpy_helper.to_array(init_map[name])

    def key_of(node: Any) -> str:
        return next(a.s.decode() for a in node.attribute if a.name == "key")

    act_node = {key_of(n): n for n in nodes if n.domain == "sdq" and n.op_type == "ActQ"}
    w_node = {key_of(n): n for n in nodes if n.domain == "sdq" and n.op_type == "WeightQ"}
    layer_op: dict[str, Any] = {}
    for key, wn in w_node.items():
        cons = consumers.get(wn.output[0], [])
        if len(cons) == 1 and cons[0].op_type in ("Conv", "Gemm") and cons[0].input[1] == wn.output[0]:
            layer_op[key] = cons[0]
    plan: dict[str, dict[str, Any]] = {}

    def int_reason(key: str) -> str | None:
        q = qlayers[key]
        if q.act_quant is None:
            return "input activation not quantized (FP activations): float kernel with the quantized weight baked in"
        if q.weight_quant is None:
            return "weight not quantized (FP weight): float kernel between activation QuantizeLinear/DequantizeLinear"
        if q.weight_quant.bits > 8 or q.act_quant.bits > 8:
            return "bits above 8 have no 8-bit integer kernel"
        op = layer_op.get(key)
        if op is None:
            return "the quantized weight does not feed a single Conv/Gemm in the exported graph"
        if op.input[0] != act_node[key].output[0]:
            return "the quantized input does not feed the Conv/Gemm directly (an op such as Pad sits in between)"
        if len(consumers.get(act_node[key].output[0], [])) != 1:
            return "the quantized input is used by more than one op"
        if op.op_type == "Gemm" and (_attr(op, "transA", 0) or _attr(op, "alpha", 1.0) != 1.0
                                     or _attr(op, "beta", 1.0) != 1.0):
            return "Gemm with transA/alpha/beta is not mapped to MatMulInteger"
        return None

    for key in qlayers:
        r = int_reason(key)
        plan[key] = {"integer": r is None, "reason": r}
    eligible = {k for k, v in plan.items() if v["integer"]}

    # ---- conv output chains: [BatchNormalization] [Relu | Clip] -> next eligible layer's input quantizer
    chain_of: dict[str, dict[str, Any]] = {}
    codes_from: dict[str, str] = {}  # layer fed by a QLinearConv -> the producing layer
    for key in eligible:
        op = layer_op[key]
        if op.op_type != "Conv":
            continue
        c: dict[str, Any] = {"bn": None, "act": None, "lo": -np.inf, "hi": np.inf, "next": None}
        t = op.output[0]

        def single(t: str) -> Any:
            cons = consumers.get(t, [])
            return cons[0] if len(cons) == 1 and t not in outputs else None

        n = single(t)
        if n is not None and n.op_type == "BatchNormalization" and len(n.output) == 1 and \
                all(const(i) is not None for i in n.input[1:5]):
            c["bn"] = n
            t = n.output[0]
            n = single(t)
        if n is not None and n.op_type in ("Relu", "Clip"):
            lo, hi = (0.0, np.inf) if n.op_type == "Relu" else (
                const(n.input[1]) if len(n.input) > 1 and n.input[1] else -np.inf,
                const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.inf)
            if lo is not None and hi is not None:
                c.update(act=n, lo=float(lo), hi=float(hi))
                n = single(n.output[0])
            else:
                n = None
        if n is not None and n.domain == "sdq" and n.op_type == "ActQ" and key_of(n) in eligible:
            c["next"] = key_of(n)
        chain_of[key] = c

    def folded(key: str) -> tuple[np.ndarray, np.ndarray, int]:
        """Per-output-channel multiplier ``a`` (BN) and additive term ``c`` (bias and BN) in float64:
        ``out = (conv without bias) * a + c``."""
        op = layer_op[key]
        q = qlayers[key]
        cout = q.weight.shape[0]
        bias = const(op.input[2]).astype(np.float64) if len(op.input) > 2 and op.input[2] else np.zeros(cout)
        a, cterm = np.ones(cout), bias
        bn = chain_of.get(key, {}).get("bn")
        if bn is not None:
            gamma, beta, mean, var = (const(i).astype(np.float64) for i in bn.input[1:5])
            a = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
            cterm = a * (bias - mean) + beta
        return a, cterm, cout

    def weight_codes(key: str) -> tuple[np.ndarray, np.ndarray, int]:
        q = qlayers[key]
        codes, step, bits = q.weight_quant.integer_weight(q.weight.detach())
        cout = codes.shape[0]
        sw = np.broadcast_to(step.detach().double().reshape(-1).numpy(), (cout,)).copy()
        return codes.numpy().astype(np.int8), sw, bits

    def qconv_terms(key: str, nxt: str) -> dict[str, Any]:
        """QLinearConv weights, scales and int32 bias of ``key`` writing the input codes of ``nxt``."""
        q = qlayers[key]
        sx = float(q.act_quant.step.detach().float())
        codes, sw, _ = weight_codes(key)
        a, cterm, _ = folded(key)
        aq = qlayers[nxt].act_quant
        sy = float(aq.step.detach().float())
        # the int32 bias is the BN/bias term in accumulator units s_x * s_w * a / k; with low-bit weights that unit is
        # coarse next to the output step, so the codes are scaled by k (|k codes| <= 64: exact integers, and no int16
        # pair saturation in AVX2 u8s8 kernels) and the weight scale divided by k
        k = max(1, 64 // max(1, int(np.abs(codes).max(initial=1))))
        wscale = sw * a / k
        exact_bias = cterm / (sx * wscale)
        bias = np.round(exact_bias)
        # worst rounding of the BN/bias term, in output steps (0: the integer kernel computes PyTorch's value)
        err = np.abs(bias - exact_bias) * (sx * np.abs(wscale) / sy)
        return {"codes": (codes.astype(np.int16) * k).astype(np.int8), "wscale": wscale, "bias": bias, "k": k,
                "sx": sx, "sy": sy, "err": float(err.max(initial=0.0))}

    fused: dict[str, str] = {}
    fused_type: dict[str, str] = {}  # container of the codes a QLinearConv writes
    order = {id(n): i for i, n in enumerate(nodes)}
    in_type = {k: "int8" if bool(qlayers[k].act_quant.signed) else "uint8" for k in eligible}
    for key in sorted(chain_of, key=lambda k: order[id(layer_op[k])]):
        c = chain_of[key]
        nxt = c["next"]
        if nxt is None:
            continue
        aqn = qlayers[nxt].act_quant
        ytype = "int8" if bool(aqn.signed) else "uint8"
        if ytype != in_type[key] and ytype == "uint8" and aqn.bits <= 7:
            ytype = "int8"  # unsigned codes below 128 fit int8: QLinearConv wants one type in and out
        if ytype != in_type[key]:
            plan[key]["fusion_blocked"] = (f"QLinearConv needs one type in and out (input {in_type[key]}, next "
                                           f"layer's codes {ytype})")
            continue
        a, _, _ = folded(key)
        if np.any(a == 0):
            plan[key]["fusion_blocked"] = "a BatchNorm channel has scale 0"
            continue
        t = qconv_terms(key, nxt)
        plan[key]["bias_rounding_steps"] = t["err"]
        if np.abs(t["bias"]).max(initial=0) >= 2**31:
            plan[key]["fusion_blocked"] = "the folded bias does not fit int32"
            continue
        if t["err"] > fuse_tolerance:
            plan[key]["fusion_blocked"] = (f"QLinearConv would round the BN/bias term by up to {t['err']:.2g} output "
                                           f"steps (> fuse_tolerance {fuse_tolerance:g})")
            continue
        fused[key] = nxt
        fused_type[key] = ytype
        codes_from[nxt] = key
        in_type[nxt] = ytype

    new_nodes: list = []
    new_inits: list = []
    drop: set[str] = set()
    skip: set[int] = set()
    for key in fused:
        c = chain_of[key]
        skip.update(id(n) for n in (c["bn"], c["act"], act_node[c["next"]]) if n is not None)
    for key in eligible - set(fused):
        c = chain_of.get(key)
        if c and c["bn"] is not None:
            skip.add(id(c["bn"]))
    codes_type: dict[str, str] = {}

    def emit_codes(key: str) -> str:
        q = qlayers[key]
        tag = key.replace(".", "_")
        codes_type[key] = _emit_act_codes(q, tag, act_node[key].input[0], f"{tag}_xq", _INT8_TYPES, new_nodes,
                                          new_inits)
        return f"{tag}_xq"

    def emit_conv(key: str) -> None:
        nonlocal new_inits
        q = qlayers[key]
        op = layer_op[key]
        tag = key.replace(".", "_")
        xq = f"{tag}_xq"
        xtype = codes_type[key]
        sx = float(q.act_quant.step.detach().float())
        codes, sw, _ = weight_codes(key)
        a, cterm, cout = folded(key)
        attrs = {a_.name: helper.get_attribute_value(a_) for a_ in op.attribute} if op.op_type == "Conv" else {}
        new_inits += [_int_tensor(f"{tag}_xzp", xtype, np.zeros(1, np.int64), []),
                      _const(f"{tag}_wzp", np.array(0, np.int8))]
        if key not in fused:
            new_inits.append(_const(f"{tag}_wq", codes if op.op_type == "Conv" else np.ascontiguousarray(codes.T)))
        if key in fused:
            nxt = fused[key]
            c = chain_of[key]
            qn_ = qlayers[nxt]
            ntag = nxt.replace(".", "_")
            aq = qn_.act_quant
            qn, qp = aq.qrange
            ntype = fused_type[key]
            tlo, thi = (-128, 127) if ntype == "int8" else (0, 255)
            r = np.float32(1.0) / np.float32(aq.step.detach().float())
            lo = qn if c["lo"] == -np.inf else max(qn, int(np.round(np.float32(c["lo"]) * r)))
            hi = qp if c["hi"] == np.inf else min(qp, int(np.round(np.float32(c["hi"]) * r)))
            t = qconv_terms(key, nxt)
            codes, wscale, bias = t["codes"], t["wscale"], t["bias"]
            new_inits += [_const(f"{tag}_xscale", np.array(sx, np.float32)),
                          _const(f"{tag}_wscale", wscale.astype(np.float32)),
                          _const(f"{tag}_wzpc", np.zeros(cout, np.int8)),
                          _const(f"{tag}_yscale", aq.step.detach().float().reshape(()).numpy()),
                          _int_tensor(f"{tag}_yzp", ntype, np.zeros(1, np.int64), []),
                          _const(f"{tag}_bias", bias.astype(np.int32))]
            out = f"{ntag}_xq"
            sat = out if (lo, hi) == (tlo, thi) else f"{ntag}_xq_sat"
            new_nodes.append(helper.make_node(
                "QLinearConv", [xq, f"{tag}_xscale", f"{tag}_xzp", f"{tag}_wq", f"{tag}_wscale", f"{tag}_wzpc",
                                f"{tag}_yscale", f"{tag}_yzp", f"{tag}_bias"], [sat], name=f"{tag}_qlinearconv",
                **attrs))
            if sat != out:
                new_inits += [_int_tensor(f"{ntag}_clo", ntype, np.array([lo]), []),
                              _int_tensor(f"{ntag}_chi", ntype, np.array([hi]), [])]
                new_nodes.append(helper.make_node("Clip", [sat, f"{ntag}_clo", f"{ntag}_chi"], [out],
                                                  name=f"{ntag}_act_clip"))
            codes_type[nxt] = ntype
            new_inits.append(_const(f"{tag}_wq", codes))
            return
        c = chain_of.get(key) or {}
        y = c["bn"].output[0] if c.get("bn") is not None else op.output[0]
        if op.op_type == "Conv" and float_output_kernel == "float":
            from onnx import numpy_helper

            new_inits.append(_const(f"{tag}_xscale", np.array(sx, np.float32)))
            new_nodes.append(helper.make_node("DequantizeLinear", [xq, f"{tag}_xscale", f"{tag}_xzp"],
                                              [f"{tag}_xdq"], name=f"{tag}_act_dq"))
            with torch.no_grad():
                wq = q.weight_quant(q.weight).detach().float().numpy()
            new_inits.append(numpy_helper.from_array(wq, f"{tag}_wfp"))
            ins = [f"{tag}_xdq", f"{tag}_wfp"] + list(op.input[2:])
            new_nodes.append(helper.make_node("Conv", ins, [op.output[0]], name=f"{tag}_conv_float", **attrs))
            if c.get("bn") is not None:
                new_nodes.append(c["bn"])
            return
        if op.op_type == "Conv":
            new_inits.append(_const(f"{tag}_wqu", (codes.astype(np.int16) + 128).astype(np.uint8)))
            new_inits.append(_const(f"{tag}_wzpu", np.array(128, np.uint8)))
            new_nodes.append(helper.make_node("ConvInteger", [xq, f"{tag}_wqu", f"{tag}_xzp", f"{tag}_wzpu"],
                                              [f"{tag}_acc"], name=f"{tag}_convinteger", **attrs))
            shape = [1, cout, 1, 1]
        else:
            new_nodes.append(helper.make_node("MatMulInteger", [xq, f"{tag}_wq", f"{tag}_xzp", f"{tag}_wzp"],
                                              [f"{tag}_acc"], name=f"{tag}_matmulinteger"))
            shape = [cout]
        new_nodes.append(helper.make_node("Cast", [f"{tag}_acc"], [f"{tag}_accf"], name=f"{tag}_cast",
                                          to=_tensor_proto_type("float")))
        oscale = (sx * sw * a).astype(np.float32)
        if op.op_type == "Conv":
            # one pass: BatchNormalization(mean 0, var 1, epsilon 0) is acc * scale + bias per channel
            new_inits += [_const(f"{tag}_oscale", oscale), _const(f"{tag}_obias", cterm.astype(np.float32)),
                          _const(f"{tag}_omean", np.zeros(cout, np.float32)),
                          _const(f"{tag}_ovar", np.ones(cout, np.float32))]
            new_nodes.append(helper.make_node("BatchNormalization", [f"{tag}_accf", f"{tag}_oscale", f"{tag}_obias",
                                                                     f"{tag}_omean", f"{tag}_ovar"], [y],
                                              name=f"{tag}_rescale", epsilon=0.0))
            return
        new_inits.append(_const(f"{tag}_oscale", oscale.reshape(shape)))
        has_add = bool(np.any(cterm != 0)) or (len(op.input) > 2 and bool(op.input[2]))
        new_nodes.append(helper.make_node("Mul", [f"{tag}_accf", f"{tag}_oscale"],
                                          [f"{tag}_scaled" if has_add else y], name=f"{tag}_rescale"))
        if has_add:
            new_inits.append(_const(f"{tag}_obias", cterm.astype(np.float32).reshape(shape)))
            new_nodes.append(helper.make_node("Add", [f"{tag}_scaled", f"{tag}_obias"], [y], name=f"{tag}_bias_add"))

    for node in nodes:
        if id(node) in skip:
            continue
        if node.domain == "sdq":
            key = key_of(node)
            q = qlayers[key]
            tag = key.replace(".", "_")
            if key in eligible:
                if node.op_type == "ActQ" and key not in codes_from:
                    emit_codes(key)
                elif node.op_type == "WeightQ":
                    drop.add(node.input[0])
                continue
            if node.op_type == "WeightQ":
                drop.add(node.input[0])
                if q.act_quant is None:  # weight-only: the fake-quantized weight as a float initializer
                    from onnx import numpy_helper

                    with torch.no_grad():
                        wq = q.weight_quant(q.weight).detach().float().numpy()
                    new_inits.append(numpy_helper.from_array(wq, f"{tag}_wfp"))
                    for cons in consumers.get(node.output[0], []):
                        for i, name in enumerate(cons.input):
                            if name == node.output[0]:
                                cons.input[i] = f"{tag}_wfp"
                        cons.name = f"{tag}_conv_float" if cons.op_type == "Conv" else f"{tag}_{cons.op_type.lower()}"
                else:
                    _emit_weight_qdq(q, tag, node.output[0], _INT8_TYPES, new_nodes, new_inits)
            else:
                _emit_act_qdq(q, tag, node.input[0], node.output[0], _INT8_TYPES, new_nodes, new_inits)
            continue
        key = next((k for k in eligible if layer_op[k] is node), None)
        if key is not None:
            emit_conv(key)
            continue
        new_nodes.append(node)
    for key, v in plan.items():
        if not v["integer"]:
            v["op"] = "float"
            continue
        conv = layer_op[key].op_type == "Conv"
        if key in fused:
            v.update(op="QLinearConv", output=f"integer input codes of {fused[key]}")
        elif conv and float_output_kernel == "float":
            why = v.pop("fusion_blocked", None) or "its output is needed in float (residual add, graph output, or an " \
                "op other than BatchNormalization/Relu/Clip before the next quantizer)"
            v.update(integer=False, op="float", output="float",
                     reason=f"{why}; onnxruntime's integer kernel with a float output (ConvInteger) is slower than its "
                            f"float Conv, so the float Conv runs on the dequantized codes (float_output_kernel='float')")
        else:
            v.update(op="ConvInteger" if conv else "MatMulInteger", output="float")
    meta = {"sdq_form": "int8", "sdq_fuse_tolerance": repr(fuse_tolerance),
            "sdq_float_output_kernel": float_output_kernel, "sdq_layers": json.dumps(plan)}
    return _finish(graph_model, new_nodes, new_inits, drop, opset, check, path, meta)


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
