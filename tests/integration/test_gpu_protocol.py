"""experiments/gpu_cifar10_resnet20.sh end to end on the CPU (SDQ_GPU_PROTOCOL_CPU_SMOKE=1: trainer=cpu, fp32,
subset=256, batch 32, FP 1 epoch, SDQ 1 search + 1 train epoch), on the real CIFAR-10 copy with on-device data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "gpu_cifar10_resnet20.sh"
CIFAR_ROOT = os.environ.get("SDQ_CIFAR10_ROOT")


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_ROOT, reason="SDQ_CIFAR10_ROOT not set")
def test_gpu_protocol_cpu_smoke(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, SDQ_GPU_PROTOCOL_CPU_SMOKE="1", CIFAR10_ROOT=CIFAR_ROOT, WORK=str(tmp_path / "work"),
               OUT=str(out), PY=sys.executable, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["fp/metrics.json", "fp/plan.yaml", "fp/report.md", "log.txt", "sdq/metrics.json",
                     "sdq/plan.yaml", "sdq/report.md", "summary.json"]  # the device tool returns at most 8
    fp, sdq = (json.loads((out / run / "metrics.json").read_text()) for run in ("fp", "sdq"))
    for m in (fp, sdq):
        assert m["train_images_per_s"] is not None and m["train_images_per_s"] > 0
        assert 0.0 <= m["test/acc"] <= 1.0
    assert fp["budget_metric"] is None and fp["avg_bits"] == 32
    assert sdq["budget_met"] is True and sdq["avg_bits"] <= 1.93 and sdq["weight_bits"] == list(range(1, 9))
    assert sdq["activation_bits"] is None and sdq["epochs"] == 2
    overrides = " ".join(sdq["overrides"])
    for needed in ("experiment=cifar10_resnet20", "dataset.on_device=true", "sdq.teacher=", "sdq.ebr.weight=0.1",
                   "trainer.max_time="):
        assert needed in overrides
    plan = yaml.safe_load((out / "sdq" / "plan.yaml").read_text())
    assert plan["costs"]["avg_bits"] <= 1.93
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["sdq"]["rc"] == 0 and "images/s" in proc.stdout
