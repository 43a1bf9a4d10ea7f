"""``sdq-train ... resume=<run folder>``: an interrupted run continues in its own folder to the same result as an
uninterrupted one; a command line that changes what the run trains is one line, exit 2, and writes nothing."""

from __future__ import annotations

import csv
import json

import lightning.pytorch as pl
import pytest
import torch

from app_helpers import TINY, compose_cfg
from sdq_lightning.cli.train import run

BASE = ["experiment=digits_demo", "compare.enabled=false", "fp_teacher.enabled=false", "hardware.activation_bits=4",
        *[o for o in TINY if o not in ("trainer.max_epochs=2", "phase.search_epochs=1")],
        "trainer.max_epochs=4", "phase.search_epochs=2", "trainer.limit_train_batches=3"]


class StopAfterEpoch(pl.Callback):
    """Ends the fit after epoch ``epoch`` as an interruption would (its checkpoint is the last one written)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("stop_after", [0, pytest.param(2, marks=pytest.mark.slow)], ids=["mid_search", "mid_phase2"])
def test_a_resumed_run_ends_as_the_uninterrupted_one(tmp_path, stop_after) -> None:
    whole = run(compose_cfg(BASE), tmp_path / "whole")
    stop = f"+callbacks.stop._target_={__name__}.StopAfterEpoch"
    run(compose_cfg([*BASE, stop, f"+callbacks.stop.epoch={stop_after}"]), tmp_path / "cut")
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == stop_after
    resumed = run(compose_cfg([*BASE, f"resume={tmp_path / 'cut'}"]), tmp_path / "cut")
    assert resumed["epochs"] == whole["epochs"] == 4
    for key in ("test/acc", "val/acc", "avg_bits"):
        assert resumed[key] == whole[key], key
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert _csv_rows(tmp_path / "cut") == _csv_rows(tmp_path / "whole")
    assert not (tmp_path / "cut" / "metrics.earlier.csv").exists()


def _csv_rows(run_dir) -> list[tuple[str, str, str]]:
    """(epoch, step, val/acc) of every row of the run's metrics.csv that has a val/acc."""
    with (run_dir / "metrics.csv").open(newline="") as fh:
        return [(r["epoch"], r["step"], r["val/acc"]) for r in csv.DictReader(fh) if r.get("val/acc")]


def test_a_resumed_fp_run_keeps_the_curve_of_the_epochs_before_the_interruption(tmp_path) -> None:
    fp = [*BASE, "sdq.enabled=false"]
    whole = run(compose_cfg(fp), tmp_path / "whole")
    stop = f"+callbacks.stop._target_={__name__}.StopAfterEpoch"
    run(compose_cfg([*fp, stop, "+callbacks.stop.epoch=1"]), tmp_path / "cut")
    resumed = run(compose_cfg([*fp, f"resume={tmp_path / 'cut'}"]), tmp_path / "cut")
    assert resumed["val/acc"] == whole["val/acc"]
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert history == json.loads((tmp_path / "whole" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    rows = _csv_rows(tmp_path / "cut")
    assert [r[0] for r in rows] == ["0", "1", "2", "3"] and rows == _csv_rows(tmp_path / "whole")


@pytest.mark.parametrize(("change", "key"), [("hardware.target=3.0", "hardware.target"),
                                              ("hardware.activation_bits=8", "hardware.activation_bits")])
def test_resuming_with_another_budget_or_activation_width_is_one_line(tmp_path, monkeypatch, capsys, change,
                                                                       key) -> None:
    from sdq_lightning.cli.train import main

    folder = tmp_path / "outputs" / "runs" / "digits_demo" / "first"
    run(compose_cfg([*BASE, "trainer.max_epochs=3", "+callbacks.stop._target_=" + __name__ + ".StopAfterEpoch",
                     "+callbacks.stop.epoch=0"]), folder)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "outputs").rglob("*")}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDQ_OUTPUT_DIR", str(tmp_path / "outputs"))
    with pytest.raises(SystemExit) as exit_info:
        main([*BASE, "trainer.max_epochs=3", change, f"resume={folder}"])
    assert exit_info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: resume={folder}: the command line changes what the run "
                                                   f"trains: {key} ("), lines
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "outputs").rglob("*")} == before  # nothing new, nothing moved


