"""The ONNX lowering registry: the worked example of docs/extending.md ("A new export lowering") is run as written,
its form is accepted by export_onnx and export_model, and onnxruntime computes the built-in qdq form's logits with
it; unknown names are one-line errors naming the registered lowerings."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import timm
import torch
from helpers.docs import doc_example
from torch import nn

import sdq_lightning  # noqa: F401  (registers resnet20)
from sdq_lightning import BitPlan, LayerBits
from sdq_lightning.export import (
    LOWERINGS,
    ONNX_FORMS,
    export_model,
    export_onnx,
    get_lowering,
    register_lowering,
    run_onnx,
    unregister_lowering,
)


@pytest.fixture(scope="module")
def qdq8():
    doc_example("A new export lowering")
    yield
    unregister_lowering("qdq8")


@pytest.fixture(scope="module")
def model_and_input() -> tuple[nn.Module, torch.Tensor]:
    """ResNet20 with weight bits 1..8 and input bits 2..8 over its layers, calibrated on a random batch."""
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    BitPlan({n: LayerBits(1 + i % 8, 2 + i % 7, 0, 0) for i, n in enumerate(names)}).apply(model)
    x = torch.randn(16, 3, 32, 32)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval(), x


def test_doc_lowering_exports_and_runs(qdq8, model_and_input, tmp_path) -> None:
    model, x = model_and_input
    assert "qdq8" in ONNX_FORMS and "qdq8" in LOWERINGS
    path = export_onnx(model, tmp_path / "m.onnx", x[:1], form="qdq8")
    m = onnx.load(path)
    assert dict((p.key, p.value) for p in m.metadata_props)["sdq_form"] == "qdq8"
    types_ = {onnx.TensorProto.DataType.Name(t.data_type) for t in m.graph.initializer}
    assert types_ <= {"FLOAT", "INT8", "UINT8", "INT64"} and "INT8" in types_  # no int2/int4 containers
    ref = export_onnx(model, tmp_path / "qdq.onnx", x[:1], form="qdq")
    np.testing.assert_array_equal(run_onnx(path, x), run_onnx(ref, x))
    with torch.no_grad():
        assert np.abs(run_onnx(path, x) - model(x).numpy()).max() < 1e-4
    summary = export_model(model, tmp_path / "out", x[:4], formats="onnx", options={"onnx_form": "qdq8"})
    assert summary["onnx_form"] == "qdq8" and summary["onnx_top1_agreement"] == 1.0


def test_unknown_lowering_is_a_one_line_error(model_and_input, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"ONNX lowering must be one of \('int8', 'qdq', 'integer_only'.*\), got "
                                         r"'tflite' \(register_lowering adds one\)") as err:
        get_lowering("tflite")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"ONNX form must be one of \('int8', 'qdq'.*\), got 'integer_only'"):
        export_onnx(model_and_input[0], tmp_path / "x.onnx", model_and_input[1][:1], form="integer_only")
    with pytest.raises(ValueError, match="ONNX lowering 'int8' is already registered"):
        register_lowering("int8", get_lowering("qdq"))
