"""strategy="ddp" on CPU (gloo, 2 processes): every rank draws the same bitwidths and ends with the same plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_ddp_ranks_agree(tmp_path):
    script = Path(__file__).with_name("ddp_digits.py")
    env = {**os.environ, "PL_DISABLE_FORK": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(r0["draws"]) == len(r1["draws"]) > 10
    assert r0["draws"] == r1["draws"], "ranks drew different bitwidths"
    assert len({tuple(d) for d in r0["draws"]}) > 1, "the draws never changed: nothing was sampled"
    assert r0["plan"] == r1["plan"] and r0["avg_bits"] <= 2.5
    # parameters and quantizer state agree; BatchNorm running statistics are per-rank in plain DDP (no SyncBN)
    same = {k: v for k, v in r0["weights"].items() if "running_" not in k}
    assert same == {k: v for k, v in r1["weights"].items() if "running_" not in k}, "ranks ended with different weights"
    assert (tmp_path / "plan.yaml").is_file()
