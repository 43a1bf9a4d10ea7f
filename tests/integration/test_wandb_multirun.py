"""wandb offline run folder (plan table, plot images) and a 2-job multirun with its sweep summary."""

from __future__ import annotations

import json

import pytest

from app_helpers import TINY, compose_cfg, run_cli
from sdq_lightning.cli.train import run

BASE = ["experiment=digits_demo", "compare.enabled=false", "fp_teacher.enabled=false"]


def test_wandb_offline_run_has_plan_table_and_plots(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg([*BASE, *[t for t in TINY if not t.startswith("logger")], "logger=wandb"])
    run(cfg, tmp_path / "run")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    tables = list((media / "table").rglob("*.table.json"))
    assert tables and "w_bits" in json.loads(tables[0].read_text())["columns"]
    images = {p.name.split("_")[0] for p in (media / "images").rglob("*.png")}
    assert images  # bits_per_layer, bits_vs_params, training_curves
    assert any("bits_per_layer" in p.as_posix() for p in (media / "images").rglob("*.png"))
    assert list(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_multirun_two_jobs_and_sweep_summary(tmp_path):
    proc = run_cli(["-m", *BASE, *TINY, "hardware.target=2,3"], tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multirun" / "digits_demo").iterdir())
    assert len(sweeps) == 1
    sweep = sweeps[0]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").is_file())
    assert [p.name for p in jobs] == ["0", "1"]
    targets = [json.loads((p / "metrics.json").read_text())["budget_target"] for p in jobs]
    assert targets == [2.0, 3.0]
    for job in jobs:
        assert (job / "plan.yaml").is_file() and (job / "report.md").is_file()
    summary = (sweep / "sweep_summary.md").read_text()
    assert "hardware.target=2" in summary and "hardware.target=3" in summary
    assert (sweep / "pareto.png").stat().st_size > 1000
