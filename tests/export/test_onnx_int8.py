"""The int8 ONNX form (integer kernels in onnxruntime) vs the PyTorch fake-quantized model, and the kernel report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import timm
import torch
from torch import nn

from sdq_lightning import BitPlan, LayerBits
from sdq_lightning.export import (
    capability_report,
    export_float_onnx,
    export_onnx,
    onnx_kernels,
    report_markdown,
    run_onnx,
)

from export_helpers import build_mixed, cifar_images, mixed_bits
from helpers.data import digits_images
from helpers.ort import SATURATION, int8_saturates


def _images(n: int = 256) -> tuple[torch.Tensor, str]:
    data = cifar_images(n)
    if data is not None:
        return data[0], "CIFAR-10"
    return digits_images(1024)[0][-n:], "digits"  # without SDQ_CIFAR10_ROOT: real digits images


def _agreement(model: nn.Module, path, x: torch.Tensor, label: str) -> tuple[float, float]:
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_onnx(path, x)
    diff = float(np.abs(got - ref).max())
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    print(f"\n[{label}] int8 ONNX in onnxruntime vs PyTorch fake-quant on {len(x)} real images: "
          f"max |logit diff| = {diff:.3g}, top-1 agreement = {agree:.2%}")
    return diff, agree


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _optimized_ops(path, tmp_path) -> list[str]:
    """Op types of the graph onnxruntime runs (ORT_ENABLE_ALL), sorted."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"opt_{path.stem}.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.fixture(scope="module")
def resnet18_mixed() -> nn.Module:
    return build_mixed("resnet18", fp_steps=10)


@pytest.mark.parametrize("name", ["resnet20", pytest.param("resnet18", marks=pytest.mark.slow),
                                   pytest.param("mobilenetv2_100", marks=pytest.mark.slow)])
def test_int8_matches_pytorch_and_runs_integer_kernels(name, request, tmp_path) -> None:
    """Mixed 1..8-bit plans: every quantized layer runs an integer kernel; top-1 agrees on real images."""
    model = request.getfixturevalue({"resnet20": "resnet20_mixed", "resnet18": "resnet18_mixed",
                                     "mobilenetv2_100": "mobilenetv2_mixed"}[name])
    x, src = _images(256)
    path = export_onnx(model, tmp_path / f"{name}.onnx", x[:1])
    m = onnx.load(str(path))
    types = {onnx.TensorProto.DataType.Name(t.data_type) for t in m.graph.initializer}
    assert not types & {"INT2", "UINT2", "INT4", "UINT4"}  # 8-bit containers only
    assert {"ConvInteger", "MatMulInteger"} <= {n.op_type for n in m.graph.node}
    _, agree = _agreement(model, path, x, f"{name}, {src}")
    rep = capability_report(model, onnx_path=path, example_shape=(1, *x.shape[1:]))
    quant = [e for e in rep["layers"] if e["w_bits"] is not None and e["a_bits"] is not None]
    assert quant and all(e["ort_integer"] for e in quant), [(e["layer"], e["ort_kernels"]) for e in quant
                                                            if not e["ort_integer"]]
    assert {e["ort_kernel"] for e in quant} <= {"ConvInteger", "MatMulInteger", "MatMulIntegerToFloat"}
    one_bit = next(e for e in quant if e["w_bits"] == 1)
    assert "(+-1)" in one_bit["onnx_weight"]
    assert any("codes in 8-bit containers" in s for s in rep["not_native"])
    assert not any("int2" in s or "int4" in s for s in rep["not_native"])
    if agree < 0.999 and name == "resnet20" and int8_saturates():
        # whether the saturation flips a top-1 depends on the images (CIFAR-10 does, digits did not): the kernel and
        # report checks above ran; only the agreement is not claimed on this CPU
        pytest.xfail(f"{SATURATION}; top-1 agreement {agree:.4f}")
    assert agree >= 0.999


def test_weight_only_plan_is_a_float_graph(tmp_path) -> None:
    """FP activations: the fake-quantized weights baked into a float graph with the FP model's node structure."""
    torch.manual_seed(0)
    fp = timm.create_model("resnet20", pretrained=False, num_classes=10).eval()
    q = timm.create_model("resnet20", pretrained=False, num_classes=10)
    q.load_state_dict(fp.state_dict())
    w, _ = mixed_bits(q)
    BitPlan({n: LayerBits(w[n], None, 0, 0) for n in w}).apply(q)
    q.eval()
    x = digits_images(64)[0]
    path = export_onnx(q, tmp_path / "wonly.onnx", x[:1])
    fp_path = export_float_onnx(fp, tmp_path / "fp.onnx", x[:1])
    assert _optimized_ops(path, tmp_path) == _optimized_ops(fp_path, tmp_path)  # the FP model's kernels
    with torch.no_grad():
        ref = q(x).numpy()
    assert np.abs(run_onnx(path, x) - ref).max() < 1e-4
    rep = capability_report(q, onnx_path=path)
    for e in rep["layers"]:
        assert e["ort_kernel"] in ("Conv", "FusedConv", "Gemm") and not e["ort_integer"], e
        assert "FP activations" in e["fallback"]
    assert "FP32 (the fake-quantized weight baked in" in rep["layers"][0]["onnx_weight"]


