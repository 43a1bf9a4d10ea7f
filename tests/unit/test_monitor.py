"""callbacks/monitor.py on its own (issue 12, the callback split): the epoch record and what is logged."""

from __future__ import annotations

import types

import pytest
import torch

from sdq_lightning.budget import Budget
from sdq_lightning.callbacks.monitor import StepTermLog, epoch_record, log_epoch


class FakeCost:
    def expected(self, metric):
        return torch.tensor({"avg_bits": 2.5, "size": 1000.0}[metric], requires_grad=True)

    def current_bits(self):
        return {"conv1": 8, "layer1": 2, "fc": None}


class Recorder:
    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = (value, kwargs)


def test_epoch_record_searching_and_at_the_freeze():
    budget = Budget("size", 900.0)
    metrics = {"val/acc": torch.tensor(0.75), "train/loss": torch.tensor(0.5), "other": torch.tensor(1.0)}
    rec = epoch_record(3, "search", budget, FakeCost(), {"temperature": torch.tensor(0.4)}, torch.tensor(1.5), None,
                       metrics)
    assert rec == {"epoch": 3, "phase": "search", "budget_target": 900.0, "metric": "size", "expected_avg_bits": 2.5,
                   "expected_cost": 1000.0, "bits": {"conv1": 8, "layer1": 2, "fc": None}, "temperature":
                   rec["temperature"], "multiplier": 1.5, "val/acc": 0.75, "train/loss": 0.5}
    assert abs(rec["temperature"] - 0.4) < 1e-6
    frozen = epoch_record(4, "search", budget, FakeCost(), {}, None,
                          {"expected_avg_bits": 1.9, "expected_cost": 880.0}, {})
    assert frozen["expected_avg_bits"] == 1.9 and frozen["expected_cost"] == 880.0  # the search's, pre-projection
    assert "multiplier" not in frozen and "temperature" not in frozen
    assert epoch_record(0, "train", budget, None, {}, None, None, {})["bits"] == {}


def _trainer(bar: bool, writes: bool):
    return types.SimpleNamespace(progress_bar_callback=object() if bar else None, fast_dev_run=False,
                                 _logger_connector=types.SimpleNamespace(should_update_logs=writes))


def test_step_terms_logged_at_the_logger_steps_and_as_epoch_means():
    log, module = StepTermLog(), Recorder()
    terms = [{"kd": torch.tensor(0.5), "expected_cost": torch.tensor(2.0), "temperature": torch.tensor(1.0)},
             {"kd": torch.tensor(0.25), "expected_cost": torch.tensor(3.0), "temperature": torch.tensor(0.5)},
             {"kd": torch.tensor(0.75), "expected_cost": torch.tensor(4.0), "temperature": torch.tensor(0.25)}]
    log.step(_trainer(bar=False, writes=False), module, terms[0])
    assert module.logged == {}  # not a logging step, no bar: nothing goes through self.log
    log.step(_trainer(bar=False, writes=True), module, terms[1])
    assert set(module.logged) == {"sdq/kd_step", "sdq/expected_cost_step", "sdq/temperature_step"}
    assert float(module.logged["sdq/kd_step"][0]) == 0.25
    assert all(kw["on_step"] and not kw["on_epoch"] for _, kw in module.logged.values())
    module = Recorder()
    log.step(_trainer(bar=True, writes=False), module, terms[2])  # a bar shows its terms every step, bar only
    assert set(module.logged) == {"sdq/kd", "sdq/cost"}  # the bar's cost: expected in the search, the plan's after
    assert float(module.logged["sdq/cost"][0]) == 4.0
    assert all(kw["prog_bar"] and not kw["logger"] for _, kw in module.logged.values())
    module = Recorder()
    log.epoch_end(module)
    for key, mean in (("kd", 0.5), ("expected_cost", 3.0), ("temperature", 1.75 / 3)):
        assert float(module.logged[f"sdq/{key}_epoch"][0]) == pytest.approx(mean)
        assert float(module.logged[f"sdq/{key}"][0]) == pytest.approx(mean)
        assert module.logged[f"sdq/{key}"][1]["logger"] is False  # the logger gets the _epoch name only
    assert log.sums == {}  # the next epoch starts from zero
    module = Recorder()
    log.epoch_end(module)
    assert module.logged == {}


def test_log_epoch_records():
    module = Recorder()
    log_epoch(module, {"expected_cost": 2.0, "bits": {"a": 2, "fc": None}}, searching=False, budget_target=2.0)
    assert module.logged["sdq/phase"][0] == 1.0 and module.logged["sdq/bits/a"][0] == 2.0
    assert "sdq/bits/fc" not in module.logged and "sdq/expected_avg_bits_epoch" not in module.logged
    assert "sdq/expected_cost_epoch" not in module.logged  # phase 2: no search figures
    module = Recorder()
    log_epoch(module, {"expected_cost": 2.0, "bits": {}}, searching=False, budget_target=2.0, searched=True)
    assert module.logged["sdq/expected_cost_epoch"][0] == 2.0  # the freeze epoch searched
