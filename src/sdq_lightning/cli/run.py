"""One training run from a composed config: data, model, SDQ, trainer, then metrics.json, plan and report."""

from __future__ import annotations

import copy
import csv
import functools
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sdq_lightning.report import plan_rows, write_report
from sdq_lightning.report.search_trace import plot_search_trace
from sdq_lightning.utils import (
    build_callbacks,
    build_datamodule,
    build_logger,
    build_model,
    build_sdq,
    build_trainer,
    get_logger,
)
from sdq_lightning.utils.instantiate import wandb_loggers
from sdq_lightning.utils.throughput import ThroughputRecorder
from sdq_lightning.utils.wandb import finish_wandb, log_plan_and_plots

log = get_logger(__name__)

for _pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                 ".*Checkpoint directory .* exists and is not empty.*",
                 ".*Experiment logs directory .* exists and is not empty.*", ".*`training_step` returns.*"):
    warnings.filterwarnings("ignore", _pattern)


class EpochRecorder(Callback):
    """Keeps train/val metrics per epoch (for runs without SDQ, whose own history holds them otherwise)."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rec: dict[str, Any] = {"epoch": trainer.current_epoch}
        for key in ("val/acc", "val/loss", "train/loss", "train/acc"):
            if key in trainer.callback_metrics:
                rec[key] = float(trainer.callback_metrics[key])
        self.history.append(rec)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


EARLIER_CSV = "metrics.earlier.csv"


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _before(rows: list[dict[str, str]], later: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows of ``rows`` from epochs before the first epoch of ``later`` (all of them when ``later`` is empty)."""
    epochs = [int(r["epoch"]) for r in later if r.get("epoch") not in (None, "")]
    if not epochs:
        return rows
    return [r for r in rows if r.get("epoch") not in (None, "") and int(r["epoch"]) < min(epochs)]


def _union(*headers: list[str]) -> list[str]:
    return list(dict.fromkeys(f for h in headers for f in h))


def keep_earlier_metrics(run_dir: Path) -> None:
    """Before a resumed fit: the CSV logger rewrites ``metrics.csv``, so its rows (and those of earlier
    interruptions) are kept in ``metrics.earlier.csv`` until :func:`merge_earlier_metrics` puts them back."""
    kept_fields, kept = _read_csv(run_dir / EARLIER_CSV)
    fields, rows = _read_csv(run_dir / "metrics.csv")
    if rows:
        _write_csv(run_dir / EARLIER_CSV, _union(kept_fields, fields), [*_before(kept, rows), *rows])


def merge_earlier_metrics(run_dir: Path) -> None:
    """After a resumed fit: ``metrics.csv`` = the kept rows of the epochs before this fit's first, then this fit's."""
    kept_fields, kept = _read_csv(run_dir / EARLIER_CSV)
    if not kept:
        return
    fields, rows = _read_csv(run_dir / "metrics.csv")
    _write_csv(run_dir / "metrics.csv", _union(kept_fields, fields), [*_before(kept, rows), *rows])
    (run_dir / EARLIER_CSV).unlink()


class StopAfterSearch(Callback):
    """``phase=search``: stop once the SDQ callback has frozen (and written) the plan."""

    def __init__(self, sdq: Callback) -> None:
        self.sdq = sdq

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sdq.plan is not None and getattr(self.sdq.phase, "value", self.sdq.phase) == "train":
            trainer.should_stop = True


@dataclass
class RunResult:
    metrics: dict[str, Any]
    plan: dict[str, Any] | None
    history: list[dict[str, Any]]
    module: pl.LightningModule
    images: dict[str, Path] = field(default_factory=dict)


def job_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not inside a Hydra job
        return []


