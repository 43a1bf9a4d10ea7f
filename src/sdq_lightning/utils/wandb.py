"""wandb: offline by default, never prompting for a login; plan table and plot images."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def setup_wandb_env(mode: str | None = "offline") -> None:
    """Set ``WANDB_MODE`` (unless the user already did) and keep wandb quiet and non-interactive."""
    if mode:
        os.environ.setdefault("WANDB_MODE", str(mode))
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")


def log_plan_and_plots(logger: Any, plan_rows: list[Mapping[str, Any]], images: Mapping[str, Path],
                       summary: Mapping[str, Any] | None = None) -> None:
    """Log the bit plan as a ``wandb.Table`` and each PNG as a ``wandb.Image`` through a ``WandbLogger``."""
    import wandb

    run = logger.experiment
    payload: dict[str, Any] = {}
    if plan_rows:
        columns = list(plan_rows[0].keys())
        payload["sdq/plan"] = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in plan_rows])
    for key, path in images.items():
        if Path(path).is_file():
            payload[f"report/{key}"] = wandb.Image(str(path))
    if payload:
        run.log(payload)
    for key, value in (summary or {}).items():
        if isinstance(value, (int, float, str)) or value is None:
            run.summary[key] = value


def finish_wandb(logger: Any) -> None:
    """Close the run so that offline files are complete for ``wandb sync``."""
    try:
        logger.experiment.finish()
    except Exception:  # noqa: BLE001 - closing is best effort
        pass
