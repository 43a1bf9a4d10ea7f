"""Integer-only mode against onnxruntime: every intermediate code and the logits of the exported integer graph equal
the PyTorch model's, on real images; the kernels onnxruntime runs; the errors for what the mode cannot express."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import timm
import torch
from torch import nn

from sdq_lightning import BitPlan, LayerBits
from sdq_lightning.export import onnx_kernels
from sdq_lightning.export.integer_only import export_integer_onnx
from sdq_lightning.integer import attach_integer_only, integer_only, trace_integer_graph

from integer_helpers import float_model, integer_model, ort_codes, plan_bits, real_images, torch_codes


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor, str]:
    return real_images(192)


def _compare(model: nn.Module, path, x: torch.Tensor, batch: int, threads: int, optimize: bool) -> list[str]:
    """Names of the tensors whose codes differ between onnxruntime and PyTorch (logits compared bit for bit)."""
    logits, codes = torch_codes(model, x)
    got = ort_codes(path, x.numpy(), batch, threads, optimize)
    assert set(got) == set(codes) | {"logits"}
    bad = [k for k, v in codes.items() if not np.array_equal(got[k], v)]
    if not np.array_equal(got["logits"], logits):
        bad.append("logits")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["w8a8", "w4a8", "mixed"])
def test_resnet20_every_code_equals_onnxruntime(kind, images, tmp_path):
    x, _, source = images
    model = integer_model(kind, x[:128])
    path = export_integer_onnx(model, tmp_path / f"{kind}.onnx", intermediates=True)
    n_codes = sum(v.size for v in torch_codes(model, x[128:])[1].values())
    for batch, threads, optimize in [(1, 1, False), (64, 2, True), (64, 1, False), (1, 2, True)]:
        xs = x[128:136] if batch == 1 else x[128:]
        assert _compare(model, path, xs, batch, threads, optimize) == [], (kind, batch, threads, optimize)
    print(f"\n[{kind}] {len(x) - 128} {source} test images: {n_codes:,} codes and the logits equal onnxruntime's")


@pytest.mark.slow
@pytest.mark.parametrize("arch, kind, must_have", [
    # depthwise convs, ReLU6 (a clip at round(6 / s) codes), linear bottlenecks (signed tensors, zero point 128)
    ("mobilenetv2_100", "mixed", {"conv", "add", "gap", "linear", "relu6", "depthwise"}),
    ("resnet18", "w4a8", {"conv", "add", "maxpool", "gap", "linear"}),  # timm's blocks (x += shortcut), max pool
])
def test_timm_networks_every_code_equals_onnxruntime(arch, kind, must_have, images, tmp_path):
    x, _, _ = images
    model = integer_model(kind, x[:32], arch=arch)
    path = export_integer_onnx(model, tmp_path / f"{arch}.onnx", intermediates=True)
    assert _compare(model, path, x[32:48], 16, 2, True) == []
    ops = model.integer_only.graph.ops
    found = {op.kind for op in ops} | {op.act for op in ops if op.act} | \
        {"depthwise" for op in ops if op.attrs.get("groups", 1) > 1}
    assert must_have <= found


def test_kernels_are_integer(images, tmp_path):
    """From onnxruntime's profile: every quantized conv runs QLinearConv, every residual add QLinearAdd, the pool
    QLinearGlobalAveragePool, the classifier QGemm; no ConvInteger and no float Conv anywhere."""
    x, _, _ = images
    model = integer_model("w8a8", x[:64])
    path = export_integer_onnx(model, tmp_path / "m.onnx")
    graph = model.integer_only.graph
    kernels = onnx_kernels(path, [op.name for op in graph.ops], (1, 3, 32, 32), threads=2)
    want = {"conv": "QLinearConv", "add": "QLinearAdd", "gap": "QLinearGlobalAveragePool", "linear": "QGemm"}
    for op in graph.ops:
        if op.kind in want:
            assert kernels[op.name] == [want[op.kind]], (op.name, kernels[op.name])
    ran = {k for ks in kernels.values() for k in ks}
    assert not ran & {"ConvInteger", "Conv", "FusedConv", "MatMulInteger", "Gemm"}
    assert sum(op.kind == "add" for op in graph.ops) == 9 and sum(op.kind == "conv" for op in graph.ops) == 21


def test_training_forward_equals_the_exact_forward(images):
    """With autograd on, the values are the exact integer ones; gradients reach weights, BatchNorm affine and
    every step, and the BatchNorm statistics do not move."""
    x, y, _ = images
    model = integer_model("w4a8", x[:64])
    with torch.no_grad():
        ref = model(x[64:96])
    model.train()
    stats = model.layer1[0].bn1.running_mean.clone()
    out = model(x[64:96])
    assert torch.equal(out.detach(), ref)
    nn.functional.cross_entropy(out, y[64:96]).backward()
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert model.layer1[0].bn1.weight.grad.abs().sum() > 0 and model.layer1[0].bn1.bias.grad.abs().sum() > 0
    assert model.layer1[0].conv1.weight_quant.steps.grad.abs().sum() > 0
    assert model.layer1[0].conv1.act_quant.step.grad.abs() > 0
    assert model.integer_only.quant["layer1_0_conv2"].step.grad.abs() > 0  # the branch before the add
    assert model.fc.bias.grad.abs().sum() > 0
    assert torch.equal(model.layer1[0].bn1.running_mean, stats)


def test_state_dict_round_trip(images):
    """A fresh model attached to the same plan loads the integer-only state and computes the same logits."""
    x, _, _ = images
    model = integer_model("mixed", x[:64])
    state = model.state_dict()
    assert state["integer_only.active"] and "integer_only.quant.layer1_0_conv2.step" in state
    fresh = float_model()
    w, a = plan_bits(fresh, "mixed")
    BitPlan({n: LayerBits(w[n], a[n], 0, 0) for n in w}, metadata={"integer_only": True}).apply(fresh)
    attach_integer_only(fresh)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x[64:96]), model(x[64:96]))


def test_fold_keeps_the_codes(images):
    """Folding BatchNorm rescales each channel's step by |gamma / sqrt(var + eps)|: the folded weight's codes are
    the unfolded weight's (codes flip sign where gamma < 0)."""
    x, _, _ = images
    model = float_model()
    BitPlan({n: LayerBits(4, 8, 0, 0) for n in plan_bits(model, "w8a8")[0]}).apply(model)
    attach_integer_only(model)
    conv, bn = model.layer2[1].conv1, model.layer2[1].bn1
    before, _, _ = conv.weight_quant.integer_weight(conv.weight.detach())
    integer_only(model)
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    after, _, _ = conv.weight_quant.integer_weight((conv.weight * a.view(-1, 1, 1, 1)).detach())
    sign = torch.sign(a).view(-1, 1, 1, 1).to(torch.int8)
    same = (after == before * sign) | (before == -8)  # -8 has no positive counterpart at 4 bits
    assert same.float().mean() > 0.999


