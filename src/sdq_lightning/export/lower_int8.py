"""The ``int8`` lowering: integer kernels. Every bitwidth 1..8 is a subset of the 8-bit grid with the same step and
zero point 0, so the trained codes go into int8/uint8 containers unchanged.

Per quantized layer with a quantized input and weight:

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

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdq_lightning.export.bn_fold import ConvChain, conv_chain, fold_batchnorm
from sdq_lightning.export.graph import INT8_TYPES, GraphIndex, attr, const, emit_act_codes, emit_act_qdq, \
    emit_weight_qdq, finish, int_tensor, key_of, layer_tag, tensor_proto_type
from sdq_lightning.export.lowering import LoweringContext
from sdq_lightning.export.trace import float_graph

__all__ = ["DEFAULT_FUSE_TOLERANCE", "FLOAT_OUTPUT_KERNELS", "int8_options", "lower_int8"]

DEFAULT_FUSE_TOLERANCE = 0.0  # output steps: only bit-exact QLinearConv fusion by default
FLOAT_OUTPUT_KERNELS = ("float", "integer")


def int8_options(options: Mapping[str, Any]) -> tuple[float, str]:
    """``(fuse_tolerance, float_output_kernel)`` of the options, checked (one-line ``ValueError``)."""
    kernel = options.get("float_output_kernel", "integer")
    if kernel not in FLOAT_OUTPUT_KERNELS:
        raise ValueError(f"float_output_kernel must be 'float' or 'integer', got {kernel!r}")
    tol = options.get("fuse_tolerance", DEFAULT_FUSE_TOLERANCE)
    if not tol >= 0:
        raise ValueError(f"fuse_tolerance must be >= 0 (output steps), got {tol!r}")
    return tol, kernel


def lower_int8(ctx: LoweringContext) -> Path:
    """Write ``ctx.model`` as the ``int8`` form (see the module docstring) to ``ctx.path``; options
    ``fuse_tolerance`` (output steps, default 0) and ``float_output_kernel`` (``"integer"`` or ``"float"``)."""
    tol, kernel = int8_options(ctx.options)
    graph_model, qlayers = float_graph(ctx.model, ctx.example_input)
    return _Int8Graph(graph_model, qlayers, tol, kernel).write(ctx.opset, ctx.check, ctx.path)


def _baked_weight(q: nn.Module, tag: str) -> Any:
    """The fake-quantized weight as a float32 initializer ``<tag>_wfp``."""
    with torch.no_grad():
        return const(f"{tag}_wfp", q.weight_quant(q.weight).detach().float().numpy())


class _Int8Graph:
    """One int8 lowering of a traced graph: which layers run integer kernels, which Convs fuse into QLinearConv,
    then the rewritten nodes."""

    def __init__(self, graph_model: Any, qlayers: dict[str, nn.Module], fuse_tolerance: float,
                 float_output_kernel: str) -> None:
        self.graph_model, self.qlayers = graph_model, qlayers
        self.fuse_tolerance, self.float_output_kernel = fuse_tolerance, float_output_kernel
        self.index = ix = GraphIndex(graph_model.graph)
        sdq = [n for n in ix.nodes if n.domain == "sdq"]
        self.act_node = {key_of(n): n for n in sdq if n.op_type == "ActQ"}
        self.layer_op: dict[str, Any] = {}
        for wn in (n for n in sdq if n.op_type == "WeightQ"):
            cons = ix.consumers.get(wn.output[0], [])
            if len(cons) == 1 and cons[0].op_type in ("Conv", "Gemm") and cons[0].input[1] == wn.output[0]:
                self.layer_op[key_of(wn)] = cons[0]
        self.plan: dict[str, dict[str, Any]] = {}
        for key in qlayers:
            r = self._int_reason(key)
            self.plan[key] = {"integer": r is None, "reason": r}
        self.eligible = {k for k, v in self.plan.items() if v["integer"]}
        self.chain_of = {k: conv_chain(ix, self.layer_op[k], self.eligible) for k in self.eligible
                         if self.layer_op[k].op_type == "Conv"}
        self.fused: dict[str, str] = {}  # Conv layer -> the layer whose input codes its QLinearConv writes
        self.fused_type: dict[str, str] = {}  # container of those codes
        self.codes_from: dict[str, str] = {}  # layer fed by a QLinearConv -> the producing layer
        self.terms: dict[str, dict[str, Any]] = {}
        self.codes_type: dict[str, str] = {}
        self.new_nodes: list = []
        self.new_inits: list = []
        self._decide_fusion()

    # ------------------------------------------------------------------------------------------- analysis
    def _int_reason(self, key: str) -> str | None:
        """Why layer ``key`` cannot run an integer kernel (None: it can)."""
        q = self.qlayers[key]
        if q.act_quant is None:
            return "input activation not quantized (FP activations): float kernel with the quantized weight baked in"
        if q.weight_quant is None:
            return "weight not quantized (FP weight): float kernel between activation QuantizeLinear/DequantizeLinear"
        if q.weight_quant.bits > 8 or q.act_quant.bits > 8:
            return "bits above 8 have no 8-bit integer kernel"
        op = self.layer_op.get(key)
        if op is None:
            return "the quantized weight does not feed a single Conv/Gemm in the exported graph"
        if op.input[0] != self.act_node[key].output[0]:
            return "the quantized input does not feed the Conv/Gemm directly (an op such as Pad sits in between)"
        if len(self.index.consumers.get(self.act_node[key].output[0], [])) != 1:
            return "the quantized input is used by more than one op"
        if op.op_type == "Gemm" and (attr(op, "transA", 0) or attr(op, "alpha", 1.0) != 1.0
                                     or attr(op, "beta", 1.0) != 1.0):
            return "Gemm with transA/alpha/beta is not mapped to MatMulInteger"
        return None

    def _chain(self, key: str) -> ConvChain:
        return self.chain_of.get(key) or ConvChain()

    def _folded(self, key: str) -> tuple[np.ndarray, np.ndarray, int]:
        cout = self.qlayers[key].weight.shape[0]
        a, c = fold_batchnorm(self.index, self.layer_op[key], self._chain(key).bn, cout)
        return a, c, cout

    def _weight_codes(self, key: str) -> tuple[np.ndarray, np.ndarray, int]:
        q = self.qlayers[key]
        codes, step, bits = q.weight_quant.integer_weight(q.weight.detach())
        cout = codes.shape[0]
        sw = np.broadcast_to(step.detach().double().reshape(-1).numpy(), (cout,)).copy()
        return codes.numpy().astype(np.int8), sw, bits

    def _qconv_terms(self, key: str, nxt: str) -> dict[str, Any]:
        """QLinearConv weights, scales and int32 bias of ``key`` writing the input codes of ``nxt``."""
        q = self.qlayers[key]
        sx = float(q.act_quant.step.detach().float())
        codes, sw, _ = self._weight_codes(key)
        a, cterm, _ = self._folded(key)
        sy = float(self.qlayers[nxt].act_quant.step.detach().float())
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

    def _fusion_blocked(self, key: str, nxt: str, in_type: dict[str, str]) -> str | None:
        """Why Conv ``key`` cannot become a QLinearConv writing the codes of ``nxt`` (None: it can; its terms are
        kept in ``self.terms``)."""
        aqn = self.qlayers[nxt].act_quant
        ytype = "int8" if bool(aqn.signed) else "uint8"
        if ytype != in_type[key] and ytype == "uint8" and aqn.bits <= 7:
            ytype = "int8"  # unsigned codes below 128 fit int8: QLinearConv wants one type in and out
        if ytype != in_type[key]:
            return f"QLinearConv needs one type in and out (input {in_type[key]}, next layer's codes {ytype})"
        a, _, _ = self._folded(key)
        if np.any(a == 0):
            return "a BatchNorm channel has scale 0"
        t = self._qconv_terms(key, nxt)
        self.plan[key]["bias_rounding_steps"] = t["err"]
        if np.abs(t["bias"]).max(initial=0) >= 2**31:
            return "the folded bias does not fit int32"
        if t["err"] > self.fuse_tolerance:
            return (f"QLinearConv would round the BN/bias term by up to {t['err']:.2g} output steps (> fuse_tolerance "
                    f"{self.fuse_tolerance:g})")
        self.terms[key] = t
        in_type[nxt] = ytype
        return None

    def _decide_fusion(self) -> None:
        order = {id(n): i for i, n in enumerate(self.index.nodes)}
        in_type = {k: "int8" if bool(self.qlayers[k].act_quant.signed) else "uint8" for k in self.eligible}
        for key in sorted(self.chain_of, key=lambda k: order[id(self.layer_op[k])]):
            nxt = self.chain_of[key].next
            if nxt is None:
                continue
            why = self._fusion_blocked(key, nxt, in_type)
            if why is not None:
                self.plan[key]["fusion_blocked"] = why
                continue
            self.fused[key] = nxt
            self.fused_type[key] = in_type[nxt]
            self.codes_from[nxt] = key

    def _skipped(self) -> set[int]:
        """Nodes a QLinearConv or a folded rescale replaces (BatchNorm, activation, the next layer's ActQ)."""
        skip: set[int] = set()
        for key in self.fused:
            c = self.chain_of[key]
            skip.update(id(n) for n in (c.bn, c.act, self.act_node[c.next]) if n is not None)
        for key in self.eligible - set(self.fused):
            c = self.chain_of.get(key)
            if c and c.bn is not None:
                skip.add(id(c.bn))
        return skip

    # ------------------------------------------------------------------------------------------- emission
    def _node(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> None:
        from onnx import helper

        self.new_nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))

    def _emit_codes(self, key: str) -> None:
        tag = layer_tag(key)
        self.codes_type[key] = emit_act_codes(self.qlayers[key], tag, self.act_node[key].input[0], f"{tag}_xq",
                                              INT8_TYPES, self.new_nodes, self.new_inits)

    def _emit_layer(self, key: str) -> None:
        from onnx import helper

        op = self.layer_op[key]
        tag = layer_tag(key)
        conv = op.op_type == "Conv"
        codes, sw, _ = self._weight_codes(key)
        attrs = {a_.name: helper.get_attribute_value(a_) for a_ in op.attribute} if conv else {}
        self.new_inits += [int_tensor(f"{tag}_xzp", self.codes_type[key], np.zeros(1, np.int64), []),
                           const(f"{tag}_wzp", np.array(0, np.int8))]
        if key in self.fused:
            self._emit_qlinearconv(key, tag, attrs)
            return
        self.new_inits.append(const(f"{tag}_wq", codes if conv else np.ascontiguousarray(codes.T)))
        if conv and self.float_output_kernel == "float":
            self._emit_float_conv(key, tag, attrs)
        else:
            self._emit_integer_matmul(key, tag, attrs, codes, sw)

    def _emit_qlinearconv(self, key: str, tag: str, attrs: dict[str, Any]) -> None:
        nxt, c, t = self.fused[key], self.chain_of[key], self.terms[key]
        ntag = layer_tag(nxt)
        aq = self.qlayers[nxt].act_quant
        qn, qp = aq.qrange
        ntype = self.fused_type[key]
        tlo, thi = (-128, 127) if ntype == "int8" else (0, 255)
        r = np.float32(1.0) / np.float32(aq.step.detach().float())
        lo = qn if c.lo == -np.inf else max(qn, int(np.round(np.float32(c.lo) * r)))
        hi = qp if c.hi == np.inf else min(qp, int(np.round(np.float32(c.hi) * r)))
        cout = t["wscale"].shape[0]
        self.new_inits += [const(f"{tag}_xscale", np.array(t["sx"], np.float32)),
                           const(f"{tag}_wscale", t["wscale"].astype(np.float32)),
                           const(f"{tag}_wzpc", np.zeros(cout, np.int8)),
                           const(f"{tag}_yscale", aq.step.detach().float().reshape(()).numpy()),
                           int_tensor(f"{tag}_yzp", ntype, np.zeros(1, np.int64), []),
                           const(f"{tag}_bias", t["bias"].astype(np.int32))]
        out = f"{ntag}_xq"
        sat = out if (lo, hi) == (tlo, thi) else f"{ntag}_xq_sat"
        self._node("QLinearConv", [f"{tag}_xq", f"{tag}_xscale", f"{tag}_xzp", f"{tag}_wq", f"{tag}_wscale",
                                   f"{tag}_wzpc", f"{tag}_yscale", f"{tag}_yzp", f"{tag}_bias"], [sat],
                   f"{tag}_qlinearconv", **attrs)
        if sat != out:
            self.new_inits += [int_tensor(f"{ntag}_clo", ntype, np.array([lo]), []),
                               int_tensor(f"{ntag}_chi", ntype, np.array([hi]), [])]
            self._node("Clip", [sat, f"{ntag}_clo", f"{ntag}_chi"], [out], f"{ntag}_act_clip")
        self.codes_type[nxt] = ntype
        self.new_inits.append(const(f"{tag}_wq", t["codes"]))

    def _emit_float_conv(self, key: str, tag: str, attrs: dict[str, Any]) -> None:
        """A float Conv on the dequantized input codes (``float_output_kernel="float"``)."""
        op, bn = self.layer_op[key], self._chain(key).bn
        sx = float(self.qlayers[key].act_quant.step.detach().float())
        self.new_inits.append(const(f"{tag}_xscale", np.array(sx, np.float32)))
        self._node("DequantizeLinear", [f"{tag}_xq", f"{tag}_xscale", f"{tag}_xzp"], [f"{tag}_xdq"], f"{tag}_act_dq")
        self.new_inits.append(_baked_weight(self.qlayers[key], tag))
        self._node("Conv", [f"{tag}_xdq", f"{tag}_wfp"] + list(op.input[2:]), [op.output[0]], f"{tag}_conv_float",
                   **attrs)
        if bn is not None:
            self.new_nodes.append(bn)

    def _emit_integer_matmul(self, key: str, tag: str, attrs: dict[str, Any], codes: np.ndarray,
                             sw: np.ndarray) -> None:
        """``ConvInteger`` / ``MatMulInteger`` -> ``Cast`` -> rescale (BatchNorm and bias folded in)."""
        op, bn = self.layer_op[key], self._chain(key).bn
        y = bn.output[0] if bn is not None else op.output[0]
        sx = float(self.qlayers[key].act_quant.step.detach().float())
        a, cterm, cout = self._folded(key)
        conv = op.op_type == "Conv"
        if conv:
            self.new_inits.append(const(f"{tag}_wqu", (codes.astype(np.int16) + 128).astype(np.uint8)))
            self.new_inits.append(const(f"{tag}_wzpu", np.array(128, np.uint8)))
            self._node("ConvInteger", [f"{tag}_xq", f"{tag}_wqu", f"{tag}_xzp", f"{tag}_wzpu"], [f"{tag}_acc"],
                       f"{tag}_convinteger", **attrs)
            shape = [1, cout, 1, 1]
        else:
            self._node("MatMulInteger", [f"{tag}_xq", f"{tag}_wq", f"{tag}_xzp", f"{tag}_wzp"], [f"{tag}_acc"],
                       f"{tag}_matmulinteger")
            shape = [cout]
        self._node("Cast", [f"{tag}_acc"], [f"{tag}_accf"], f"{tag}_cast", to=tensor_proto_type("float"))
        oscale = (sx * sw * a).astype(np.float32)
        if conv:
            # one pass: BatchNormalization(mean 0, var 1, epsilon 0) is acc * scale + bias per channel
            self.new_inits += [const(f"{tag}_oscale", oscale), const(f"{tag}_obias", cterm.astype(np.float32)),
                               const(f"{tag}_omean", np.zeros(cout, np.float32)),
                               const(f"{tag}_ovar", np.ones(cout, np.float32))]
            self._node("BatchNormalization", [f"{tag}_accf", f"{tag}_oscale", f"{tag}_obias", f"{tag}_omean",
                                              f"{tag}_ovar"], [y], f"{tag}_rescale", epsilon=0.0)
            return
        self.new_inits.append(const(f"{tag}_oscale", oscale.reshape(shape)))
        has_add = bool(np.any(cterm != 0)) or (len(op.input) > 2 and bool(op.input[2]))
        self._node("Mul", [f"{tag}_accf", f"{tag}_oscale"], [f"{tag}_scaled" if has_add else y], f"{tag}_rescale")
        if has_add:
            self.new_inits.append(const(f"{tag}_obias", cterm.astype(np.float32).reshape(shape)))
            self._node("Add", [f"{tag}_scaled", f"{tag}_obias"], [y], f"{tag}_bias_add")

    def _emit_placeholder(self, node: Any, drop: set[str]) -> None:
        """An ``sdq`` node: input codes of an integer layer, or the QDQ / baked weight of a float one."""
        key = key_of(node)
        q = self.qlayers[key]
        tag = layer_tag(key)
        if node.op_type == "WeightQ":
            drop.add(node.input[0])
        if key in self.eligible:
            if node.op_type == "ActQ" and key not in self.codes_from:
                self._emit_codes(key)
        elif node.op_type == "ActQ":
            emit_act_qdq(q, tag, node.input[0], node.output[0], INT8_TYPES, self.new_nodes, self.new_inits)
        elif q.act_quant is not None:
            emit_weight_qdq(q, tag, node.output[0], INT8_TYPES, self.new_nodes, self.new_inits)
        else:  # weight-only: the fake-quantized weight as a float initializer
            self.new_inits.append(_baked_weight(q, tag))
            for cons in self.index.consumers.get(node.output[0], []):
                for i, name in enumerate(cons.input):
                    if name == node.output[0]:
                        cons.input[i] = f"{tag}_wfp"
                cons.name = f"{tag}_conv_float" if cons.op_type == "Conv" else f"{tag}_{cons.op_type.lower()}"

    def _record_ops(self) -> None:
        """The kernel each layer got, in ``self.plan`` (written to the metadata)."""
        for key, v in self.plan.items():
            if not v["integer"]:
                v["op"] = "float"
                continue
            conv = self.layer_op[key].op_type == "Conv"
            if key in self.fused:
                v.update(op="QLinearConv", output=f"integer input codes of {self.fused[key]}")
            elif conv and self.float_output_kernel == "float":
                why = v.pop("fusion_blocked", None) or "its output is needed in float (residual add, graph output, " \
                    "or an op other than BatchNormalization/Relu/Clip before the next quantizer)"
                v.update(integer=False, op="float", output="float",
                         reason=f"{why}; onnxruntime's integer kernel with a float output (ConvInteger) is slower "
                                f"than its float Conv, so the float Conv runs on the dequantized codes "
                                f"(float_output_kernel='float')")
            else:
                v.update(op="ConvInteger" if conv else "MatMulInteger", output="float")

    def write(self, opset: int, check: bool, path: str | Path) -> Path:
        skip = self._skipped()
        layer_of = {id(self.layer_op[k]): k for k in self.eligible}
        drop: set[str] = set()
        for node in self.index.nodes:
            if id(node) in skip:
                continue
            if node.domain == "sdq":
                self._emit_placeholder(node, drop)
            elif id(node) in layer_of:
                self._emit_layer(layer_of[id(node)])
            else:
                self.new_nodes.append(node)
        self._record_ops()
        meta = {"sdq_form": "int8", "sdq_fuse_tolerance": repr(self.fuse_tolerance),
                "sdq_float_output_kernel": self.float_output_kernel, "sdq_layers": json.dumps(self.plan)}
        return finish(self.graph_model, self.new_nodes, self.new_inits, drop, opset, check, path, meta)
