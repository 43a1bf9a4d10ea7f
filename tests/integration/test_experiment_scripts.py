"""The comparison script's rows are valid Hydra command lines (composed, not trained: a stand-in interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app_helpers import CONF_DIR

REPO = Path(__file__).resolve().parents[2]

# Stands in for `python -m sdq_lightning.train ARGS`: composes ARGS with the app's config and prints what matters.
STAND_IN = f"""
import json, sys
from hydra import compose, initialize_config_dir
import sdq_lightning  # registers the sdq node's schema
assert sys.argv[1:3] == ["-m", "sdq_lightning.train"], sys.argv
with initialize_config_dir({str(CONF_DIR)!r}, version_base="1.3"):
    cfg = compose("train", overrides=sys.argv[3:])
print("CFG " + json.dumps({{"name": cfg.name, "bits": list(cfg.hardware.weight_bits), "target": cfg.hardware.target,
                          "abits": cfg.hardware.activation_bits, "search": cfg.phase.search_epochs,
                          "teacher": cfg.sdq.teacher, "ebr": cfg.sdq.ebr.weight, "seed": cfg.seed,
                          "epochs": cfg.trainer.max_epochs, "init": cfg.model.init_checkpoint}}))
"""


def _run(tmp_path: Path, rows: str, **env: str) -> subprocess.CompletedProcess:
    stand_in = tmp_path / "py.sh"
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    stand_in.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "stand_in.py"} "$@"\n')
    stand_in.chmod(0o755)
    full = dict(os.environ, CIFAR10_ROOT=str(tmp_path), PY=str(stand_in), ROWS=rows, **env)
    return subprocess.run(["bash", str(REPO / "experiments" / "cifar10_compare.sh")], env=full, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # 24 s: composes five rows in a subprocess
def test_compare_rows_compose(tmp_path):
    res = _run(tmp_path, "uniform2_kd uniform2 sdq sdq_noebr sdq_nokd", EPOCHS="3", SEARCH="1", SEED="1", ABITS="4")
    assert res.returncode == 0, res.stderr[-2000:]
    cfgs = {c["name"]: c for c in (json.loads(line[4:]) for line in res.stdout.splitlines() if line.startswith("CFG "))}
    assert set(cfgs) == {f"c10cmp_{r}_a4_s1" for r in ("uniform2_kd", "uniform2", "sdq", "sdq_noebr", "sdq_nokd")}
    for c in cfgs.values():
        assert (c["epochs"], c["seed"], c["abits"]) == (3, 1, 4)
        assert c["init"] == "checkpoints/resnet20_cifar10_fp.pt"
    assert cfgs["c10cmp_uniform2_kd_a4_s1"]["bits"] == [2] and cfgs["c10cmp_uniform2_kd_a4_s1"]["search"] == 0
    assert cfgs["c10cmp_uniform2_a4_s1"]["teacher"] is None
    assert cfgs["c10cmp_sdq_a4_s1"]["bits"] == list(range(1, 9)) and cfgs["c10cmp_sdq_a4_s1"]["search"] == 1
    assert cfgs["c10cmp_sdq_a4_s1"]["teacher"] == "checkpoints/resnet20_cifar10_fp.pt"
    assert cfgs["c10cmp_sdq_noebr_a4_s1"]["ebr"] == 0 and cfgs["c10cmp_sdq_a4_s1"]["ebr"] == 0.1
    assert cfgs["c10cmp_sdq_nokd_a4_s1"]["teacher"] is None


def test_compare_unknown_row(tmp_path):
    res = _run(tmp_path, "sdq_fast")
    assert res.returncode == 2
    assert "unknown row 'sdq_fast'" in res.stderr


def test_compare_needs_data_root():
    env = {k: v for k, v in os.environ.items() if k != "CIFAR10_ROOT"}
    res = subprocess.run(["bash", str(REPO / "experiments" / "cifar10_compare.sh")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and "set CIFAR10_ROOT" in res.stderr
