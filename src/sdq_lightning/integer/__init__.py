"""Integer-only mode: the network trained and evaluated as the integer graph onnxruntime runs (no Lightning).

>>> from sdq_lightning.integer import integer_only
>>> integer_only(net)        # net quantized and frozen at its bits: BatchNorm folded, integer forward installed
>>> net(x)                   # == onnxruntime's logits of export_integer_onnx(net, ...), bit for bit
"""

from sdq_lightning.integer.graph import IntegerGraph, Op, QTensor, trace_integer_graph
from sdq_lightning.integer.network import (
    IntegerOnly,
    activate_integer_only,
    attach_integer_only,
    bn_denominator,
    integer_forward,
    integer_only,
    is_integer_only,
    layer_terms,
)

__all__ = [
    "IntegerGraph",
    "IntegerOnly",
    "Op",
    "QTensor",
    "activate_integer_only",
    "attach_integer_only",
    "bn_denominator",
    "integer_forward",
    "integer_only",
    "is_integer_only",
    "layer_terms",
    "trace_integer_graph",
]
