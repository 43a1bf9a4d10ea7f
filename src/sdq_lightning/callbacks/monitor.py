"""What the SDQ callback records and logs (monitoring), apart from what it does.

* every training step: the callback's terms (search: ``sdq/expected_cost``, ``sdq/budget_schedule``,
  ``sdq/multiplier``, ``sdq/temperature``; phase 2: ``sdq/cost``, the frozen plan's cost under the budget metric;
  both: ``sdq/kd``, ``sdq/ebr``) summed on their device, logged as ``sdq/<name>_step`` at the logger's steps and as
  epoch means (``sdq/<name>_epoch``; :class:`StepTermLog`); values stay device tensors (or host tensors) and go to
  the progress bar only when there is one, because Lightning reads every progress-bar value back to the host after
  every step (a device sync on a GPU);
* every epoch end: one history record (the rows of ``history.json`` and of the report) with the expected cost, the
  layers' bits, the controller's multiplier and the trainer's metrics, and, at the freeze epoch, the search's own
  figures before the projection; logged as ``sdq/*_epoch``, ``sdq/phase``, ``sdq/budget_target``, ``sdq/bits/<layer>``.

Plain functions over what the callback holds, tested on their own in ``tests/unit/test_monitor.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["PROGRESS_BAR_TERMS", "StepTermLog", "epoch_record", "log_epoch"]

# The progress bar's name for each term it shows. Lightning keeps a bar value until the key is logged again, so the
# search's expected cost and phase 2's plan cost share one key: after the freeze the bar shows the plan's cost.
PROGRESS_BAR_TERMS = {"kd": "kd", "expected_cost": "cost", "cost": "cost"}
RECORDED_METRICS = ("val/acc", "val/loss", "train/loss", "train/acc")


class StepTermLog:
    """The callback's per-step terms, logged as ``sdq/<name>_step`` at the steps the logger writes
    (``log_every_n_steps``) and as ``sdq/<name>_epoch`` (the epoch mean) at the epoch end; ``sdq/<name>`` in
    ``trainer.callback_metrics`` is the epoch mean, the names Lightning gives a value logged on step and on epoch.

    Every step adds each term into a running sum on its device (one in-place add, no host read); ``self.log`` runs
    only on logging steps and at the epoch end, because ``self.log(on_step=True, on_epoch=True)`` every step costs
    host time and kernel launches per term (``benchmarks/app_host_time.py`` measures them), which on a GPU add to
    every step. With a progress bar, the bar's terms are also logged every step (to the bar only). After a resume from a
    mid-epoch checkpoint the epoch mean covers the steps after the resume."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, terms: Mapping[str, Tensor]) -> None:
        """Accumulate this step's terms; log them if the logger writes this step."""
        for key, value in terms.items():
            value = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
            total = self.sums.get(key)
            if total is None or total.device != value.device:
                self.sums[key], self.counts[key] = value.float().clone(), 1
            else:
                total.add_(value)
                self.counts[key] += 1
        bar = trainer.progress_bar_callback is not None
        connector = getattr(trainer, "_logger_connector", None)
        write = bool(getattr(connector, "should_update_logs", True)) or bool(getattr(trainer, "fast_dev_run", False))
        for key, value in terms.items():
            if write:
                pl_module.log(f"sdq/{key}_step", value, on_step=True, on_epoch=False, batch_size=1)
            if bar and key in PROGRESS_BAR_TERMS:  # Lightning reads a bar value back every step: only with a bar
                pl_module.log(f"sdq/{PROGRESS_BAR_TERMS[key]}", value, on_step=True, on_epoch=False, prog_bar=True,
                              logger=False, batch_size=1)

    def epoch_end(self, pl_module: pl.LightningModule) -> None:
        """Log the epoch means and start the next epoch's sums."""
        for key, total in self.sums.items():
            mean = total / self.counts[key]
            pl_module.log(f"sdq/{key}_epoch", mean, on_step=False, on_epoch=True, batch_size=1)
            pl_module.log(f"sdq/{key}", mean, on_step=False, on_epoch=True, logger=False, batch_size=1)
        self.sums, self.counts = {}, {}


def epoch_record(epoch: int, phase: str, budget: Any, cost_model: Any, terms: Mapping[str, Any],
                 multiplier: Tensor | None, freeze_info: Mapping[str, Any] | None,
                 callback_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The history record of an epoch (reads the device once per value: call at epoch ends only).

    ``phase``: the phase the epoch ran in ("search" for the epoch that froze); ``freeze_info``: what the freeze
    returned when this epoch froze the plan (its expected cost is the search's own, before the projection)."""
    rec: dict[str, Any] = {"epoch": epoch, "phase": phase, "budget_target": budget.target, "metric": budget.metric}
    if cost_model is not None:
        rec["expected_avg_bits"] = float(cost_model.expected("avg_bits").detach())
        rec["expected_cost"] = float(cost_model.expected(budget.metric).detach())
        rec["bits"] = cost_model.current_bits()
    else:
        rec["bits"] = {}
    if freeze_info is not None:
        rec["expected_avg_bits"] = freeze_info["expected_avg_bits"]
        rec["expected_cost"] = freeze_info["expected_cost"]
    if "temperature" in terms:
        rec["temperature"] = float(terms["temperature"])
    if multiplier is not None:
        rec["multiplier"] = float(multiplier)
    for key in RECORDED_METRICS:
        if key in callback_metrics:
            rec[key] = float(callback_metrics[key])
    return rec


def log_epoch(pl_module: pl.LightningModule, record: Mapping[str, Any], searching: bool, budget_target: float,
              searched: bool | None = None) -> None:
    """Log an epoch's record: phase (0 search, 1 train), budget target, each layer's bits and, for an epoch that
    searched (``searched``, default ``searching``; the freeze epoch included), the search's expected cost."""
    for key in ("expected_avg_bits", "expected_cost"):
        if key in record and (searching if searched is None else searched):
            pl_module.log(f"sdq/{key}_epoch", record[key], batch_size=1)
    pl_module.log("sdq/phase", 0.0 if searching else 1.0, batch_size=1)
    pl_module.log("sdq/budget_target", float(budget_target), batch_size=1)
    for name, bits in record["bits"].items():
        if bits is not None:
            pl_module.log(f"sdq/bits/{name}", float(bits), batch_size=1)
