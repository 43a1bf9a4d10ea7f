"""OpenVINO reads the exported ONNX files and agrees with onnxruntime (the ``openvino`` extra; skipped without it).

OpenVINO computes the integer operators in float (dequantize, float kernel, FakeQuantize), so its logits are compared
within a tolerance, not bit for bit. ``benchmarks/openvino_compare.py`` measures the same on 1,000 CIFAR-10 images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integer_helpers import float_model, integer_model, real_images

from sdq_lightning.export import export_float_onnx
from sdq_lightning.export.integer_only import export_integer_onnx

ov = pytest.importorskip("openvino")

# max |logit| difference allowed, OpenVINO against onnxruntime. Observed on this repository's ResNet20 (2-core
# AVX-512/AMX VM, OpenVINO 2026.4.1, its default bf16 inference precision; benchmarks/openvino_compare.py --refs,
# 1,000 CIFAR-10 test images, logits up to about 24): 0.163 for the float export (0.11-0.13 on 24-128 images),
# 0.918 for onnxruntime's own int8 QDQ model of it. The integer-only file (int8 form) has no observed figure (OpenVINO
# cannot read it, see test_integer_only_graph; its QDQ form is checked in test_integer_qdq.py); the int8 QDQ figure
# stands in for it, about 2x:
INT_ATOL = 2.0
FP_ATOL = 0.4  # about 2.5x the 0.163 observed


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor, str]:
    return real_images(80)  # 16 calibrate, 64 are compared


def _ort(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _openvino(path, x: np.ndarray) -> np.ndarray:
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 2})
    return compiled(x)[0]


def _check(path, x: np.ndarray, atol: float) -> None:
    ref, got = _ort(path, x), _openvino(path, x)
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    diff = float(np.abs(got - ref).max())
    assert agree >= 0.9 and diff <= atol, (agree, diff)


def test_float_graph(images, tmp_path):
    """The control: OpenVINO reads the float export of the same network and agrees with onnxruntime."""
    x, _, _ = images
    path = export_float_onnx(float_model(), tmp_path / "fp.onnx", x[:1])
    _check(path, x[16:].numpy(), FP_ATOL)


def test_integer_only_graph(images, tmp_path):
    """The integer-only file (QLinearConv / QLinearAdd / QLinearGlobalAveragePool / QGemm): OpenVINO's argmax agrees
    with onnxruntime's on at least 90 % of the images, logits within INT_ATOL. OpenVINO 2026.4.1 cannot read it (no
    conversion rule for com.microsoft.QGemm and QLinearGlobalAveragePool; its QLinearConv dequantizes per-channel
    weights along axis 1, the input channels): that known frontend error is an expected failure, any other fails."""
    x, _, _ = images
    path = export_integer_onnx(integer_model("w8a8", x[:16]), tmp_path / "int.onnx")
    try:
        ov.Core().read_model(str(path))
    except RuntimeError as e:
        if "QGemm" in str(e) or "QLinear" in str(e):
            pytest.xfail(f"OpenVINO {ov.__version__} cannot convert the integer-only graph's operators")
        raise
    _check(path, x[16:].numpy(), INT_ATOL)
