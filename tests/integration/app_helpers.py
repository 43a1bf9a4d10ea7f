"""Helpers of the app tests: compose the Hydra config, run the CLI in a subprocess, tiny run overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import sdq_lightning

CONF_DIR = Path(sdq_lightning.__file__).resolve().parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

# Tiny but real: 2 epochs (1 search + 1 train), 2 training batches, 1 val/test batch.
TINY = [
    "trainer.max_epochs=2",
    "phase.search_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "fp_teacher.epochs=1",
    "dataset.batch_size=16",
    "dataset.num_workers=0",
    "logger=csv",
]


def compose_cfg(overrides: list[str], return_hydra_config: bool = False):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=return_hydra_config)


def run_script(path: Path, args: list[str], monkeypatch) -> None:
    """Run a repository script in this process as ``python path args...`` would (its ``__main__`` block, that
    command line): no interpreter start-up and import of torch per call. ``SystemExit`` propagates."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(path), *args])
    runpy.run_path(str(path), run_name="__main__")


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SDQ_OUTPUT_DIR=str(tmp_path / "outputs"), WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("HYDRA_FULL_ERROR", None)
    # the subprocess imports the same sources as this test process (a relative PYTHONPATH would not survive cwd)
    src = str(Path(sdq_lightning.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def run_cli(args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m sdq_lightning.train ARGS`` with outputs under ``tmp_path/outputs``."""
    return subprocess.run([sys.executable, "-m", "sdq_lightning.train", *args], cwd=tmp_path, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)




def assert_val_acc_is_the_last_epochs(run_dir: Path, metrics: dict) -> None:
    """metrics.json's val/acc is the accuracy of the last epoch's validation (history.json), not a stale or missing
    value."""
    history = json.loads((run_dir / "history.json").read_text())
    assert metrics["val/acc"] == pytest.approx(history[-1]["val/acc"], rel=0, abs=1e-7), (metrics, history[-1])
