"""Every config group option and every experiment composes; sweeper and launcher plugins resolve."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from app_helpers import CONF_DIR, EXPERIMENTS, compose_cfg
from sdq_lightning.data import registered_datasets

PAPER = {  # experiment: (avg weight-bit target, activation bits) from the paper's table
    "cifar10_resnet20": (1.93, None),
    "imagenet_resnet18": (3.61, 4),
    "imagenet_mobilenetv2": (3.66, 4),
    "bitfusion_resnet18": (3.61, 8),
    "resnet18_a2": (3.0, 2),
}


def test_required_experiments_exist():
    for name in [*PAPER, "digits_demo", "uniform_cifar10_resnet20_w2", "uniform_imagenet_resnet18_w4a4"]:
        assert name in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = compose_cfg([f"experiment={name}"])
    assert cfg.name == name
    assert cfg.model._target_.startswith("sdq_lightning.")
    assert cfg.dataset.name in registered_datasets()  # the app's datamodule builder looks it up
    assert cfg.sdq._target_ == "sdq_lightning.SDQ"
    if name in PAPER:
        target, abits = PAPER[name]
        assert cfg.hardware.target == pytest.approx(target)
        assert cfg.hardware.activation_bits == abits
    if name.startswith("uniform_"):
        assert len(cfg.hardware.weight_bits) == 1 and cfg.phase.search_epochs == 0


def test_bitfusion_candidates():
    cfg = compose_cfg(["experiment=bitfusion_resnet18"])
    assert list(cfg.hardware.weight_bits) == [2, 4, 8] and cfg.hardware.activation_bits == 8


@pytest.mark.parametrize("group", ["model", "dataset", "hardware", "phase", "trainer", "logger"])
def test_every_group_option_composes(group):
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert options
    for option in options:
        cfg = compose_cfg([f"{group}={option}", "++dataset.root=/data" if group == "dataset" else "seed=0",
                           "dataset.name=digits" if option == "custom" else "seed=0",
                           "phase.plan=p.yaml" if option == "train" else "seed=0"])
        OmegaConf.to_container(cfg.trainer, resolve=True)


def test_groups_have_the_issue_options():
    have = {g: {p.stem for p in (CONF_DIR / g).glob("*.yaml")} for g in
            ("model", "dataset", "hardware", "phase", "trainer", "logger")}
    assert {"resnet20", "resnet18", "mobilenetv2_100", "digits_cnn"} <= have["model"]
    assert {"cifar10", "imagefolder", "digits"} <= have["dataset"]
    assert {"avg_bits", "size", "bitops", "tensorcore_int4_int8", "bitfusion"} <= have["hardware"]
    assert {"full", "search", "train"} <= have["phase"]
    assert {"cpu", "gpu", "ddp", "ddp_cpu", "ddp_multinode"} <= have["trainer"]
    assert {"wandb", "csv", "none"} <= have["logger"]


def test_any_timm_backbone_by_override():
    assert compose_cfg(["model.backbone=efficientnet_b0"]).model.backbone == "efficientnet_b0"


def test_hardware_target_overridable_and_sweepable():
    assert compose_cfg(["hardware.target=3"]).hardware.target == 3


def test_optuna_sweeper_and_submitit_launcher_compose():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["sweep=optuna", "launcher=submitit_slurm", "trainer=ddp_multinode"],
                      return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/acc"
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.nodes == 2
    assert cfg.hydra.callbacks.sweep_summary._target_ == "sdq_lightning.report.sweep.SweepSummaryCallback"


def test_conf_symlink_points_at_package_configs():
    from pathlib import Path

    top = Path(__file__).resolve().parents[2] / "conf"
    if top.exists():
        assert top.resolve() == CONF_DIR
