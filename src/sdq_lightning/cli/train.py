"""``sdq-train`` / ``python -m sdq_lightning.train``: the Hydra app over ``sdq_lightning/conf``.

Bad command lines (unknown model, experiment or group option, missing dataset root, impossible budget, bad
activation bits, search longer than the run, a model with nothing to quantize, ...) print one ``error: ...`` line
on stderr and exit with status 2, before any run folder is written. Printing a config (``--cfg job|hydra|all``,
``--help``) never needs data. Every run ends with its run folder and a short summary.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from sdq_lightning.cli.errors import USER_ERRORS, UserError, fail
from sdq_lightning.cli.precheck import precheck
from sdq_lightning.utils.logging import quiet_library_noise

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
HYDRA_FILES = (".hydra", "train.log", "config.yaml")

# Folders a run may create (output root, data root) that did not exist before it started: removed again, when
# still empty, if the run fails on a user error (main() fills this in before Hydra creates anything).
_CREATED_BY_RUN: list[Path] = []


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _log_summary(lines: list[str], printed: bool = True) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    if printed:
        print("\n" + "\n".join(lines), flush=True)
    log = logging.getLogger("sdq_lightning.train")
    for line in lines:  # into train.log (Hydra's file handler) only: the console has the printed block
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train as configured in ``cfg`` into ``run_dir`` (default: the Hydra run dir); returns the final metrics."""
    from sdq_lightning.cli.compare import run_with_teacher
    from sdq_lightning.cli.run import fit_one, save_resolved_config, summary_lines

    run_dir = Path(run_dir) if run_dir is not None else _run_dir()
    save_resolved_config(cfg, run_dir)
    logging.getLogger("sdq_lightning.train").info(f"run folder: {run_dir.resolve()}")
    if cfg.sdq.enabled:
        hw = cfg.hardware
        logging.getLogger("sdq_lightning.train").info(
            f"{cfg.name}: budget {hw.metric} <= {float(hw.target):g} (hardware={hw.get('name')}; change it with "
            f"hardware.target=... or hardware=size|bitops|...), candidate weight bits {list(hw.weight_bits)}")
    if cfg.fp_teacher.enabled or cfg.compare.enabled:
        if not cfg.sdq.enabled:
            raise UserError("fp_teacher/compare need sdq.enabled=true")
        from lightning.pytorch.utilities import rank_zero_only

        with contextlib.nullcontext() if rank_zero_only.rank == 0 else contextlib.redirect_stdout(io.StringIO()):
            metrics = run_with_teacher(cfg, run_dir)  # its table once, from rank zero
        # the compare path prints its own table and run folder
        _log_summary(summary_lines(metrics, run_dir), printed=not cfg.compare.enabled)
        return metrics
    metrics = fit_one(cfg, run_dir).metrics
    _log_summary(summary_lines(metrics, run_dir))
    return metrics


def route_library_logs_to_hydra() -> None:
    """Lightning's loggers (set up at import, before Hydra configured logging) print through their own handler and
    do not propagate: send them to the root logger instead, so that Hydra's ``train.log`` holds the run's lines."""
    root = logging.getLogger()
    if not root.handlers:
        return
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                lib.removeHandler(handler)
        lib.propagate = True
    logging.captureWarnings(True)


def _remove_if_only_hydra_files(folder: Path) -> None:
    if folder.is_dir() and all(p.name in HYDRA_FILES or _is_empty_tree(p) for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _is_empty_tree(folder: Path) -> bool:
    return folder.is_dir() and all(p.is_dir() and _is_empty_tree(p) for p in folder.iterdir())


def _clean_up_after_user_error(run_dir: Path) -> None:
    """Remove the run folder (when it holds only Hydra's files) and the still-empty folders the run created."""
    _remove_if_only_hydra_files(run_dir)
    parent = run_dir.parent
    while parent != parent.parent and _is_empty_tree(parent) and any(
            parent == c or c in parent.parents for c in _CREATED_BY_RUN):
        shutil.rmtree(parent, ignore_errors=True)
        parent = parent.parent
    for created in _CREATED_BY_RUN:
        if _is_empty_tree(created):
            shutil.rmtree(created, ignore_errors=True)


def _task(cfg: DictConfig) -> float | None:
    route_library_logs_to_hydra()
    quiet_library_noise()
    run_dir = _run_dir()
    try:
        metrics = run(cfg)
    except USER_ERRORS as err:
        _clean_up_after_user_error(run_dir)
        _summarise_finished_jobs()
        fail(err)
    except BaseException:
        _summarise_finished_jobs()
        raise
    value = metrics.get(cfg.optimized_metric)
    return None if value is None else float(value)


def _summarise_finished_jobs() -> None:
    """In a multirun whose job failed: sweep_summary.md of the jobs that finished (Hydra stops at the failure)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sdq_lightning.report.sweep import write_sweep_summary

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    path = write_sweep_summary(hydra_cfg.sweep.dir)
    if path is not None:
        print(f"sweep summary of the jobs that finished: {path}", flush=True)


_hydra_main = hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(_task)


def _first_missing(path: Path) -> Path | None:
    """The highest folder of ``path`` (itself included) that does not exist yet."""
    path = path.absolute()
    if path.exists():
        return None
    top = path
    while not top.parent.exists():
        top = top.parent
    return top


def _note_created_folders(cfg: DictConfig | None) -> None:
    _CREATED_BY_RUN.clear()
    if cfg is None:
        return
    folders = [cfg.get("paths", {}).get(key) for key in ("output_dir", "data_dir")]
    root = cfg.dataset.get("root") if "root" in cfg.dataset else None
    folders.append(root if isinstance(root, str) and root not in ("", "???") else None)
    missing = [_first_missing(Path(str(value))) for value in folders if value]
    _CREATED_BY_RUN.extend(m for m in missing if m is not None)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: validate the command line, then hand it to Hydra."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = precheck(argv, CONF_DIR)
    except Exception as err:  # noqa: BLE001 - the user errors, and the many types Hydra raises for a bad command line
        fail(err)
    try:
        _note_created_folders(cfg)
    except Exception:  # noqa: BLE001 - only bookkeeping for the clean-up
        pass
    if cfg is not None and cfg.get("resume"):
        from sdq_lightning.cli.resume import run_folder

        argv.append(f"hydra.run.dir={run_folder(cfg.resume)}")  # the interrupted run's own folder
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


if __name__ == "__main__":
    main()
