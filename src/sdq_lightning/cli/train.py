"""``sdq-train`` / ``python -m sdq_lightning.train``: the Hydra app over ``sdq_lightning/conf``.

Bad command lines (unknown model, experiment or group option, missing dataset root, impossible budget, bad
activation bits, ...) print one ``error: ...`` line on stderr and exit with status 2, before any run folder
is written.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from sdq_lightning.cli.errors import USER_ERRORS, UserError, fail, one_line
from sdq_lightning.cli.precheck import precheck

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train as configured in ``cfg`` into ``run_dir`` (default: the Hydra run dir); returns the final metrics."""
    from sdq_lightning.cli.compare import run_with_teacher
    from sdq_lightning.cli.run import fit_one, save_resolved_config

    run_dir = Path(run_dir) if run_dir is not None else _run_dir()
    save_resolved_config(cfg, run_dir)
    if cfg.fp_teacher.enabled or cfg.compare.enabled:
        if not cfg.sdq.enabled:
            raise UserError("fp_teacher/compare need sdq.enabled=true")
        return run_with_teacher(cfg, run_dir)
    return fit_one(cfg, run_dir).metrics


def _task(cfg: DictConfig) -> float | None:
    run_dir = _run_dir()
    existed = set(run_dir.iterdir()) if run_dir.exists() else set()
    try:
        metrics = run(cfg)
    except USER_ERRORS as err:
        if not existed - {run_dir / ".hydra", run_dir / "train.log"} and _only_hydra_files(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        fail(err)
    value = metrics.get(cfg.optimized_metric)
    return None if value is None else float(value)


def _only_hydra_files(run_dir: Path) -> bool:
    return all(p.name in (".hydra", "train.log", "config.yaml") for p in run_dir.iterdir())


_hydra_main = hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(_task)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: validate the command line, then hand it to Hydra."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        precheck(argv, CONF_DIR)
    except USER_ERRORS as err:
        fail(err)
    except Exception as err:  # noqa: BLE001 - Hydra raises many types for a bad command line
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


if __name__ == "__main__":
    main()