def test_resume_refuses_a_folder_that_is_no_run(tmp_path, monkeypatch, capsys) -> None:
    from sdq_lightning.cli.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDQ_OUTPUT_DIR", str(tmp_path / "outputs"))
    with pytest.raises(SystemExit) as exit_info:
        main([*BASE, f"resume={tmp_path}"])
    assert exit_info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"error: resume={tmp_path}: not a run folder (no config.yaml); pass the folder the run printed "
                     "as 'run folder: ...'"]
    assert not (tmp_path / "outputs").exists()


def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    from sdq_lightning.cli.train import main

    folder = tmp_path / "outputs" / "runs" / "digits_demo" / "first"
    run(compose_cfg([*BASE, "trainer.max_epochs=3", "+callbacks.stop._target_=" + __name__ + ".StopAfterEpoch",
                     "+callbacks.stop.epoch=0"]), folder)
    ckpt = folder / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a copy cut short
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDQ_OUTPUT_DIR", str(tmp_path / "outputs"))
    with pytest.raises(SystemExit) as exit_info:
        main([*BASE, "trainer.max_epochs=3", f"resume={folder}"])
    assert exit_info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: resume={folder}: {ckpt} is not a PyTorch checkpoint")
    assert "weights_only" not in lines[0]


def test_an_option_added_since_the_run_counts_as_unchanged_only_while_unset() -> None:
    from sdq_lightning.cli.resume import changed_keys

    saved = {"sdq": {"beta": 1.0}}
    assert changed_keys(saved, {"sdq": {"beta": 1.0, "integer_only": None}}) == []
    assert changed_keys(saved, {"sdq": {"beta": 1.0, "integer_only": True}}) == ["sdq.integer_only"]
    assert changed_keys({"sdq": {"beta": 1.0, "integer_only": True}}, {"sdq": {"beta": 1.0, "integer_only": None}}) \
        == ["sdq.integer_only"]


def test_a_run_of_the_flat_sdq_node_resumes_under_the_option_groups() -> None:
    """config.yaml of a run from before the option groups: every option a key of sdq, null = the default."""
    from omegaconf import OmegaConf

    from sdq_lightning.cli.resume import changed_keys
    from sdq_lightning.options import nest_flat_node

    nulls = ("first_last_bits per_channel budget_control search_signal task_weight task_estimate probes_per_step "
             "budget_reach projection_sensitivity rounding settle batched penalty_weight penalty dbp_lr step_lr "
             "drop_threshold reinit_dbp min_steps_between_drops ebr_weighting ebr_entropy_weight teacher teacher_arch "
             "teacher_cls guard integer_only ce_weight kd_in_search").split()
    flat = {"_target_": "sdq_lightning.SDQ", "enabled": True, "weight_bits": list(range(1, 9)), "activation_bits": None,
            "budget": {"metric": "avg_bits", "target": 1.5}, "search_epochs": 4, "plan": None, "seed": 0,
            "first_last": "8bit", "include": [], "exclude": [], "reading": "progressive", "estimator": "gumbel",
            "temperature": [1.0, 0.1], "compile": "auto", "ebr_weight": 0.1, "kd_temperature": 1.0, "kd_weight": 1.0,
            "kernels": "eager", **dict.fromkeys(nulls)}
    now = {"sdq": OmegaConf.to_container(compose_cfg(["experiment=digits_demo"]).sdq, resolve=True)}
    assert changed_keys({"sdq": nest_flat_node(flat)}, now) == []
    changed = nest_flat_node({**flat, "dbp_lr": 0.3, "ebr_weight": 0.0})
    assert changed_keys({"sdq": changed}, now) == ["sdq.ebr.weight", "sdq.search.dbp_lr"]
    assert nest_flat_node(now["sdq"]) is now["sdq"]
