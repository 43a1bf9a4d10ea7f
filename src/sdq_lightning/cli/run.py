"""One training run from a composed config: data, model, SDQ, trainer, then metrics.json, plan and report."""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from sdq_lightning.report import plan_rows, write_report
from sdq_lightning.utils import build_datamodule, build_logger, build_model, build_sdq, build_trainer, get_logger
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


def fit_one(cfg: DictConfig, run_dir: str | Path, *, label: str = "sdq", sdq_enabled: bool | None = None,
            teacher: torch.nn.Module | None = None, init_state: dict[str, torch.Tensor] | None = None,
            sdq_overrides: dict[str, Any] | None = None, max_epochs: int | None = None) -> RunResult:
    """Fit (and test) one model into ``run_dir``; writes metrics.json, plan.yaml, report.md and the checkpoint."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    module = build_model(cfg, datamodule)
    if init_state is not None:
        module.model.load_state_dict(init_state)
    enabled = cfg.sdq.enabled if sdq_enabled is None else sdq_enabled
    overrides = dict(sdq_overrides or {})
    if teacher is not None:
        overrides["teacher"] = teacher
    sdq = build_sdq(cfg, run_dir, **overrides) if enabled else None
    recorder, throughput = EpochRecorder(), ThroughputRecorder()
    callbacks: list[Callback] = [c for c in (sdq, recorder, throughput) if c is not None]
    trainer_cfg = copy.deepcopy(cfg)
    if max_epochs is not None:
        trainer_cfg.trainer.max_epochs = max_epochs
    if sdq is not None and cfg.phase.get("search_only"):
        callbacks.append(StopAfterSearch(sdq))
        trainer_cfg.trainer.max_epochs = int(cfg.phase.search_epochs) + 1
    if cfg.save_checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None,
                                         save_top_k=1, enable_version_counter=False))
    logger = build_logger(cfg, run_dir, name=f"{cfg.name}-{label}")
    trainer = build_trainer(trainer_cfg, callbacks, logger, run_dir)
    trainer.fit(module, datamodule=datamodule)
    fitted = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    if cfg.run_test and not cfg.phase.get("search_only"):
        for res in trainer.test(module, datamodule=datamodule, verbose=False):
            fitted.update({k: float(v) for k, v in res.items()})
    plan = _final_plan(sdq, module, datamodule)
    if sdq is None or sdq.plan is None or not (run_dir / "plan.yaml").exists():
        from sdq_lightning.budget import BitPlan

        BitPlan.from_dict(plan).save(run_dir / "plan.yaml")
    budget = {"metric": cfg.hardware.metric, "target": float(cfg.hardware.target)}
    costs = plan.get("costs", {})
    metrics = {
        "name": f"{cfg.name}-{label}" if label != "sdq" else cfg.name,
        "run": label,
        "val/acc": _scalar(fitted, "val/acc"),
        "val/loss": _scalar(fitted, "val/loss"),
        "test/acc": _scalar(fitted, "test/acc"),
        "avg_bits": costs.get("avg_bits"),
        "size_bytes": costs.get("size"),
        "bitops": costs.get("bitops"),
        "budget_metric": budget["metric"] if enabled else None,
        "budget_target": budget["target"] if enabled else None,
        "budget_met": (costs.get(budget["metric"], float("inf")) <= budget["target"] * (1 + 1e-9)) if enabled else None,
        "weight_bits": list(sdq.spec.weight_bits) if sdq is not None else None,
        "activation_bits": sdq.spec.activation_bits if sdq is not None else None,
        "epochs": int(trainer.current_epoch),
        "wall_time_s": round(time.time() - start, 2),
        "train_images_per_s": None if throughput.images_per_s is None else round(throughput.images_per_s, 1),
        "overrides": job_overrides(),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    history = _merge_history(sdq.history if sdq is not None else [], recorder.history)
    (run_dir / "history.json").write_text(json.dumps(history, indent=2, default=str))
    images = write_report(run_dir, plan, history, metrics, budget if enabled else {}, title=f"{metrics['name']}")
    if cfg.logger.kind == "wandb" and logger:
        log_plan_and_plots(logger, plan_rows(plan), images,
                           {k: v for k, v in metrics.items() if k not in ("overrides", "weight_bits")})
        finish_wandb(logger)
    return RunResult(metrics, plan, history, module, images)


def save_resolved_config(cfg: DictConfig, run_dir: str | Path) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