@pytest.mark.parametrize("case, message", [
    ("fp_layer", "layer 'fc' is kept in floating point"),
    ("weight_only", "layer 'layer1.0.conv1' has a floating-point input"),
    ("bits", "tensor 'layer1.2.add' is read by layers with different input bits"),
    ("gelu", "module 'layer1.0.act1' (GELU) has no integer form"),
    ("dropout", "'drop' (Dropout, p=0.2) has no integer form"),
])
def test_errors_name_the_layer(case, message):
    model = timm.create_model("resnet20", num_classes=10, drop_rate=0.2 if case == "dropout" else 0.0)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    w = {n: 4 for n in names}
    a = {n: 8 for n in names}
    if case == "fp_layer":
        w["fc"] = a["fc"] = None
    if case == "weight_only":
        a["layer1.0.conv1"] = None
    if case == "bits":
        a["layer2.0.downsample.0"] = 4
    if case == "gelu":
        model.layer1[0].act1 = nn.GELU()
    BitPlan({n: LayerBits(w[n], a[n], 0, 0) for n in names}).apply(model)
    with pytest.raises(ValueError) as err:
        trace_integer_graph(model)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_export_needs_the_mode(tmp_path):
    model = float_model()
    BitPlan({n: LayerBits(8, 8, 0, 0) for n in plan_bits(model, "w8a8")[0]}).apply(model)
    with pytest.raises(ValueError, match="needs a network in the integer-only mode"):
        export_integer_onnx(model, tmp_path / "x.onnx")


def test_graph_metadata(images, tmp_path):
    x, _, _ = images
    model = integer_model("w8a8", x[:32])
    path = export_integer_onnx(model, tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["sdq_form"] == "integer_only" and '"kind": "add"' in meta["sdq_ops"]


def test_export_model_writes_the_integer_graph(images, tmp_path):
    """export_model (sdq-export) of an integer-only network: the integer graph with no option, logits equal to
    PyTorch's, the packed checkpoint rebuilds the same network, and the report names each op's kernel."""
    from sdq_lightning.export import export_model, load_packed, run_onnx

    x, _, _ = images
    model = integer_model("mixed", x[:32])
    summary = export_model(model, tmp_path, x[:1])
    assert summary["onnx_form"] == "integer_only" and summary["onnx_max_abs_diff"] == 0.0
    rebuilt = load_packed(tmp_path / "model.sdqpack")
    with torch.no_grad():
        ref = model(x[32:64])
        assert torch.equal(rebuilt(x[32:64]), ref)
    assert np.array_equal(run_onnx(tmp_path / "model.onnx", x[32:64]), ref.numpy())
    report = (tmp_path / "capability.md").read_text()
    assert "| layer1.0.add | add | relu | QLinearAdd" in report and "form integer_only" in report
    with pytest.raises(ValueError, match="trained integer-only: its ONNX form is 'integer_only'"):
        export_model(model, tmp_path / "qdq", x[:1], formats=["onnx"], options={"onnx_form": "qdq"})
    # the QDQ form of the same graph for QDQ readers: standard ops in the file, the same logits in onnxruntime
    summary = export_model(model, tmp_path / "iqdq", x[:1], formats=["onnx"],
                           options={"onnx_form": "integer_only_qdq"})
    assert summary["onnx_form"] == "integer_only_qdq" and summary["onnx_max_abs_diff"] == 0.0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "iqdq" / "model.onnx")).graph.node}
    assert {"Conv", "DequantizeLinear"} <= ops and "QLinearConv" not in ops
    assert np.array_equal(run_onnx(tmp_path / "iqdq" / "model.onnx", x[32:64]), ref.numpy())
