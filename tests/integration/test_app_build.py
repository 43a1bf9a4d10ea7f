"""The app builds the SDQ callback, loggers and callbacks from `_target_` config nodes; the sdq node, typed by the
option classes, holds the callback's defaults and refuses a wrong type or key when composed; a dataset is added through
the public registry."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from app_helpers import TINY, assert_val_acc_is_the_last_epochs, compose_cfg
from sdq_lightning import SDQ, EBROptions, FreezeOptions, KDOptions, LayerOptions, RuntimeOptions, SearchOptions
from sdq_lightning.cli.train import run
from sdq_lightning.data import dataset_class, register_dataset, registered_datasets
from sdq_lightning.utils import build_callbacks, build_logger, build_sdq
from sdq_lightning.utils.instantiate import sdq_node

BASE = ["experiment=digits_demo", "compare.enabled=false", "fp_teacher.enabled=false"]
SDQ_DEFAULTS = {k: p.default for k, p in inspect.signature(SDQ.__init__).parameters.items() if k != "self"}
GROUPS = {"layers": LayerOptions, "search": SearchOptions, "freeze": FreezeOptions, "ebr": EBROptions, "kd": KDOptions,
          "runtime": RuntimeOptions}


def test_sdq_node_targets_the_callback_and_interpolates_hardware_and_phase():
    cfg = compose_cfg([*BASE, "hardware.target=3", "phase.search_epochs=2"])
    assert cfg.sdq._target_ == "sdq_lightning.SDQ"
    node = sdq_node(cfg)
    assert node["budget"] == {"metric": "avg_bits", "target": 3.0}
    assert node["search_epochs"] == 2 and node["weight_bits"] == tuple(cfg.hardware.weight_bits)
    assert "enabled" not in node


def test_the_node_holds_the_callbacks_defaults(tmp_path):
    cfg = compose_cfg(BASE)
    sdq = build_sdq(cfg, tmp_path)
    app_runtime = {"kernels": "eager", "compile": "auto"}  # SDQ_KERNELS=eager in the tests; CUDA graphs where there
    for group, cls in GROUPS.items():
        node = sdq_node(cfg)[group]
        defaults = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
        defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
        assert node == {**defaults, **(app_runtime if group == "runtime" else {})}, group
        if group != "runtime":
            assert getattr(sdq.options, group) == cls(), group
    assert sdq.spec.activation_bits is None  # digits_demo: null activation bits = floating point (not the default 4)
    assert SDQ_DEFAULTS["activation_bits"] == 4


def test_overrides_reach_the_callback(tmp_path):
    cfg = compose_cfg([*BASE, "sdq.search.dbp_lr=0.3", "sdq.runtime.kernels=eager", "sdq.layers.per_channel=true",
                       "sdq.search.settle=false", "sdq.ebr.weight=0", "seed=7"])
    sdq = build_sdq(cfg, tmp_path)
    assert sdq.options.search == SearchOptions(dbp_lr=0.3, settle=False)
    assert sdq.kernels == "eager" and sdq.spec.per_channel is True and sdq.spec.seed == 7
    assert sdq.losses.ebr_weight == 0.0 and sdq.save_dir == tmp_path
    uniform = build_sdq(cfg, tmp_path, weight_bits=(2,), search_epochs=0)  # what compare's uniform run passes
    assert uniform.spec.weight_bits == (2,) and uniform.search_epochs == 0
    assert build_sdq(compose_cfg([*BASE, "sdq.enabled=false"]), tmp_path) is None


@pytest.mark.parametrize("override, message", [
    ("sdq.search.settle=notabool", "Value 'notabool' is not a valid bool"),
    ("sdq.search.nope=1", "Key 'nope' not in 'SearchOptions'"),
    ("sdq.ebr_weight=0.1", "Key 'ebr_weight' not in 'SDQConfig'"),
    ("sdq.kd.temperature=warm", "Value 'warm' of type 'str' could not be converted to Float"),
])
def test_a_wrong_type_or_an_unknown_key_fails_when_the_config_is_composed(override, message):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg([*BASE, override])
    assert message in str(info.value.__cause__ or info.value)


def test_every_sdq_key_is_an_argument_of_the_callback():
    """A key of conf/sdq/default.yaml that SDQ does not take would fail at run time: catch it here."""
    cfg = compose_cfg(BASE)
    unknown = set(cfg.sdq.keys()) - set(SDQ_DEFAULTS) - {"_target_", "enabled"}
    assert not unknown, unknown
    assert set(GROUPS) <= set(cfg.sdq.keys())


def test_callbacks_and_loggers_are_named_target_entries(tmp_path):
    cfg = compose_cfg([*BASE, "+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor"])
    callbacks = build_callbacks(cfg, tmp_path)
    assert {type(c) for c in callbacks} == {ModelCheckpoint, LearningRateMonitor}
    ckpt = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    assert ckpt.dirpath == str(tmp_path / "checkpoints")
    assert build_callbacks(compose_cfg([*BASE, "save_checkpoint=false"]), tmp_path) == []
    (csv,) = build_logger(cfg, tmp_path)
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir) == tmp_path
    assert build_logger(compose_cfg([*BASE, "logger=none"]), tmp_path) is False
    with pytest.raises(ValueError, match="logger.bad must be a config node with a _target_"):
        build_logger(compose_cfg([*BASE, "+logger.bad=3"]), tmp_path)


def test_extra_callback_runs_in_the_app(tmp_path):
    cfg = compose_cfg([*BASE, *TINY, "+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor"])
    run(cfg, tmp_path / "run")
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "lr-SGD" in header  # written by the LearningRateMonitor


# ---- a dataset added through the public registry -------------------------------------------------------------


class ToyBlobs(L.LightningDataModule):
    """Ten Gaussian blobs as 1x8x8 images: class c lights up pixel row c % 8 (easy, deterministic)."""

    def __init__(self, batch_size: int = 32, num_classes: int | None = None, in_chans: int | None = None,
                 samples: int = 200) -> None:
        super().__init__()
        self.batch_size, self.samples = batch_size, samples
        self.num_classes, self.in_chans = 10, 1

    def _split(self, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(self.samples) % 10
        x = 0.3 * torch.randn(self.samples, 1, 8, 8, generator=g)
        x[torch.arange(self.samples), 0, y % 8, :] += 1.0 + (y >= 8).float()[:, None]
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_set = self._split(0), self._split(1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def test_registry_adds_a_dataset_that_the_app_runs(tmp_path):
    register_dataset("toy_blobs", ToyBlobs, replace=True)
    assert "toy_blobs" in registered_datasets() and dataset_class("toy_blobs") is ToyBlobs
    cfg = compose_cfg([*BASE, *[t for t in TINY if not t.startswith("dataset.")], "dataset=custom",
                       "dataset.name=toy_blobs", "dataset.batch_size=16", "+dataset.samples=64",
                       "~dataset.val_size"])  # digits_demo's digits-only key
    metrics = run(cfg, tmp_path / "run")
    assert_val_acc_is_the_last_epochs(tmp_path / "run", metrics)
    assert metrics["budget_met"] is True
    assert (tmp_path / "run" / "plan.yaml").is_file()


def test_registry_refuses_bad_registrations():
    with pytest.raises(TypeError, match="LightningDataModule"):
        register_dataset("not_a_dm", dict)
    register_dataset("toy_once", ToyBlobs, replace=True)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("toy_once", type("Other", (ToyBlobs,), {}))
    with pytest.raises(ValueError, match="unknown dataset.name='nope'; registered: .*digits"):
        dataset_class("nope")
    with pytest.raises(ValueError, match="cannot be imported"):
        dataset_class("digits", module="no_such_module_for_sdq")
