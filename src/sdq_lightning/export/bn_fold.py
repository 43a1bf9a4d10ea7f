"""BatchNorm folding on the traced graph: what follows a Conv up to the next quantizer (``[BatchNormalization]
[Relu | Clip]``), and the per-output-channel affine map the bias and BatchNorm apply to the convolution's output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sdq_lightning.export.graph import GraphIndex, attr, key_of

__all__ = ["ConvChain", "conv_chain", "fold_batchnorm"]


@dataclass
class ConvChain:
    """A Conv's output path: its BatchNormalization and Relu/Clip nodes (None where absent), the activation's clamp
    ``[lo, hi]`` in float, and the layer whose input quantizer reads the result (None when it goes elsewhere)."""

    bn: Any = None
    act: Any = None
    lo: float = -np.inf
    hi: float = np.inf
    next: str | None = None


def conv_chain(index: GraphIndex, op: Any, layers: set[str]) -> ConvChain:
    """The chain after Conv node ``op``: each step is the single reader of the previous output; ``next`` is set when
    the chain ends in the ``sdq::ActQ`` of a layer among ``layers``."""
    c = ConvChain()
    n = index.single_consumer(op.output[0])
    if n is not None and n.op_type == "BatchNormalization" and len(n.output) == 1 and \
            all(index.const(i) is not None for i in n.input[1:5]):
        c.bn = n
        n = index.single_consumer(n.output[0])
    if n is not None and n.op_type in ("Relu", "Clip"):
        lo, hi = (0.0, np.inf) if n.op_type == "Relu" else (
            index.const(n.input[1]) if len(n.input) > 1 and n.input[1] else -np.inf,
            index.const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.inf)
        if lo is not None and hi is not None:
            c.act, c.lo, c.hi = n, float(lo), float(hi)
            n = index.single_consumer(n.output[0])
        else:
            n = None
    if n is not None and n.domain == "sdq" and n.op_type == "ActQ" and key_of(n) in layers:
        c.next = key_of(n)
    return c


def fold_batchnorm(index: GraphIndex, op: Any, bn: Any, cout: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel multiplier ``a`` (BatchNorm) and additive term ``c`` (bias and BatchNorm) in float64 with
    ``bn(op(x)) = (op(x) without bias) * a + c`` (``bn`` None: ``a = 1``, ``c`` = the bias)."""
    bias = index.const(op.input[2]).astype(np.float64) if len(op.input) > 2 and op.input[2] else np.zeros(cout)
    a, c = np.ones(cout), bias
    if bn is not None:
        gamma, beta, mean, var = (index.const(i).astype(np.float64) for i in bn.input[1:5])
        a = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
        c = a * (bias - mean) + beta
    return a, c
