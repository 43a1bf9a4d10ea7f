"""sdq-export on real run folders of the Hydra app (issue 12): trained tiny on digits through the app, for every
candidate set a preset uses, exported, the ONNX model run in onnxruntime against PyTorch, the packed checkpoint
reloaded, and the reloaded network checked against the run's own test accuracy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torchmetrics.classification import MulticlassAccuracy

import sdq_lightning
from export_helpers import APP_TINY, app_test_batch, compose_app
from sdq_lightning import BitPlan
from sdq_lightning.cli.export import main
from sdq_lightning.cli.train import run
from sdq_lightning.export import load_packed, load_run_model, run_onnx

SRC = str(Path(sdq_lightning.__file__).resolve().parents[1])  # this checkout's sources, for the subprocesses

# candidate sets of the presets: cifar10_resnet20 (1..8), imagenet_* (2..8), bitfusion ({2,4,8}),
# tensorcore_int4_int8 ({4,8}); targets feasible for digits_cnn with first/last layers at 8 bits
CASES = {
    "1-8": ["hardware.weight_bits=[1,2,3,4,5,6,7,8]", "hardware.target=2.0", "hardware.activation_bits=4"],
    "2-8": ["hardware.weight_bits=[2,3,4,5,6,7,8]", "hardware.target=3.0", "hardware.activation_bits=4"],
    "2-4-8": ["hardware.weight_bits=[2,4,8]", "hardware.target=3.61", "hardware.activation_bits=8"],
    "4-8": ["hardware.weight_bits=[4,8]", "hardware.target=6.0", "hardware.activation_bits=8"],
}


def _check_export(run_dir: Path, out: Path, cfg, capsys) -> dict:
    """sdq-export the run, then: files written, ONNX == PyTorch on real images, packed == PyTorch, and the reloaded
    network reproduces the run's test accuracy (measured by the app on the same batch)."""
    capsys.readouterr()  # what the run printed
    assert main([str(run_dir), "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    for name in ("model.sdqpack", "model.onnx", "capability.md", "capability.json", "plan.yaml", "export.json"):
        assert (out / name).is_file(), name
    net, plan, _ = load_run_model(run_dir)
    x, y = app_test_batch(cfg)
    with torch.no_grad():
        ref = net(x)
    got = torch.from_numpy(run_onnx(out / "model.onnx", x))
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert (got - ref).abs().max() < 1e-4
    with torch.no_grad():
        assert torch.equal(load_packed(out / "model.sdqpack")(x), ref)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics.get("test/acc") is not None:
        acc = MulticlassAccuracy(num_classes=10)(ref, y)
        assert float(acc) == pytest.approx(metrics["test/acc"], abs=1e-6)
    return summary


@pytest.mark.parametrize("case", [c if c == "2-4-8" else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_app_run_exports(case, tmp_path, capsys):
    cfg = compose_app([*APP_TINY, *CASES[case]])
    run(cfg, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    n_cands = len(cfg.hardware.weight_bits)
    # the checkpoint is a searched one (one step per candidate): what `_candidate_index` could not read
    assert any(v.shape[:1] == (n_cands,) for k, v in ckpt["state_dict"].items() if k.endswith("weight_quant.steps"))
    summary = _check_export(tmp_path / "run", tmp_path / "out", cfg, capsys)
    assert summary["onnx_top1_agreement"] == 1.0
    plan = yaml.safe_load((tmp_path / "out" / "plan.yaml").read_text())
    assert {lb["w_bits"] for lb in plan["layers"].values()} <= set(cfg.hardware.weight_bits) | {8}


@pytest.mark.slow
def test_cli_run_folder_with_hydra_config(tmp_path):
    """The reported failure: ``sdq-train ... save_checkpoint=true`` then ``sdq-export <run> --out x`` read the
    unresolved ``.hydra/config.yaml`` (``'${dataset.in_chans}'``). Both commands in fresh processes, as a user runs
    them; then again with only Hydra's own copy of the config left."""
    env = {**os.environ, "SDQ_OUTPUT_DIR": str(tmp_path / "outputs"), "WANDB_MODE": "offline", "PYTHONPATH": SRC}
    train = subprocess.run([sys.executable, "-m", "sdq_lightning.train", *APP_TINY, *CASES["2-4-8"]], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "runs" / "digits_demo").iterdir()
    assert "${dataset.in_chans}" in (run_dir / ".hydra" / "config.yaml").read_text()
    for attempt in ("both configs", "hydra config only"):
        out = tmp_path / attempt.replace(" ", "_")
        exp = subprocess.run([sys.executable, "-m", "sdq_lightning.cli.export", str(run_dir), "--out", str(out)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert exp.returncode == 0, (attempt, exp.stderr[-2000:])
        assert json.loads(exp.stdout)["onnx_top1_agreement"] == 1.0
        assert (out / "model.onnx").is_file()
        (run_dir / "config.yaml").unlink(missing_ok=True)


@pytest.mark.slow
def test_compare_run_and_its_sub_runs_export(tmp_path, capsys):
    """A compare run writes three runs: SDQ (top), FP teacher (fp/) and uniform (uniform/); each exports."""
    cfg = compose_app([*[o for o in APP_TINY if not o.startswith(("compare.", "fp_teacher.enabled"))],
                       "compare.enabled=true", "fp_teacher.enabled=true", *CASES["1-8"]])
    run(cfg, tmp_path / "run")
    for sub in ("", "fp", "uniform"):
        run_dir = tmp_path / "run" / sub
        _check_export(run_dir, tmp_path / f"out_{sub or 'sdq'}", cfg, capsys)
    fp_plan = json.loads((tmp_path / "out_fp" / "export.json").read_text())
    assert fp_plan["files"]["onnx"].endswith("model.onnx")


def test_checkpoint_file_inside_a_run(tmp_path, capsys):
    """``sdq-export <run>/checkpoints/last.ckpt`` finds the run's config and plan one level up; a run folder
    without a checkpoint says how to get one, on one line, exit 2."""
    cfg = compose_app([*APP_TINY, *CASES["4-8"]])
    run(cfg, tmp_path / "run")
    capsys.readouterr()  # what the run printed
    assert main([str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "o"),
                 "--formats", "packed,report"]) == 0
    assert json.loads(capsys.readouterr().out)["formats"] == ["packed", "report"]
    assert (tmp_path / "o" / "model.sdqpack").is_file() and not (tmp_path / "o" / "model.onnx").exists()
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "save_checkpoint=true" in err and "\n" not in err


def test_app_integer_only_run_exports_the_integer_graph(tmp_path, capsys):
    """``sdq-train ... sdq.integer_only=true`` (search, then phase 2 in the integer-only mode) and ``sdq-export`` of
    its run folder, no option: onnxruntime's integer graph, its logits equal to the reloaded network's."""
    cfg = compose_app([*APP_TINY, *CASES["2-4-8"], "sdq.integer_only=true"])
    run(cfg, tmp_path / "run")
    summary = _check_export(tmp_path / "run", tmp_path / "out", cfg, capsys)
    assert summary["onnx_form"] == "integer_only" and summary["onnx_max_abs_diff"] == 0.0
    net, plan, _ = load_run_model(tmp_path / "run")
    assert plan.metadata.get("integer_only") is True
    x, _ = app_test_batch(cfg)
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(run_onnx(tmp_path / "out" / "model.onnx", x)), net(x))
    assert "QLinearConv" in (tmp_path / "out" / "capability.md").read_text()
    # a given plan (sdq-plan, HAWQ, another run: no integer_only in its metadata) trained in the mode exports the
    # same way: the callback marks the checkpoint's plan, so the reload rebuilds the integer graph
    given = plan.with_metadata()
    given.metadata.pop("integer_only")
    given.save(tmp_path / "given.yaml")
    assert "integer_only" not in BitPlan.load(tmp_path / "given.yaml").metadata
    cfg2 = compose_app([*APP_TINY, *CASES["2-4-8"], "sdq.integer_only=true", "phase=train",
                        f"phase.plan={tmp_path / 'given.yaml'}"])
    run(cfg2, tmp_path / "run2")
    summary2 = _check_export(tmp_path / "run2", tmp_path / "out2", cfg2, capsys)
    assert summary2["onnx_form"] == "integer_only" and summary2["onnx_max_abs_diff"] == 0.0
    assert "QLinearConv" in (tmp_path / "out2" / "capability.md").read_text()
    # a run that stored the given plan unmarked (trained before the callback marked it): the reload reads the mode
    # from the checkpoint's integer-only terms
    ckpt_path = tmp_path / "run2" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("SDQ")]
    assert ckpt["callbacks"][key]["plan"]["metadata"].pop("integer_only") is True
    torch.save(ckpt, ckpt_path)
    assert main([str(tmp_path / "run2"), "--out", str(tmp_path / "out3")]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["onnx_form"] == "integer_only"
