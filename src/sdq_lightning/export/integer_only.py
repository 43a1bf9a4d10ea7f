"""The ONNX lowering of an integer-only network: onnxruntime's integer operators (QOperator form), one node per op of
the network's integer graph (:mod:`sdq_lightning.integer.graph`).

=============  ============================================================================================
graph op       ONNX nodes (``<op name with . as _>_<role>``; ``Clip`` on the uint8 codes where the tensor's
               bit range, or ReLU6, is narrower than uint8)
=============  ============================================================================================
quantize       ``QuantizeLinear`` (fp32 scale, uint8 zero point 0, or 128 for a signed input)
conv           ``QLinearConv``: int8 weight codes (1-bit: +-1), fp32 scale per output channel (BatchNorm
               folded), zero point 0, int32 bias; ReLU is the output's saturation at zero point 0
add            ``com.microsoft.QLinearAdd``
gap            ``com.microsoft.QLinearGlobalAveragePool``
maxpool        ``MaxPool`` on the codes; flatten: ``Flatten``
linear         ``com.microsoft.QGemm`` with a float output (the logits)
=============  ============================================================================================

Every number written (codes, scales, int32 biases, clip bounds) comes from the same functions the PyTorch forward
uses (:func:`sdq_lightning.integer.layer_terms`), so onnxruntime computes the PyTorch model's values exactly
(tests/export/test_integer_only.py).

``form="qdq"`` writes the same graph with standard ONNX ops: each op is ``DequantizeLinear`` of its inputs' codes (one
per reader), the float op (``Conv`` with ``DequantizeLinear``'d int8 weights, per-channel scale on axis 0, and the
int32 bias at scale ``fp32(s_x * s_w[c])``; ``Add``; ``GlobalAveragePool``; ``MaxPool``/``Flatten`` requantized at
their input's scale; ``Gemm`` on the int8 weights ``[in, out]``, scale on axis 1, float output), then
``QuantizeLinear`` to the output's codes and the same ``Clip``. onnxruntime with graph optimisation fuses every group
back into the kernel above, so it computes the same values exactly (tests/export/test_integer_qdq.py); without
optimisation, or in another runtime, the float ops give close values, not these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdq_lightning.export.graph import layer_tag, save_model
from sdq_lightning.export.lowering import INTEGER_ONLY_FORM
from sdq_lightning.integer import is_integer_only, layer_terms
from sdq_lightning.integer.graph import Op

__all__ = ["INTEGER_ONLY_FORM", "INTEGER_ONLY_FORMS", "INTEGER_ONLY_OPSET", "export_integer_onnx",
           "integer_ops"]

INTEGER_ONLY_OPSET = 21
INTEGER_ONLY_FORMS = ("int8", "qdq")  # the forms of export_integer_onnx (the names of export.lowering's forms)
_MS = "com.microsoft"


def _pair(v: Any) -> list[int]:
    return [int(v)] * 2 if isinstance(v, int) else [int(i) for i in v]


def _conv_attrs(op: Op, codes: np.ndarray) -> dict[str, Any]:
    """The ONNX attributes of a conv op (QLinearConv and Conv alike)."""
    a = op.attrs
    return {"kernel_shape": list(codes.shape[2:]), "strides": [int(v) for v in a["stride"]],
            "pads": [int(p) for p in a["padding"]] * 2, "dilations": [int(v) for v in a["dilation"]],
            "group": int(a["groups"])}


def _maxpool_attrs(op: Op) -> dict[str, Any]:
    """The ONNX attributes of a max-pool op."""
    a = op.attrs
    return {"kernel_shape": _pair(a["kernel_size"]), "strides": _pair(a["stride"] or a["kernel_size"]),
            "pads": _pair(a["padding"]) * 2, "dilations": _pair(a["dilation"]), "ceil_mode": int(a["ceil_mode"])}


def _scalar(v: torch.Tensor) -> np.ndarray:
    return np.array(float(v.detach().float()), dtype=np.float32)


class _Builder:
    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.state = net.integer_only
        self.graph = self.state.graph
        self.nodes: list = []
        self.inits: list = []
        self.names: set[str] = set()
        self.info: dict[str, dict[str, Any]] = {}  # per tensor: onnx name, step, zero point, clip range

    def init(self, name: str, array: np.ndarray) -> str:
        """An initializer (written once: a tensor's scale and zero point are shared by all its readers)."""
        from onnx import numpy_helper

        if name not in self.names:
            self.names.add(name)
            self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op_type: str, inputs: list[str], output: str, name: str, domain: str = "", **attrs: Any) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, domain=domain or None, **attrs))

    def tensor(self, name: str) -> dict[str, Any]:
        """Step, zero point and uint8 clip range of a graph tensor (from its quantizer, as the forward reads it)."""
        t = self.graph.tensors[name]
        aq = self.net.get_submodule(t.quant)
        signed = aq.is_signed if name == "input" else t.signed
        zp = 128 if signed else 0
        qn, qp = (-(2 ** (t.bits - 1)), 2 ** (t.bits - 1) - 1) if signed else (0, 2**t.bits - 1)
        return {"onnx": "t_" + layer_tag(name), "step": aq.step.detach().float(), "zp": zp, "lo": qn + zp,
                "hi": qp + zp}

    def params(self, name: str, t: dict[str, Any]) -> tuple[str, str]:
        tag = "t_" + layer_tag(name)
        return (self.init(tag + "_scale", _scalar(t["step"])), self.init(tag + "_zp", np.array(t["zp"], np.uint8)))

    def clip(self, raw: str, out: str, tag: str, lo: int, hi: int) -> None:
        """``Clip`` of the last node's uint8 codes ``raw`` to ``[lo, hi]``; where that is the whole uint8 range the
        last node writes ``out`` itself."""
        if (lo, hi) == (0, 255):
            self.nodes[-1].output[0] = out
            return
        self.node("Clip", [raw, self.init(f"{tag}_clip_lo", np.array(lo, np.uint8)),
                           self.init(f"{tag}_clip_hi", np.array(hi, np.uint8))], out, f"{tag}_clip")

    def act_range(self, op: Op, out: dict[str, Any]) -> tuple[int, int]:
        lo, hi = out["lo"], out["hi"]
        if op.act is not None:
            lo = max(lo, out["zp"])
            if op.act == "relu6":  # the forward's bound: round(6 / s) codes above the zero point
                hi = min(hi, int(np.round(6.0 / np.float64(out["step"]))) + out["zp"])
        return lo, hi

    def build(self) -> None:
        for op in self.graph.ops:
            getattr(self, "_" + op.kind)(op)

    def q(self, y: str, name: str, t: dict[str, Any], tag: str, lo: int, hi: int) -> None:
        """``QuantizeLinear`` of the float ``y`` to graph tensor ``name``'s codes, clipped to ``[lo, hi]``."""
        self.node("QuantizeLinear", [y, *self.params(name, t)], t["onnx"] + "_raw", f"{tag}_quantize")
        self.clip(t["onnx"] + "_raw", t["onnx"], tag, lo, hi)

    def conv_terms(self, op: Op, x: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, torch.Tensor]:
        """(the layer's integer terms, its int8 weight codes, its int32 bias: zeros where it has none)."""
        terms = layer_terms(self.net, op, x["step"])
        codes = terms["codes"].numpy().astype(np.int8)
        bias = terms["bias"] if terms["bias"] is not None else torch.zeros(codes.shape[0])
        return terms, codes, bias

    def _quantize(self, op: Op) -> None:
        out = self.tensor(op.output)
        self.q("input", op.output, out, "input", out["lo"], out["hi"])

    def _conv(self, op: Op) -> None:
        x, out = self.tensor(op.inputs[0]), self.tensor(op.output)
        tag = layer_tag(op.name)
        terms, codes, bias = self.conv_terms(op, x)
        cout = codes.shape[0]
        xs, xz = self.params(op.inputs[0], x)
        ys, yz = self.params(op.output, out)  # before the weights: the initializers' order in the file
        ins = [x["onnx"], xs, xz, self.init(f"{tag}_w", codes),
               self.init(f"{tag}_w_scale", terms["step"].numpy().astype(np.float32)),
               self.init(f"{tag}_w_zp", np.zeros(cout, np.int8)), ys, yz,
               self.init(f"{tag}_bias", bias.numpy().astype(np.int32))]
        self.node("QLinearConv", ins, out["onnx"] + "_raw", f"{tag}_qlinearconv", **_conv_attrs(op, codes))
        self.clip(out["onnx"] + "_raw", out["onnx"], tag, *self.act_range(op, out))

    def _add(self, op: Op) -> None:
        a, b, out = (self.tensor(t) for t in (*op.inputs, op.output))
        tag = layer_tag(op.name)
        ins = [a["onnx"], *self.params(op.inputs[0], a), b["onnx"], *self.params(op.inputs[1], b),
               *self.params(op.output, out)]
        self.node("QLinearAdd", ins, out["onnx"] + "_raw", f"{tag}_qlinearadd", domain=_MS)
        self.clip(out["onnx"] + "_raw", out["onnx"], tag, *self.act_range(op, out))

    def _gap(self, op: Op) -> None:
        x, out = self.tensor(op.inputs[0]), self.tensor(op.output)
        tag = layer_tag(op.name)
        ins = [x["onnx"], *self.params(op.inputs[0], x), *self.params(op.output, out)]
        self.node("QLinearGlobalAveragePool", ins, out["onnx"] + "_raw", f"{tag}_qlinearglobalaveragepool",
                  domain=_MS, channels_last=0)
        self.clip(out["onnx"] + "_raw", out["onnx"], tag, out["lo"], out["hi"])

    def _maxpool(self, op: Op) -> None:
        x, out = self.tensor(op.inputs[0]), self.tensor(op.output)
        self.node("MaxPool", [x["onnx"]], out["onnx"], f"{layer_tag(op.name)}_maxpool", **_maxpool_attrs(op))

    def _flatten(self, op: Op) -> None:
        self.node("Flatten", [self.tensor(op.inputs[0])["onnx"]], self.tensor(op.output)["onnx"],
                  f"{layer_tag(op.name)}_flatten", axis=1)

    def _linear(self, op: Op) -> None:
        x = self.tensor(op.inputs[0])
        tag = layer_tag(op.name)
        terms = layer_terms(self.net, op, x["step"])
        codes = terms["codes"].numpy().astype(np.int8)
        ins = [x["onnx"], *self.params(op.inputs[0], x), self.init(f"{tag}_w", np.ascontiguousarray(codes.T)),
               self.init(f"{tag}_w_scale", terms["step"].numpy().astype(np.float32)),
               self.init(f"{tag}_w_zp", np.zeros(codes.shape[0], np.int8))]
        if terms["bias"] is not None:
            ins.append(self.init(f"{tag}_bias", terms["bias"].numpy().astype(np.int32)))
        self.node("QGemm", ins, "logits", f"{tag}_qgemm", domain=_MS)