def _merge_history(sdq_history: list[dict[str, Any]], recorded: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_epoch = {r["epoch"]: dict(r) for r in recorded}
    for rec in sdq_history:
        by_epoch.setdefault(rec["epoch"], {}).update({k: v for k, v in rec.items() if k != "bits"})
    return [by_epoch[e] for e in sorted(by_epoch)]


def _final_plan(sdq: Any, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """The frozen plan, else the model's current bits (short runs that never reached the boundary, FP runs)."""
    from sdq_lightning.budget import BitPlan

    if sdq is not None and sdq.plan is not None:
        return sdq.plan.to_dict()
    example = next(iter(datamodule.val_dataloader()))[0][:1].to(module.device)
    profile = getattr(sdq, "profile", None) if sdq is not None else None
    return BitPlan.from_model(module, example_input=example if profile is None else None, profile=profile).to_dict()


def _scalar(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _build_callbacks(cfg: DictConfig, run_dir: Path, sdq: Callback | None, stage: str | None = None
                     ) -> tuple[list[Callback], EpochRecorder, ThroughputRecorder]:
    """SDQ, the epoch and throughput recorders, the generators' states (resume), phase=search's stop, a progress bar
    naming ``stage`` (runs of several models), then the named ``callbacks.*`` entries."""
    from sdq_lightning.utils.rng import RNGStates

    recorder, throughput = EpochRecorder(), ThroughputRecorder()
    callbacks: list[Callback] = [c for c in (sdq, recorder, throughput, RNGStates()) if c is not None]
    if sdq is not None and cfg.phase.get("search_only"):
        callbacks.append(StopAfterSearch(sdq))
    if stage is not None and cfg.trainer.get("enable_progress_bar", True):
        from sdq_lightning.utils.progress import stage_progress_bar

        callbacks.append(stage_progress_bar(stage))
    return [*callbacks, *build_callbacks(cfg, run_dir)], recorder, throughput


def _trainer_cfg(cfg: DictConfig, sdq: Callback | None, max_epochs: int | None) -> DictConfig:
    trainer_cfg = copy.deepcopy(cfg)
    if max_epochs is not None:
        trainer_cfg.trainer.max_epochs = max_epochs
    if sdq is not None and cfg.phase.get("search_only"):
        trainer_cfg.trainer.max_epochs = int(cfg.phase.search_epochs) + 1
    return trainer_cfg


def _unrepeated(loader: Any, trainer: pl.Trainer, mode: Any) -> Any:
    """``loader`` over this rank's disjoint shard of its dataset, without DistributedSampler's padding."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
    from lightning.pytorch.utilities.data import _update_dataloader

    sampler = UnrepeatedDistributedSampler(loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                           shuffle=False)
    return _update_dataloader(loader, sampler, mode=mode)


def shard_validation_exactly(trainer: pl.Trainer, datamodule: pl.LightningDataModule) -> None:
    """With several ranks, validation sees every sample once too (Lightning leaves a DistributedSampler alone)."""
    if trainer.world_size <= 1:
        return
    from lightning.pytorch.trainer.states import RunningStage

    original = datamodule.val_dataloader

    @functools.wraps(original)
    def val_dataloader() -> Any:
        return _unrepeated(original(), trainer, RunningStage.VALIDATING)

    datamodule.val_dataloader = val_dataloader  # type: ignore[method-assign]


def evaluate_test_split(trainer: pl.Trainer, module: pl.LightningModule,
                        datamodule: pl.LightningDataModule) -> dict[str, float]:
    """``trainer.test`` over every test sample exactly once, also with several ranks.

    Lightning's DistributedSampler pads the ranks' shards to equal length with repeated samples; here each rank
    gets a disjoint shard without padding (``UnrepeatedDistributedSampler``), the accuracy metrics (torchmetrics)
    sum their counts over the ranks and the loss is a sample-weighted mean over the ranks (``sync_dist``)."""
    if trainer.world_size <= 1:
        results = trainer.test(module, datamodule=datamodule, verbose=False)
    else:
        from lightning.pytorch.trainer.states import RunningStage

        datamodule.setup("test")
        loader = _unrepeated(datamodule.test_dataloader(), trainer, RunningStage.TESTING)
        results = trainer.test(module, dataloaders=loader, verbose=False)
    return {k: float(v) for res in results for k, v in res.items()}


def _write_plan(sdq: Any, plan: dict[str, Any], run_dir: Path) -> None:
    if sdq is None or sdq.plan is None or not (run_dir / "plan.yaml").exists():
        from sdq_lightning.budget import BitPlan

        BitPlan.from_dict(plan).save(run_dir / "plan.yaml")


def _metrics(cfg: DictConfig, label: str, enabled: bool, sdq: Any, fitted: dict[str, float], plan: dict[str, Any],
             trainer: pl.Trainer, throughput: ThroughputRecorder, start: float) -> dict[str, Any]:
    budget = {"metric": cfg.hardware.metric, "target": float(cfg.hardware.target)}
    costs = plan.get("costs", {})
    return {
        "name": f"{cfg.name}-{label}" if label != "sdq" else cfg.name,
        "run": label,
        "val/acc": _scalar(fitted, "val/acc"),
        "val/loss": _scalar(fitted, "val/loss"),
        "test/acc": _scalar(fitted, "test/acc"),
        "test/loss": _scalar(fitted, "test/loss"),
        "avg_bits": costs.get("avg_bits"),
        "size_bytes": costs.get("size"),
        "bitops": costs.get("bitops"),
        "budget_metric": budget["metric"] if enabled else None,
        "budget_target": budget["target"] if enabled else None,
        "budget_cost": costs.get(budget["metric"]) if enabled else None,
        "budget_met": (costs.get(budget["metric"], float("inf")) <= budget["target"] * (1 + 1e-9)) if enabled else None,
        "weight_bits": list(sdq.spec.weight_bits) if sdq is not None else None,
        "activation_bits": sdq.spec.activation_bits if sdq is not None else None,
        "epochs": int(trainer.current_epoch),
        "world_size": int(trainer.world_size),
        "wall_time_s": round(time.time() - start, 2),
        "train_images_per_s": None if throughput.images_per_s is None else round(throughput.images_per_s, 1),
        "overrides": job_overrides(),
    }


def _write_search_trace(run_dir: Path, sdq: Any, budget: dict[str, Any]) -> dict[str, Path]:
    """search_trace.json and plots/search_trace.png (each layer's expected bits and the controller over the search
    steps); every report.md written into the run folder afterwards links it."""
    trace = getattr(sdq, "search_trace", None) if sdq is not None else None
    if not trace or not trace.get("step"):
        return {}
    (run_dir / "search_trace.json").write_text(json.dumps(trace))
    png = plot_search_trace(trace, run_dir / "plots" / "search_trace.png", budget.get("target"),
                            budget.get("metric", "avg_bits"), sdq.options.search.budget_control)
    return {"search_trace": png} if png is not None else {}


def _write_outputs(cfg: DictConfig, run_dir: Path, metrics: dict[str, Any], history: list[dict[str, Any]],
                   plan: dict[str, Any], logger: Any, enabled: bool, sdq: Any = None) -> dict[str, Path]:
    """metrics.json, history.json, report.md with its plots; the plan table and plots to any wandb logger."""
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run_dir / "history.json").write_text(json.dumps(history, indent=2, default=str))
    budget = {"metric": cfg.hardware.metric, "target": float(cfg.hardware.target)} if enabled else {}
    trace = _write_search_trace(run_dir, sdq, budget)
    images = write_report(run_dir, plan, history, metrics, budget, title=f"{metrics['name']}")
    images.update(trace)
    for wandb_logger in wandb_loggers(logger):
        log_plan_and_plots(wandb_logger, plan_rows(plan), images,
                           {k: v for k, v in metrics.items() if k not in ("overrides", "weight_bits")})
        finish_wandb(wandb_logger)
    return images


def fit_one(cfg: DictConfig, run_dir: str | Path, *, label: str = "sdq", sdq_enabled: bool | None = None,
            teacher: torch.nn.Module | None = None, init_state: dict[str, torch.Tensor] | None = None,
            sdq_overrides: dict[str, Any] | None = None, max_epochs: int | None = None,
            stage: str | None = None) -> RunResult:
    """Fit (and test) one model into ``run_dir``; writes metrics.json, plan.yaml, report.md and the checkpoint.

    The steps: data, model, SDQ callback (``cfg.sdq``; ``teacher``/``sdq_overrides`` replace its values),
    callbacks, loggers and trainer, fit, test (every test sample once, also data-parallel), plan, metrics, files
    (rank zero only). ``stage``: the name the progress bar shows (one of several models of a run)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    module = build_model(cfg, datamodule, init_state)
    enabled = bool(cfg.sdq.enabled if sdq_enabled is None else sdq_enabled)
    overrides = {**(sdq_overrides or {}), **({"teacher": teacher} if teacher is not None else {})}
    sdq = build_sdq(cfg, run_dir, **overrides) if enabled else None
    callbacks, recorder, throughput = _build_callbacks(cfg, run_dir, sdq, stage)
    from sdq_lightning.cli.resume import checkpoint_of

    ckpt_path = checkpoint_of(cfg)
    if ckpt_path is not None and rank_zero_only.rank == 0:
        keep_earlier_metrics(run_dir)  # before the CSV logger exists: it deletes metrics.csv
    logger = build_logger(cfg, run_dir, name=f"{cfg.name}-{label}")
    trainer = build_trainer(_trainer_cfg(cfg, sdq, max_epochs), callbacks, logger, run_dir)
    shard_validation_exactly(trainer, datamodule)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fitted = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    if cfg.run_test and not cfg.phase.get("search_only"):
        fitted.update(evaluate_test_split(trainer, module, datamodule))
    plan = _final_plan(sdq, module, datamodule)
    metrics = _metrics(cfg, label, enabled, sdq, fitted, plan, trainer, throughput, start)
    history = _merge_history(sdq.history if sdq is not None else [], recorder.history)
    images: dict[str, Path] = {}
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            lg.save()
        merge_earlier_metrics(run_dir)
        _write_plan(sdq, plan, run_dir)
        images = _write_outputs(cfg, run_dir, metrics, history, plan, logger, enabled, sdq)
    return RunResult(metrics, plan, history, module, images)


def summary_lines(metrics: dict[str, Any], run_dir: str | Path) -> list[str]:
    """The end-of-run summary: accuracy, average bits, plan cost against the budget, run folder."""
    def pct(key: str) -> str:
        return "n/a" if metrics.get(key) is None else f"{100 * float(metrics[key]):.2f} %"

    lines = [f"{metrics.get('name', 'run')}: test/acc {pct('test/acc')}, val/acc {pct('val/acc')}, "
             f"avg bits {metrics['avg_bits']:.3f}" if metrics.get("avg_bits") is not None else
             f"{metrics.get('name', 'run')}: test/acc {pct('test/acc')}, val/acc {pct('val/acc')}"]
    if metrics.get("budget_metric"):
        cost, target = metrics.get("budget_cost"), metrics["budget_target"]
        verdict = "met" if metrics.get("budget_met") else "NOT met"
        lines.append(f"plan cost {metrics['budget_metric']} = {cost:.6g} vs budget <= {target:.6g}: {verdict}"
                     if cost is not None else f"budget {metrics['budget_metric']} <= {target:.6g}")
    else:
        lines.append("floating point (no SDQ, no budget)")
    lines.append(f"run folder: {Path(run_dir).resolve()}")
    return lines


def save_resolved_config(cfg: DictConfig, run_dir: str | Path) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        (Path(run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
