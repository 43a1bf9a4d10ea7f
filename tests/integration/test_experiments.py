"""Every experiment preset runs end to end on CPU with tiny limits and real (substitute) data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from app_helpers import EXPERIMENTS, TINY, assert_val_acc_is_the_last_epochs, compose_cfg
from helpers.data import digits_tree as write_digits_tree
from sdq_lightning.cli.train import run

CIFAR_ROOT = os.environ.get("SDQ_CIFAR10_ROOT")
SLOW = {"imagenet_mobilenetv2", "cifar10_resnet20", "uniform_imagenet_mobilenetv2_w4a4", "bitfusion_resnet18", "resnet18_a2",
        "uniform_imagenet_resnet18_w4a4", "uniform_cifar10_resnet20_w2", "cifar10_plan_protocol",
        "imagenet_resnet18"}  # imagenet_resnet18: 16 s, moved to keep the fast tier under 5 minutes


@pytest.fixture(scope="module")
def digits_tree(tmp_path_factory) -> Path:
    """Real digits images as a tiny ImageNet-style tree (train/, val/), 2 per class, 32x32 RGB."""
    return write_digits_tree(tmp_path_factory.mktemp("digits_tree"), per_class=2, class_name="{:02d}")


def substitute_data(name: str, digits_tree: Path) -> list[str]:
    if name.startswith(("imagenet", "bitfusion", "resnet18", "uniform_imagenet")):
        return ["trainer=cpu", f"dataset.root={digits_tree}", "dataset.image_size=64", "dataset.batch_size=8"]
    if name == "cifar10_plan_protocol":  # an ImageFolder preset: the digits tree stands in, 1 image a class held out
        return [f"dataset.root={digits_tree}", "dataset.val_size=10", "dataset.batch_size=8"]
    if "cifar10" in name:
        if CIFAR_ROOT:
            return [f"dataset.root={CIFAR_ROOT}", "dataset.download=false", "dataset.subset=64"]
        return ["dataset=digits32"]
    return []


def check_run_folder(run_dir: Path, searched: bool) -> dict:
    for name in ("config.yaml", "metrics.json", "plan.yaml", "report.md", "checkpoints/last.ckpt",
                 "plots/bits_per_layer.png", "plots/bits_vs_params.png", "plots/training_curves.png"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    plan = yaml.safe_load((run_dir / "plan.yaml").read_text())
    assert metrics["avg_bits"] == pytest.approx(plan["costs"]["avg_bits"])
    if searched:
        assert metrics["budget_met"] is True
    report = (run_dir / "report.md").read_text()
    assert "## Budget" in report and "## Bit plan" in report and "plots/bits_per_layer.png" in report
    return metrics


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in EXPERIMENTS])
def test_experiment_runs(name, tmp_path, digits_tree):
    cfg = compose_cfg([f"experiment={name}", *TINY, *substitute_data(name, digits_tree)])
    metrics = run(cfg, tmp_path / "run")
    searched = len(cfg.hardware.weight_bits) > 1
    check_run_folder(tmp_path / "run", searched)
    assert_val_acc_is_the_last_epochs(tmp_path / "run", metrics)
    if cfg.fp_teacher.enabled:
        assert (tmp_path / "run" / "fp" / "metrics.json").is_file()
    if cfg.compare.enabled:
        assert [r["run"] for r in metrics["comparison"]][0].startswith("FP")
        assert (tmp_path / "run" / "uniform" / "metrics.json").is_file()
        assert "FP vs SDQ vs uniform" in (tmp_path / "run" / "report.md").read_text()


def test_phase_search_then_train(tmp_path):
    base = ["experiment=digits_demo", "compare.enabled=false", "fp_teacher.enabled=false", *TINY]
    run(compose_cfg([*base, "phase=search", "phase.search_epochs=1"]), tmp_path / "search")
    plan = tmp_path / "search" / "plan.yaml"
    assert plan.is_file()
    metrics = run(compose_cfg([*base, "phase=train", f"phase.plan={plan}"]), tmp_path / "train")
    trained = yaml.safe_load((tmp_path / "train" / "plan.yaml").read_text())
    assert {n: lb["w_bits"] for n, lb in trained["layers"].items()} == \
        {n: lb["w_bits"] for n, lb in yaml.safe_load(plan.read_text())["layers"].items()}
    assert metrics["epochs"] == 2  # TINY's trainer.max_epochs


def test_logger_none_and_fp_run(tmp_path):
    cfg = compose_cfg(["experiment=digits_demo", "compare.enabled=false", "fp_teacher.enabled=false",
                       "sdq.enabled=false", "logger=none", *[t for t in TINY if not t.startswith("logger")]])
    metrics = run(cfg, tmp_path / "run")
    assert metrics["avg_bits"] == pytest.approx(32.0)


@pytest.mark.slow  # 34 s: torch.compile of the LSQ kernels
def test_app_with_compiled_kernels(tmp_path, recwarn):
    """sdq.runtime.kernels=compile (the app's default outside the test suite) runs, and does not fall back to eager."""
    import sdq_lightning as sq

    before = sq.get_kernels()
    try:
        cfg = compose_cfg(["experiment=digits_demo", "compare.enabled=false", "fp_teacher.enabled=false",
                           "sdq.runtime.kernels=compile", "hardware.activation_bits=4", *TINY])
        metrics = run(cfg, tmp_path / "run")
        assert sq.get_kernels() == "compile"
        assert sq.modules.fused._compiled, "no LSQ kernel was compiled: the run never quantized an activation"
    finally:
        sq.set_kernels(before)
    assert not [w for w in recwarn if "torch.compile of the LSQ kernels failed" in str(w.message)]
    check_run_folder(tmp_path / "run", searched=True)
    assert_val_acc_is_the_last_epochs(tmp_path / "run", metrics)