class _QDQBuilder(_Builder):
    """The same graph in QDQ form (``form="qdq"``): each op is standard ONNX float ops between ``DequantizeLinear``
    of its inputs' codes and ``QuantizeLinear`` of its output, with the codes, scales, zero points, int32 biases and
    ``Clip`` nodes (on the uint8 codes, between the ``QuantizeLinear`` and the readers' ``DequantizeLinear``) of the
    integer graph. Every reader gets its own ``DequantizeLinear`` (one node unit per op)."""

    def dq(self, name: str, t: dict[str, Any], tag: str) -> str:
        """``DequantizeLinear`` of graph tensor ``name``'s codes for the op ``tag``."""
        out = f"{tag}_{t['onnx']}_dq"
        self.node("DequantizeLinear", [t["onnx"], *self.params(name, t)], out, f"{tag}_{t['onnx']}_dequantize")
        return out

    def weights(self, tag: str, codes: np.ndarray, step: torch.Tensor, bias: torch.Tensor | None, x_step: torch.Tensor,
                axis: int) -> tuple[str, str | None]:
        """Dequantized int8 weight codes (scale per output channel on ``axis``) and int32 bias (scale
        ``fp32(s_x * s_w[c])``, zero point 0): the float inputs of the Conv / Gemm."""
        ws = step.numpy().astype(np.float32)
        cout = ws.shape[0]
        w = f"{tag}_w_dq"
        self.node("DequantizeLinear", [self.init(f"{tag}_w", codes), self.init(f"{tag}_w_scale", ws),
                                       self.init(f"{tag}_w_zp", np.zeros(cout, np.int8))], w, f"{tag}_w_dequantize",
                  axis=axis)
        if bias is None:
            return w, None
        bs = (np.float32(x_step.item()) * ws).astype(np.float32)
        self.node("DequantizeLinear", [self.init(f"{tag}_bias", bias.numpy().astype(np.int32)),
                                       self.init(f"{tag}_bias_scale", bs),
                                       self.init(f"{tag}_bias_zp", np.zeros(cout, np.int32))], f"{tag}_bias_dq",
                  f"{tag}_bias_dequantize", axis=0)
        return w, f"{tag}_bias_dq"

    def _conv(self, op: Op) -> None:
        x, out = self.tensor(op.inputs[0]), self.tensor(op.output)
        tag = layer_tag(op.name)
        terms, codes, bias = self.conv_terms(op, x)
        w, b = self.weights(tag, codes, terms["step"], bias, x["step"], 0)
        self.node("Conv", [self.dq(op.inputs[0], x, tag), w, b], f"{tag}_y", f"{tag}_conv", **_conv_attrs(op, codes))
        self.q(f"{tag}_y", op.output, out, tag, *self.act_range(op, out))

    def _add(self, op: Op) -> None:
        a, b, out = (self.tensor(t) for t in (*op.inputs, op.output))
        tag = layer_tag(op.name)
        self.node("Add", [self.dq(op.inputs[0], a, tag), self.dq(op.inputs[1], b, tag)], f"{tag}_y", f"{tag}_add")
        self.q(f"{tag}_y", op.output, out, tag, *self.act_range(op, out))

    def _gap(self, op: Op) -> None:
        x, out = self.tensor(op.inputs[0]), self.tensor(op.output)
        tag = layer_tag(op.name)
        self.node("GlobalAveragePool", [self.dq(op.inputs[0], x, tag)], f"{tag}_y", f"{tag}_globalaveragepool")
        self.q(f"{tag}_y", op.output, out, tag, out["lo"], out["hi"])

    def _reshape_codes(self, op: Op, op_type: str, role: str, **attrs: Any) -> None:
        """MaxPool / Flatten between the input's DequantizeLinear and a QuantizeLinear with the input's scale and
        zero point (the codes pass through unchanged, as in the integer graph)."""
        x, out = self.tensor(op.inputs[0]), self.tensor(op.output)
        tag = layer_tag(op.name)
        self.node(op_type, [self.dq(op.inputs[0], x, tag)], f"{tag}_y", f"{tag}_{role}", **attrs)
        self.node("QuantizeLinear", [f"{tag}_y", *self.params(op.inputs[0], x)], out["onnx"], f"{tag}_quantize")

    def _maxpool(self, op: Op) -> None:
        self._reshape_codes(op, "MaxPool", "maxpool", **_maxpool_attrs(op))

    def _flatten(self, op: Op) -> None:
        self._reshape_codes(op, "Flatten", "flatten", axis=1)

    def _linear(self, op: Op) -> None:
        x = self.tensor(op.inputs[0])
        tag = layer_tag(op.name)
        terms = layer_terms(self.net, op, x["step"])
        codes = np.ascontiguousarray(terms["codes"].numpy().astype(np.int8).T)  # [in, out], as QGemm's B
        w, b = self.weights(tag, codes, terms["step"], terms["bias"], x["step"], 1)
        self.node("Gemm", [self.dq(op.inputs[0], x, tag), w] + ([b] if b else []), "logits", f"{tag}_gemm")


