"""The ``qdq`` lowering: QuantizeLinear/DequantizeLinear in the narrowest ONNX integer types (int2/uint2 need opset
25, int4/uint4 21):

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

Layers kept in floating point are the float ops torch writes; onnxruntime runs the form in float.
"""

from __future__ import annotations

from pathlib import Path

from sdq_lightning.export.graph import emit_act_qdq, emit_weight_qdq, finish, key_of, layer_tag
from sdq_lightning.export.lowering import LoweringContext
from sdq_lightning.export.trace import float_graph

__all__ = ["lower_qdq"]


def lower_qdq(ctx: LoweringContext) -> Path:
    """Write ``ctx.model`` as the ``qdq`` form (see the module docstring) to ``ctx.path``."""
    graph_model, qlayers = float_graph(ctx.model, ctx.example_input)
    new_nodes: list = []
    new_inits: list = []
    drop: set[str] = set()
    inits = {t.name for t in graph_model.graph.initializer}
    weight_out = {n.output[0]: layer_tag(key_of(n))
                  for n in graph_model.graph.node if n.domain == "sdq" and n.op_type == "WeightQ"}
    for node in graph_model.graph.node:
        if node.domain != "sdq" and len(node.input) > 1 and node.input[1] in weight_out:
            node.name = f"{weight_out[node.input[1]]}_{node.op_type.lower()}"  # layer-named, for the kernel report
    for node in graph_model.graph.node:
        if node.domain != "sdq":
            new_nodes.append(node)
            continue
        key = key_of(node)
        q = qlayers[key]
        tag = layer_tag(key)
        x, y = node.input[0], node.output[0]
        if node.op_type == "WeightQ":
            if x not in inits:
                raise ValueError(f"weight of {key!r} is not a constant initializer in the exported graph")
            emit_weight_qdq(q, tag, y, ctx.opset, new_nodes, new_inits)
            drop.add(x)
        elif node.op_type == "ActQ":
            emit_act_qdq(q, tag, x, y, ctx.opset, new_nodes, new_inits)
        else:
            raise ValueError(f"unexpected placeholder op sdq::{node.op_type}")
    return finish(graph_model, new_nodes, new_inits, drop, ctx.opset, ctx.check, ctx.path, {"sdq_form": "qdq"})
