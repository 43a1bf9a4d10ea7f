"""Sweep summary at the end of a Hydra multirun: ``sweep_summary.md`` and ``pareto.png`` in the sweep dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sdq_lightning.report.plots import plot_pareto
from sdq_lightning.report.writer import markdown_table

COLUMNS = ("job", "overrides", "val/acc", "test/acc", "avg_bits", "size_bytes", "bitops", "budget_metric",
           "budget_target", "budget_met")


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The ``metrics.json`` of every job folder under ``sweep_dir`` (sorted by job number)."""
    rows = []
    for path in sorted(Path(sweep_dir).glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        data = json.loads(path.read_text())
        data["job"] = path.parent.name
        rows.append(data)
    return rows


def override_labels(overrides: list[list[str]]) -> list[str]:
    """Per job, the overrides that differ between jobs (``hardware.target=2 sdq.search.dbp_lr=0.1``); the common ones are
    dropped. A job whose overrides are all common gets ``(common)``."""
    common = set.intersection(*(set(o) for o in overrides)) if len(overrides) > 1 else set()
    return [" ".join(o for o in job if o not in common) or "(common)" for job in overrides]


def write_sweep_summary(sweep_dir: str | Path, cost_key: str = "avg_bits") -> Path | None:
    """Write ``sweep_summary.md`` (one row per job) and ``pareto.png``; ``None`` when no job finished."""
    sweep_dir = Path(sweep_dir)
    rows = collect_runs(sweep_dir)
    if not rows:
        return None
    lists = [[str(o) for o in r.get("overrides") or []] if not isinstance(r.get("overrides"), str)
             else r["overrides"].split() for r in rows]
    for r, label in zip(rows, override_labels(lists)):
        r["overrides"] = label
        r["label"] = label
    plot_pareto(rows, sweep_dir / "pareto.png", cost_key=cost_key)
    common = sorted(set.intersection(*(set(o) for o in lists))) if len(lists) > 1 else []
    text = ["# Sweep summary\n", f"{len(rows)} runs in `{sweep_dir}`.\n",
            f"Overrides common to every job: `{' '.join(common)}`.\n" if common else "",
            markdown_table(rows, COLUMNS),
            f"\n![accuracy against {cost_key}](pareto.png)\n"]
    path = sweep_dir / "sweep_summary.md"
    path.write_text("\n".join(text))
    return path


class SweepSummaryCallback(Callback):
    """Hydra callback (``hydra.callbacks``) writing the sweep summary when a multirun ends."""

    def __init__(self, cost_key: str = "avg_bits") -> None:
        self.cost_key = cost_key

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_sweep_summary(config.hydra.sweep.dir, self.cost_key)
        if path is not None:
            print(f"sweep summary: {path}")