def integer_ops(graph: Any) -> list[dict[str, str]]:
    """The integer graph's ops as plain data (name, kind, fused activation), for the model metadata and reports."""
    return [{"name": op.name, "kind": op.kind, **({"act": op.act} if op.act else {}),
             **({"bn": op.bn} if op.bn else {})} for op in graph.ops]


def export_integer_onnx(net: nn.Module, path: str | Path, intermediates: bool = False,
                        check: bool = True, form: str = "int8") -> Path:
    """Write the integer-only network ``net`` (:func:`sdq_lightning.integer.integer_only`, every quantizer
    calibrated) as onnxruntime's integer graph (see the module docstring). ``intermediates``: every tensor of the
    integer graph is a graph output too (uint8 codes with their zero point, named ``t_<tensor>``), for comparing
    each code with PyTorch's. ``form``: ``"int8"`` (onnxruntime's integer operators) or ``"qdq"`` (the same codes
    and scales as QuantizeLinear / DequantizeLinear around standard float ops, see :class:`_QDQBuilder`; the
    portable form other runtimes read, and which onnxruntime fuses back into its integer kernels)."""
    from onnx import TensorProto, helper

    if form not in INTEGER_ONLY_FORMS:
        raise ValueError(f"export_integer_onnx: form must be one of {INTEGER_ONLY_FORMS}, got {form!r}")
    if not is_integer_only(net):
        raise ValueError("export_integer_onnx needs a network in the integer-only mode (sdq_lightning.integer."
                         "integer_only(net), or a run trained with integer_only=True)")
    for t in net.integer_only.graph.tensors.values():
        if not bool(net.get_submodule(t.quant).initialized):
            raise ValueError(f"the quantizer of tensor {t.name!r} was never calibrated (run one forward pass on real "
                             f"data before exporting)")
    b = _QDQBuilder(net) if form == "qdq" else _Builder(net)
    with torch.no_grad():
        b.build()
    first = next(op for op in b.graph.ops if op.kind == "conv")
    cin = net.get_submodule(first.name).in_channels
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", cin, "height", "width"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None])]
    if intermediates:
        flat = {op.output for op in b.graph.ops if op.kind == "flatten"}
        outputs += [helper.make_tensor_value_info("t_" + layer_tag(n), TensorProto.UINT8,
                                                  [None] * (2 if n in flat else 4)) for n in b.graph.tensors]
    graph = helper.make_graph(b.nodes, "sdq_integer_only", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", INTEGER_ONLY_OPSET),
                                                    helper.make_opsetid(_MS, 1)])
    model.ir_version = 10
    meta = {"sdq_form": INTEGER_ONLY_FORM, "sdq_ops": json.dumps(integer_ops(b.graph))}
    if form != "int8":
        meta["sdq_integer_form"] = form
    return save_model(model, path, meta, check)