def test_fused_form_runs_qlinearconv_and_reports_fallbacks(resnet20_mixed, tmp_path) -> None:
    x = digits_images(64)[0]
    path = export_onnx(resnet20_mixed, tmp_path / "f.onnx", x[:1], fuse_tolerance=float("inf"),
                       float_output_kernel="float")
    rep = capability_report(resnet20_mixed, onnx_path=path)
    by = {e["layer"]: e for e in rep["layers"]}
    assert by["layer1.0.conv1"]["ort_kernel"] == "QLinearConv" and by["layer1.0.conv1"]["ort_integer"]
    assert by["layer1.0.conv1"]["bias_rounding_steps"] > 0
    conv2 = by["layer1.0.conv2"]  # feeds the residual add: float output
    assert conv2["ort_kernel"] in ("Conv", "FusedConv") and "needed in float" in conv2["fallback"]
    md = report_markdown(rep)
    assert "| layer1.0.conv1 |" in md and "QLinearConv | yes |" in md and "ran in float in onnxruntime" in md
    plan = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["sdq_layers"])
    assert plan["layer1.0.conv1"]["op"] == "QLinearConv" and plan["layer1.0.conv2"]["op"] == "float"
    assert np.isfinite(run_onnx(path, x)).all()


def test_qdq_form_report_says_why_float(resnet20_mixed, tmp_path) -> None:
    x = digits_images(8)[0]
    path = export_onnx(resnet20_mixed, tmp_path / "q.onnx", x[:1], form="qdq")
    kern = onnx_kernels(path, _layers(resnet20_mixed))
    assert "ConvInteger" not in kern["conv1"] and "Conv" in kern["conv1"]
    rep = capability_report(resnet20_mixed, onnx_path=path)
    assert all(not e["ort_integer"] and "form='qdq'" in e["fallback"] for e in rep["layers"])


def _small(bn: bool, signed_out: bool = False) -> nn.Module:
    """conv(8-bit signed input) -> [BN] -> ReLU6 -> conv(4-bit input): one chain for QLinearConv."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU6() if not signed_out else nn.Identity(), nn.Conv2d(8, 4, 3, padding=1, bias=False),
               nn.Flatten(), nn.Linear(4 * 8 * 8, 5)]
    model = nn.Sequential(*layers)
    model.pretrained_cfg = {"architecture": "none"}
    names = _layers(model)
    BitPlan({n: LayerBits(b, a, 0, 0) for n, b, a in zip(names, (3, 5, 8), (8, 4, 6))}).apply(model)
    x = torch.randn(64, 3, 8, 8) * 2
    model.train()
    with torch.no_grad():
        model(x)
    if bn:
        bnm = model[1]
        with torch.no_grad():
            bnm.weight.copy_(torch.linspace(-1.5, 1.5, 8))  # negative BN scales too
            bnm.running_mean.uniform_(-0.5, 0.5)
            bnm.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_bias_free_chain_fuses_exactly_at_zero_tolerance(tmp_path) -> None:
    """No BN and no bias: QLinearConv needs no rounded bias, so it is used by default and reproduces the codes."""
    model = _small(bn=False)
    x = torch.randn(128, 3, 8, 8) * 2
    path = export_onnx(model, tmp_path / "s.onnx", x[:1])
    kern = onnx_kernels(path, _layers(model))
    assert "QLinearConv" in kern["0"] and "Clip" in kern["2"]  # ReLU6 became a clamp of the codes
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_onnx(path, x)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_negative_bn_scale_fuses(tmp_path) -> None:
    model = _small(bn=True)
    x = torch.randn(128, 3, 8, 8) * 2
    path = export_onnx(model, tmp_path / "b.onnx", x[:1], fuse_tolerance=float("inf"))
    assert "QLinearConv" in onnx_kernels(path, _layers(model))["0"]
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_onnx(path, x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95  # the rounded bias may flip a few codes
    exact = export_onnx(model, tmp_path / "e.onnx", x[:1])  # default: no rounded-bias fusion
    assert "ConvInteger" in onnx_kernels(exact, _layers(model))["0"]
    assert np.abs(run_onnx(exact, x) - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_bad_arguments_are_one_line_errors(resnet20_mixed, tmp_path) -> None:
    x = digits_images(4)[0]
    for kwargs, msg in ((dict(form="int4"), "ONNX form must be one of"),
                        (dict(float_output_kernel="fast"), "float_output_kernel must be"),
                        (dict(fuse_tolerance=-1.0), "fuse_tolerance must be >= 0")):
        with pytest.raises(ValueError, match=msg) as err:
            export_onnx(resnet20_mixed, tmp_path / "x.onnx", x[:1], **kwargs)
        assert "\n" not in str(err.value)


def test_cli_onnx_form(tmp_path, capsys) -> None:
    from sdq_lightning.cli.export import main

    (tmp_path / "run").mkdir()
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--onnx-form", "int3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--onnx-form must be one of int8, qdq" in err and "\n" not in err
