"""QDQ ONNX export (form="qdq") run in onnxruntime vs the PyTorch fake-quantized model, on real images."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from sdq_lightning.export import capability_report, export_onnx, onnx_int_type, report_markdown, run_onnx

from export_helpers import cifar_images
from helpers.ort import exact_int8_kernels


def _compare(model, path, x: torch.Tensor, label: str) -> tuple[float, float]:
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_onnx(path, x)
    diff = float(np.abs(got - ref).max())
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    top2 = np.sort(ref, axis=1)[:, -2:]
    print(f"\n[{label}] onnxruntime vs PyTorch fake-quant on {len(x)} real images: max |logit diff| = {diff:.3g}, "
          f"top-1 agreement = {agree:.2%}, smallest PyTorch top-2 margin = {float((top2[:, 1] - top2[:, 0]).min()):.3g}")
    return diff, agree


@pytest.mark.parametrize("name", [pytest.param("resnet20", marks=exact_int8_kernels),
                                  pytest.param("mobilenetv2_100", marks=pytest.mark.slow)])
def test_onnx_matches_pytorch_on_digits(name, request, tmp_path, digits_batch) -> None:
    model = request.getfixturevalue(f"{name.split('_')[0]}_mixed")
    x, _ = digits_batch
    path = export_onnx(model, tmp_path / f"{name}.onnx", x[:1], form="qdq")
    m = onnx.load(str(path))
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not any(n.domain for n in m.graph.node)
    assert m.opset_import[0].version == 25
    types = {onnx.TensorProto.DataType.Name(t.data_type) for t in m.graph.initializer}
    assert {"INT2", "INT4", "INT8"} <= types  # weights at 1..8 bits in the narrowest types
    _, agree = _compare(model, path, x, f"{name}, digits")
    assert agree >= 0.999


@exact_int8_kernels
def test_onnx_matches_pytorch_on_cifar10(resnet20_mixed, tmp_path) -> None:
    data = cifar_images(256)
    if data is None:
        pytest.skip("set SDQ_CIFAR10_ROOT to a CIFAR-10 ImageFolder copy (test/<class>/*.jpg) to run this")
    x, _ = data
    path = export_onnx(resnet20_mixed, tmp_path / "r20.onnx", x[:1], form="qdq")
    _, agree = _compare(resnet20_mixed, path, x, "resnet20, CIFAR-10")
    assert agree >= 0.999


def test_activation_ties_round_like_pytorch(tmp_path) -> None:
    """Inputs exactly on rounding ties (k + 0.5 steps) give the codes PyTorch gives: x * fp32(1/s), half to even."""
    from torch import nn

    from sdq_lightning import BitPlan, LayerBits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False))
    model.pretrained_cfg = {"architecture": "none"}
    BitPlan({"0": LayerBits(8, 4, 0, 0)}).apply(model)
    aq = model[0].act_quant
    aq.set_state(signed=True, initialized=True)
    with torch.no_grad():
        aq.step.fill_(0.1)  # not a power of two: x / s and x * (1/s) differ at some ties
    k = torch.arange(-8, 8, dtype=torch.float32)
    x = ((k + 0.5) * torch.tensor(0.1)).reshape(1, 1, 4, 4).repeat(1, 1, 1, 1)
    x = torch.cat([x, x * 0.999999, x * 1.000001, torch.randn(5, 1, 4, 4)])
    with torch.no_grad():
        ref = model(x).numpy()
    path = export_onnx(model.eval(), tmp_path / "tie_qdq.onnx", x[:1], form="qdq")
    np.testing.assert_array_equal(run_onnx(path, x), ref)
    # int8: the same codes; the int32 accumulator is rescaled by fp32(s_x * s_w), so only the last bit may differ
    path = export_onnx(model.eval(), tmp_path / "tie_int8.onnx", x[:1], form="int8")
    np.testing.assert_allclose(run_onnx(path, x), ref, rtol=1e-6, atol=1e-7)


def test_capability_report(resnet20_mixed) -> None:
    rep = capability_report(resnet20_mixed)
    by = {e["layer"]: e for e in rep["layers"]}
    assert len(by) == 22
    assert by["conv1"]["w_bits"] == 1 and "int2 QDQ, 1-bit codes +-1" in by["conv1"]["onnx_weight"]
    three = next(e for e in rep["layers"] if e["w_bits"] == 3)
    assert three["onnx_weight"] == "int4 QDQ, values in the 3-bit range"
    a3 = next(e for e in rep["layers"] if e["a_bits"] == 3)
    assert "clipped to 3-bit range" in a3["onnx_act"]
    assert any("1-bit" in s for s in rep["not_native"])
    md = report_markdown(rep)
    assert "| conv1 |" in md and "not represented natively" in md


def test_int_types() -> None:
    assert onnx_int_type(2, False) == ("uint2", 0, 3, True)
    assert onnx_int_type(3, True) == ("int4", -8, 7, False)
    assert onnx_int_type(3, True, opset=21) == ("int4", -8, 7, False)
    assert onnx_int_type(2, True, opset=21)[0] == "int4"
    assert onnx_int_type(4, True, opset=20)[0] == "int8"
