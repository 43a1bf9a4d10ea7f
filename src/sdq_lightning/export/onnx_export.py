"""ONNX export of a frozen SDQ model, checked in onnxruntime (see ``docs/export-onnx.md``).

The export traces the model's float graph with placeholder ops where the quantizers are
(:mod:`~sdq_lightning.export.trace`), and a lowering from the registry (:mod:`~sdq_lightning.export.lowering`)
replaces them with ONNX nodes, using the shared graph utilities (:mod:`~sdq_lightning.export.graph`) and BatchNorm
folding (:mod:`~sdq_lightning.export.bn_fold`). The forms of a fake-quantized model:

``form="int8"`` (default): integer kernels; every bitwidth 1..8 is a subset of the 8-bit grid with the same step and
zero point 0, so the trained codes go into int8/uint8 containers unchanged (:mod:`~sdq_lightning.export.lower_int8`).

``form="qdq"``: QuantizeLinear/DequantizeLinear in the narrowest ONNX types (``opset`` >= 25 by default; int2/uint2
need 25, int4/uint4 need 21), the form that carries the true bitwidths (:mod:`~sdq_lightning.export.lower_qdq`).

Every node written for a layer is named ``<layer with . as _>_<role>`` so that the capability report can attribute
the kernels onnxruntime runs to layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor, nn

from sdq_lightning.export.graph import DEFAULT_OPSET, onnx_int_type, save_model
from sdq_lightning.export.lower_int8 import DEFAULT_FUSE_TOLERANCE
from sdq_lightning.export.lowering import ONNX_FORMS, LoweringContext, get_lowering
from sdq_lightning.export.trace import export_float_onnx

__all__ = ["DEFAULT_FORM", "DEFAULT_OPSET", "ONNX_FORMS", "export_float_onnx", "export_onnx", "onnx_int_type",
           "run_onnx", "save_model"]

DEFAULT_FORM = "int8"  # onnxruntime (and other int8 runtimes) run it with integer kernels


def export_onnx(model: nn.Module, path: str | Path, example_input: Tensor, opset: int = DEFAULT_OPSET,
                check: bool = True, form: str = DEFAULT_FORM, fuse_tolerance: float = DEFAULT_FUSE_TOLERANCE,
                float_output_kernel: str = "integer", **options) -> Path:
    """Write ``model`` (frozen, calibrated, eval) to ``path`` as ONNX.

    ``form="int8"`` (the default, for onnxruntime and other int8 runtimes): integer kernels (``QLinearConv``,
    ``ConvInteger``, ``MatMulInteger``) with the b-bit codes in int8/uint8 containers; ``fuse_tolerance`` and
    ``float_output_kernel`` apply to it (see :mod:`sdq_lightning.export.lower_int8`). ``form="qdq"``:
    QuantizeLinear/DequantizeLinear pairs in the narrowest ONNX types (int2/int4/int8), the form that carries the
    true bitwidths (onnxruntime runs it in float). Any other form of :data:`ONNX_FORMS` (``register_lowering``)
    gets ``options`` as its own.
    """
    if form not in ONNX_FORMS:
        raise ValueError(f"ONNX form must be one of {tuple(ONNX_FORMS)}, got {form!r}")
    if opset < 13:
        raise ValueError(f"opset must be >= 13 (per-axis DequantizeLinear), got {opset}")
    if form == "int8":
        options = {"fuse_tolerance": fuse_tolerance, "float_output_kernel": float_output_kernel, **options}
    ctx = LoweringContext(model=model, path=Path(path), example_input=example_input, opset=opset, check=check,
                          options=dict(options))
    return get_lowering(form)(ctx)


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
