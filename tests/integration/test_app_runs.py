"""What a run tells its user: config printing without data, the run folder and summary at the end, train.log."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from app_helpers import TINY, compose_cfg, run_cli
from sdq_lightning.cli.run import summary_lines
from sdq_lightning.cli.train import run

BASE = ["experiment=digits_demo", "compare.enabled=false", "fp_teacher.enabled=false"]


def test_printing_a_config_needs_no_data(tmp_path):
    """Issue 10.5: `sdq-train --cfg job experiment=imagenet_resnet18` (a README command) demanded dataset.root."""
    from sdq_lightning.cli.precheck import precheck
    from sdq_lightning.cli.train import CONF_DIR

    for what in ("job", "hydra", "all"):
        assert precheck(["--cfg", what, "experiment=imagenet_resnet18"], CONF_DIR) is None
    cfg = compose_cfg(["experiment=imagenet_resnet18"])
    assert OmegaConf.is_missing(cfg.dataset, "root") and cfg.sdq._target_ == "sdq_lightning.SDQ"


@pytest.mark.slow
def test_printing_a_config_in_a_process_needs_no_data(tmp_path):
    """The same through the command line: Hydra prints the config and exits, no run folder."""
    proc = run_cli(["--cfg", "job", "experiment=imagenet_resnet18"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "root: ???" in proc.stdout and "_target_: sdq_lightning.SDQ" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_help_text_documents_the_default_budget():
    help_cfg = compose_cfg([], return_hydra_config=True).hydra.help
    text = help_cfg.header + help_cfg.footer
    assert help_cfg.app_name == "sdq-train"
    assert "average" in text and "weight bits <= 2.0" in text and "hardware.target" in text


@pytest.mark.slow
def test_help_documents_the_default_budget(tmp_path):
    proc = run_cli(["--help"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "average" in proc.stdout and "weight bits <= 2.0" in proc.stdout and "hardware.target" in proc.stdout


def test_summary_lines():
    metrics = {"name": "x", "test/acc": 0.5, "val/acc": 0.25, "avg_bits": 1.9, "budget_metric": "avg_bits",
               "budget_target": 2.0, "budget_cost": 1.9, "budget_met": True}
    lines = summary_lines(metrics, "/some/run")
    assert lines[0] == "x: test/acc 50.00 %, val/acc 25.00 %, avg bits 1.900"
    assert lines[1] == "plan cost avg_bits = 1.9 vs budget <= 2: met"
    assert lines[2].startswith("run folder: ") and lines[2].endswith("run")
    over = summary_lines({**metrics, "budget_cost": 2.5, "budget_met": False}, "r")
    assert over[1].endswith("NOT met")
    fp = summary_lines({"name": "fp", "test/acc": None, "val/acc": 0.5, "avg_bits": 32.0, "budget_metric": None}, "r")
    assert "test/acc n/a" in fp[0] and fp[1] == "floating point (no SDQ, no budget)"


def test_single_run_prints_summary(tmp_path, capsys):
    """Issue 10.6: single runs never said where the results went."""
    metrics = run(compose_cfg([*BASE, *TINY]), tmp_path / "run")
    out = capsys.readouterr().out
    assert f"run folder: {(tmp_path / 'run').resolve()}" in out
    assert f"avg bits {metrics['avg_bits']:.3f}" in out and "vs budget <= 1.5: met" in out
    assert metrics["budget_cost"] == pytest.approx(metrics["avg_bits"])
    # issue 13: the search is visible: per-layer expected bits and the controller over the steps, in the report
    import json

    trace = json.loads((tmp_path / "run" / "search_trace.json").read_text())
    assert trace["step"] and len(trace["expected_bits"]) == len(trace["step"]) == len(trace["control"])
    assert (tmp_path / "run" / "plots" / "search_trace.png").stat().st_size > 10_000
    assert "plots/search_trace.png" in (tmp_path / "run" / "report.md").read_text()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    frozen = [h for h in history if h.get("frozen")]
    assert len(frozen) == 1 and isinstance(frozen[0]["projection_changed_layers"], int)
    assert "expected_avg_bits" in frozen[0]


@pytest.mark.slow
def test_cli_run_writes_train_log_and_summary(tmp_path):
    """Issues 10.6 and 10.9: the CLI run prints its folder and summary; train.log holds the run's log lines."""
    proc = run_cli([*BASE, *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs" / "digits_demo").iterdir()
    assert f"run folder: {run_dir}" in proc.stdout and "plan cost avg_bits" in proc.stdout
    log = (run_dir / "train.log").read_text()
    assert "[SDQ] froze the plan" in log  # Lightning/SDQ lines (rank_zero_info) reach Hydra's file
    assert "budget avg_bits <= 1.5" in log and f"run folder: {run_dir}" in log
    assert proc.stdout.count("[SDQ] froze the plan") == 1  # on the console once, not twice


@pytest.mark.slow
def test_optuna_sweep_is_quiet(tmp_path):
    """Issue 10.9: the Optuna sweep printed 7 `[HYDRA] setup plugin alembic...` lines."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli(["-m", *BASE, *TINY, "sweep=optuna", "hydra.sweeper.n_trials=1"], tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alembic" not in proc.stdout + proc.stderr
    assert "Best parameters" in proc.stdout + proc.stderr or "best_value" in proc.stdout + proc.stderr
