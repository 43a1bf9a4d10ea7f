"""Issue 12.4: a cost metric and an export format are each added by one function plus one registration, through the
public registries, and used end to end: an app run whose budget is on the toy metric, exported by sdq-export in the
toy format (the worked examples of docs/extending.md, run from the doc as written)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from export_helpers import APP_TINY, compose_app
from helpers.docs import doc_example

from sdq_lightning.budget import METRICS, Budget, LayerCost, cost_of, register_metric, unregister_metric
from sdq_lightning.cli.export import main
from sdq_lightning.cli.train import run
from sdq_lightning.export import (
    DEFAULT_FORMATS,
    FORMATS,
    export_model,
    load_run_model,
    register_export_format,
    unregister_export_format,
)
from sdq_lightning.surgery import quant_layers


@pytest.fixture(scope="module")
def registered() -> types.SimpleNamespace:
    """The doc's worked examples, run as written: the toy metric (mean squared weight bitwidth) and the toy format
    (integer codes and steps of every quantized layer in one .npz)."""
    metric = doc_example("A cost metric")       # registers mean_sq_bits
    fmt = doc_example("An export format")       # registers npz
    yield types.SimpleNamespace(mean_sq_bits=metric.mean_sq_bits, export_npz=fmt.export_npz)
    unregister_metric("mean_sq_bits")
    unregister_export_format("npz")


def test_metric_registry(registered):
    assert "mean_sq_bits" in METRICS and tuple(METRICS)[:3] == ("avg_bits", "size", "bitops")
    layers = [LayerCost(100, 0, 2, None), LayerCost(300, 0, 4, None), LayerCost(50, 0, None, None)]
    assert cost_of("mean_sq_bits", layers) == pytest.approx((100 * 4 + 300 * 16 + 50 * 1024) / 450)
    expected = cost_of("mean_sq_bits", [LayerCost(100, 0, torch.tensor(3.0, requires_grad=True), None)])
    assert isinstance(expected, torch.Tensor) and expected.requires_grad  # differentiable in the expected bits
    assert Budget("mean_sq_bits", 10.0).metric == "mean_sq_bits"
    with pytest.raises(ValueError, match="metric 'mean_sq_bits' is already registered"):
        register_metric("mean_sq_bits")(registered.mean_sq_bits)
    with pytest.raises(ValueError, match="metric name must be a letter"):
        register_metric("9lives")
    with pytest.raises(ValueError, match=r"metric must be one of \('avg_bits', 'size', 'bitops', 'mean_sq_bits'\), "
                                         r"got 'flops'"):
        cost_of("flops", layers)


def test_format_registry(registered):
    assert "npz" in FORMATS and "npz" not in DEFAULT_FORMATS
    with pytest.raises(ValueError, match="export format 'npz' is already registered"):
        register_export_format("npz")(registered.export_npz)
    with pytest.raises(ValueError, match="export format name must be a letter"):
        register_export_format("a b")


@pytest.fixture(scope="module")
def toy_run(registered, tmp_path_factory) -> Path:
    """An app run whose budget is on the toy metric: mean squared bits <= 20 (e.g. 4-bit searched layers)."""
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    cfg = compose_app([*APP_TINY, "hardware.metric=mean_sq_bits", "hardware.target=20",
                       "hardware.weight_bits=[2,3,4,5,6,7,8]", "hardware.activation_bits=8"])
    run(cfg, run_dir)
    return run_dir


def test_budget_on_the_toy_metric(registered, toy_run):
    metrics = json.loads((toy_run / "metrics.json").read_text())
    plan = yaml.safe_load((toy_run / "plan.yaml").read_text())
    assert metrics["budget_metric"] == "mean_sq_bits" and metrics["budget_met"] is True
    assert plan["metadata"]["budget"] == {"metric": "mean_sq_bits", "target": 20.0}
    assert plan["costs"]["mean_sq_bits"] <= 20.0
    layers = [LayerCost(lb["params"], lb["macs"], lb["w_bits"], lb["a_bits"]) for lb in plan["layers"].values()]
    assert plan["costs"]["mean_sq_bits"] == pytest.approx(registered.mean_sq_bits(layers, 0))
    assert max(lb["w_bits"] for lb in plan["layers"].values()) == 8  # first conv and classifier: 8 bits


def test_sdq_export_writes_the_toy_format(toy_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "npz: integer codes and steps as numpy .npz" in capsys.readouterr().out
    assert main([str(toy_run), "--out", str(tmp_path), "--formats", "npz,report"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["formats"] == ["npz", "report"] and not (tmp_path / "model.onnx").exists()
    net, plan, _ = load_run_model(toy_run)
    data = np.load(tmp_path / "model.npz")
    assert summary["npz_layers"] == len(quant_layers(net)) == 4
    for name, layer in quant_layers(net).items():
        assert int(data[f"{name}.bits"]) == plan[name] == layer.weight_quant.bits
        codes, _, _ = layer.weight_quant.integer_weight(layer.weight.detach())
        assert np.array_equal(data[f"{name}.codes"], codes.numpy())


def test_export_model_writes_the_toy_format(toy_run, tmp_path):
    net, _, _ = load_run_model(toy_run)
    summary = export_model(net, tmp_path, torch.zeros(2, 1, 8, 8), formats=["npz"])
    assert set(summary["files"]) == {"npz", "plan"} and (tmp_path / "model.npz").is_file()
