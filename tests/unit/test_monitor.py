"""callbacks/monitor.py on its own (issue 12, the callback split): the epoch record and what is logged."""

from __future__ import annotations

import types

import torch

from sdq_lightning.budget import Budget
from sdq_lightning.callbacks.monitor import epoch_record, log_epoch, log_step_terms


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


def test_logging_keeps_the_progress_bar_off_without_a_bar():
    module = Recorder()
    terms = {"kd": torch.tensor(0.3), "expected_cost": torch.tensor(2.0), "multiplier": torch.tensor(1.0)}
    log_step_terms(types.SimpleNamespace(progress_bar_callback=None), module, terms)
    assert set(module.logged) == {"sdq/kd", "sdq/expected_cost", "sdq/multiplier"}
    assert not any(kw["prog_bar"] for _, kw in module.logged.values())  # a bar value is read back every step
    log_step_terms(types.SimpleNamespace(progress_bar_callback=object()), module, terms)
    assert module.logged["sdq/kd"][1]["prog_bar"] and not module.logged["sdq/multiplier"][1]["prog_bar"]

    module = Recorder()
    log_epoch(module, {"expected_cost": 2.0, "bits": {"a": 2, "fc": None}}, searching=False, budget_target=2.0)
    assert module.logged["sdq/phase"][0] == 1.0 and module.logged["sdq/bits/a"][0] == 2.0
    assert "sdq/bits/fc" not in module.logged and "sdq/expected_avg_bits_epoch" not in module.logged
