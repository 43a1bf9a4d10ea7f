"""ONNX graph utilities every lowering shares: integer types, initializer and node builders, a read-only index of a
graph (producers, consumers, constants), the QDQ node groups of a quantizer, and writing a finished model.

Every node written for a layer is named ``<layer with . as _>_<role>`` (:func:`layer_tag`), so that the capability
report can attribute the kernels onnxruntime runs to layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from sdq_lightning.quantizers.functional import int_range

__all__ = ["DEFAULT_OPSET", "INT8_TYPES", "GraphIndex", "attr", "const", "emit_act_codes", "emit_act_qdq",
           "emit_weight_qdq", "finish", "int_tensor", "key_of", "layer_tag", "onnx_int_type", "save_model",
           "tensor_proto_type"]

DEFAULT_OPSET = 25
INT8_TYPES = 20  # an opset at which onnx_int_type gives int8/uint8 containers only


def onnx_int_type(bits: int, signed: bool, opset: int = DEFAULT_OPSET) -> tuple[str, int, int, bool]:
    """Narrowest ONNX integer type for a ``bits``-bit grid: ``(name, lo, hi, native)`` where ``[lo, hi]`` is the
    type's range and ``native`` says whether it equals the grid's range (else the values are clipped to it)."""
    choices = [(2, 25), (4, 21), (8, 10)]
    for width, need in choices:
        if bits <= width and opset >= need:
            lo, hi = int_range(width, signed)
            return (("int" if signed else "uint") + str(width), lo, hi, width == bits)
    raise ValueError(f"no ONNX integer type for {bits}-bit values at opset {opset}")


def tensor_proto_type(name: str) -> int:
    from onnx import TensorProto

    return getattr(TensorProto, name.upper())


def layer_tag(key: str) -> str:
    """The prefix of every node and initializer written for layer ``key``."""
    return key.replace(".", "_")


# ------------------------------------------------------------------------------------------ initializers, nodes
def const(name: str, array: np.ndarray) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array), name)


def int_tensor(name: str, type_name: str, values: np.ndarray, shape: list[int]) -> Any:
    """An initializer of ONNX integer type ``type_name`` (int8/uint8 as raw arrays, narrower types packed by onnx)."""
    from onnx import helper

    if type_name in ("int8", "uint8"):
        return const(name, values.astype(np.int8 if type_name == "int8" else np.uint8).reshape(shape))
    return helper.make_tensor(name, tensor_proto_type(type_name), shape, values.astype(np.int64).reshape(-1).tolist())


def attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def key_of(node: Any) -> str:
    """The layer name of an ``sdq::ActQ`` / ``sdq::WeightQ`` placeholder node."""
    return next(a.s.decode() for a in node.attribute if a.name == "key")


class GraphIndex:
    """Producers, consumers, graph outputs and constant values of a graph's nodes (as they were when indexed)."""

    def __init__(self, graph: Any) -> None:
        self.nodes = list(graph.node)
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer or a ``Constant`` (through ``Identity`` nodes), else None."""
        from onnx import numpy_helper

        while name not in self.inits:
            p = self.producer.get(name)
            if p is not None and p.op_type == "Constant" and p.attribute and p.attribute[0].name == "value":
                return numpy_helper.to_array(p.attribute[0].t)
            if p is None or p.op_type != "Identity":
                return None
            name = p.input[0]
        return numpy_helper.to_array(self.inits[name])

    def single_consumer(self, t: str) -> Any:
        """The one node reading ``t`` (None if several do, or ``t`` is a graph output)."""
        cons = self.consumers.get(t, [])
        return cons[0] if len(cons) == 1 and t not in self.outputs else None


# ------------------------------------------------------------------------------------------ quantizer node groups
def emit_weight_qdq(q: nn.Module, tag: str, y: str, opset: int, new_nodes: list, new_inits: list) -> None:
    """Weight codes in the narrowest integer type the opset has, then ``DequantizeLinear(step[, axis=0])`` -> ``y``."""
    from onnx import helper

    codes, step, bits = q.weight_quant.integer_weight(q.weight.detach())
    tname, _, _, _ = onnx_int_type(bits, True, opset)
    shape = list(codes.shape)
    per_ch = q.weight_quant.per_channel
    scale = step.detach().reshape(-1).float().numpy() if per_ch else step.detach().reshape(()).float().numpy()
    zshape = [shape[0]] if per_ch else []
    new_inits += [int_tensor(f"{tag}_wq", tname, codes.numpy(), shape), const(f"{tag}_wscale", scale),
                  int_tensor(f"{tag}_wzp", tname, np.zeros(zshape or [1], np.int64), zshape)]
    attrs = {"axis": 0} if per_ch else {}
    new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_wq", f"{tag}_wscale", f"{tag}_wzp"], [y],
                                      name=f"{tag}_weight_dq", **attrs))


def emit_act_codes(q: nn.Module, tag: str, x: str, out: str, opset: int, new_nodes: list, new_inits: list) -> str:
    """``Mul(x, fp32(1/step))`` [-> ``Max(Qn)`` -> ``Min(Qp)``] -> ``QuantizeLinear(scale=1)`` -> ``out`` (the input's
    integer codes, in the narrowest type the opset has); returns the codes' ONNX type name."""
    from onnx import helper

    aq = q.act_quant
    qn, qp = aq.qrange
    tname, _, _, native = onnx_int_type(aq.bits, bool(aq.signed), opset)
    s = aq.step.detach().float().reshape(())
    recip = (1.0 / s).numpy()  # the float32 reciprocal lsq_quantize multiplies by
    new_inits += [const(f"{tag}_arecip", recip), const(f"{tag}_one", np.array(1.0, np.float32)),
                  int_tensor(f"{tag}_azp", tname, np.zeros(1, np.int64), [])]
    cur = f"{tag}_ascaled"
    new_nodes.append(helper.make_node("Mul", [x, f"{tag}_arecip"], [cur], name=f"{tag}_act_mul"))
    if not native:
        new_inits += [const(f"{tag}_amin", np.array(qn, np.float32)), const(f"{tag}_amax", np.array(qp, np.float32))]
        # Max/Min, not Clip: onnxruntime's Clip+QuantizeLinear fusion rejects int2/int4 zero points
        new_nodes.append(helper.make_node("Max", [cur, f"{tag}_amin"], [f"{tag}_amaxed"], name=f"{tag}_act_lo"))
        new_nodes.append(helper.make_node("Min", [f"{tag}_amaxed", f"{tag}_amax"], [f"{tag}_aclip"],
                                          name=f"{tag}_act_hi"))
        cur = f"{tag}_aclip"
    new_nodes.append(helper.make_node("QuantizeLinear", [cur, f"{tag}_one", f"{tag}_azp"], [out],
                                      name=f"{tag}_act_q"))
    return tname


def emit_act_qdq(q: nn.Module, tag: str, x: str, y: str, opset: int, new_nodes: list, new_inits: list) -> None:
    """:func:`emit_act_codes` of ``x``, then ``DequantizeLinear(step)`` -> ``y``."""
    from onnx import helper

    emit_act_codes(q, tag, x, f"{tag}_aq", opset, new_nodes, new_inits)
    new_inits.append(const(f"{tag}_ascale", q.act_quant.step.detach().float().reshape(()).numpy()))
    new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_aq", f"{tag}_ascale", f"{tag}_azp"], [y],
                                      name=f"{tag}_act_dq"))


# ------------------------------------------------------------------------------------------------ writing
def finish(graph_model: Any, new_nodes: list, new_inits: list, drop: set[str], opset: int, check: bool,
           path: str | Path, meta: dict[str, str] | None = None) -> Path:
    """Replace the graph's nodes by ``new_nodes`` (those no graph output depends on dropped), keep the initializers
    still read (less ``drop``) plus the read ones of ``new_inits``, set ``opset``, infer shapes and save."""
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
