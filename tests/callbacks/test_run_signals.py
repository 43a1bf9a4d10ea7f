"""What a user reads during and after a fit: phase 2 shows the plan's real cost (no search terms after the freeze),
and a run that the search did not decide, trained on too little data or ended mid-search says so, with its numbers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from test_sanity_check import ValidatedCNN
from torch.utils.data import DataLoader, TensorDataset

from sdq_lightning import SDQ

SEARCH_ONLY = ("sdq/expected_cost", "sdq/multiplier", "sdq/temperature", "sdq/budget_schedule",
               "sdq/expected_avg_bits")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def sdq_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("[SDQ]")]


def test_phase_two_logs_the_plans_cost_and_no_search_terms(digits, tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    sdq = SDQ(weight_bits=(2, 3, 4, 5, 6, 7, 8), activation_bits=4, budget={"metric": "avg_bits", "target": 3.0},
              search_epochs=2)
    trainer = L.Trainer(max_epochs=4, limit_train_batches=8, log_every_n_steps=2, callbacks=[sdq],
                        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, default_root_dir=tmp_path)
    trainer.fit(ValidatedCNN(), digits.train(), digits.test())
    rows = read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    search_steps = [r for r in rows if r.get("sdq/expected_cost_step") and int(r["step"]) < 16]
    assert search_steps and all(r["sdq/multiplier_step"] and r["sdq/temperature_step"] for r in search_steps)
    phase2 = [r for r in rows if r["epoch"] and int(r["epoch"]) >= 2 and int(r["step"]) >= 16]
    for r in phase2:
        stale = {k: v for k, v in r.items() if k.startswith(SEARCH_ONLY) and v}
        assert not stale, f"search terms logged in phase 2 (epoch {r['epoch']}, step {r['step']}): {stale}"
    assert not any(key.startswith(SEARCH_ONLY) for key in trainer.progress_bar_metrics), trainer.progress_bar_metrics
    cost = sdq.plan.average_bits
    assert cost <= 3.0
    assert math.isclose(float(trainer.progress_bar_metrics["sdq/cost"]), cost, rel_tol=1e-6)
    step_rows = [float(r["sdq/cost_step"]) for r in phase2 if r.get("sdq/cost_step")]
    epoch_rows = [float(r["sdq/cost_epoch"]) for r in phase2 if r.get("sdq/cost_epoch")]
    assert len(step_rows) >= 6 and len(epoch_rows) == 2
    assert all(math.isclose(value, cost, rel_tol=1e-6) for value in step_rows + epoch_rows)
    for rec in sdq.history[2:]:  # phase-2 epochs: the frozen model's cost is the plan's
        assert math.isclose(rec["expected_avg_bits"], cost, rel_tol=1e-6)


class Tiny(ValidatedCNN):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_search_too_short_to_reach_the_budget_warns_with_its_numbers(make_trainer, digits) -> None:
    L.seed_everything(0, verbose=False)
    sdq = SDQ(weight_bits=(1, 2, 3, 4, 5, 6, 7, 8), activation_bits=4, budget={"metric": "avg_bits", "target": 1.5},
              search_epochs=1, search={"dbp_lr": 1e-4})
    trainer = make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[sdq])
    with pytest.warns(UserWarning) as record:
        trainer.fit(Tiny(), digits.train(), digits.test())
    lines = sdq_warnings(record)
    expected = sdq.history[0]["expected_avg_bits"]
    unreached = [w for w in lines if "had not reached the budget" in w]
    assert len(unreached) == 1 and f"expected avg_bits {expected:.6g} against the target 1.5" in unreached[0]
    assert f"down to {sdq.plan.average_bits:.6g}" in unreached[0]
    changed = sdq.history[0]["projection_changed_layers"]
    projected = [w for w in lines if "the projection changed" in w]
    assert changed >= 2 and len(projected) == 1 and f"changed {changed} of 3 searched layers" in projected[0]


def test_a_tiny_training_set_warns(make_trainer, digits) -> None:
    x, y = digits.train_set.tensors
    tiny = DataLoader(TensorDataset(x[:5], y[:5]), batch_size=5)
    sdq = SDQ(weight_bits=(2,), activation_bits=4, search_epochs=0)
    with pytest.warns(UserWarning) as record:
        make_trainer(max_epochs=1, callbacks=[sdq]).fit(Tiny(), tiny)
    lines = [w for w in sdq_warnings(record) if "training set has" in w]
    assert lines == ["[SDQ] the training set has 5 samples for 10 classes (0.5 per class, fewer than 10): the "
                     "quantizer steps, the search's task gradients and the plan are estimated from almost no data; "
                     "train on more samples (the app: a larger dataset.subset)"]


def test_a_fit_that_ends_mid_search_warns(make_trainer, digits, tmp_path) -> None:
    sdq = SDQ(weight_bits=(2, 4, 8), activation_bits=4, budget={"metric": "avg_bits", "target": 4.0},
              search_epochs=2)
    with pytest.warns(UserWarning) as record:
        make_trainer(max_epochs=4, max_steps=3, callbacks=[sdq]).fit(Tiny(), digits.train())
    lines = [w for w in sdq_warnings(record) if "ended during the search" in w]
    assert len(lines) == 1 and "(max_steps=3 reached after 3 training steps; the search takes 2 epochs, 44 steps)" \
        in lines[0]
    assert sdq.plan is None and not (tmp_path / "plan.yaml").exists()


def test_a_sound_run_warns_about_none_of_it(make_trainer, digits) -> None:
    L.seed_everything(0, verbose=False)
    sdq = SDQ(weight_bits=(2, 4, 8), activation_bits=4, budget={"metric": "avg_bits", "target": 4.0},
              search_epochs=1)
    with pytest.warns() as record:  # collects every warning; none of them may be the callback's
        make_trainer(max_epochs=2, limit_train_batches=12, callbacks=[sdq]).fit(Tiny(), digits.train())
    assert sdq.plan.average_bits <= 4.0 and sdq_warnings(record) == []
