"""Build the data module, model, SDQ callback, logger and trainer from the composed Hydra config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sdq_lightning.utils.wandb import setup_wandb_env

LOGGERS = ("wandb", "csv", "none")


def to_dict(node: Any) -> dict[str, Any]:
    """A resolved plain-python copy of a config node."""
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The LightningDataModule named by ``cfg.dataset._target_``."""
    return instantiate(cfg.dataset, _convert_="all")


def build_model(cfg: DictConfig, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    """The LightningModule of ``cfg.model``; ``num_classes``/``in_chans`` default to the data module's."""
    kwargs = to_dict(cfg.model)
    target = kwargs.pop("_target_", "sdq_lightning.lit.SDQClassifier")
    for key in ("num_classes", "in_chans"):
        if kwargs.get(key) is None and hasattr(datamodule, key):
            kwargs[key] = getattr(datamodule, key)
    return instantiate({"_target_": target, **kwargs})


def sdq_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of :class:`sdq_lightning.SDQ` from ``hardware``, ``phase`` and ``sdq``."""
    hw, phase = cfg.hardware, cfg.phase
    kwargs = {k: v for k, v in to_dict(cfg.sdq).items() if k != "enabled" and v is not None}
    if isinstance(kwargs.get("temperature"), list):
        kwargs["temperature"] = tuple(kwargs["temperature"])
    kwargs.update(
        weight_bits=tuple(hw.weight_bits),
        activation_bits=hw.activation_bits,
        budget={"metric": hw.metric, "target": float(hw.target)},
        search_epochs=int(phase.search_epochs),
        seed=int(cfg.seed),
    )
    if phase.get("plan"):
        kwargs["plan"] = str(phase.plan)
    return kwargs


def build_sdq(cfg: DictConfig, save_dir: str | Path, **overrides: Any) -> pl.Callback | None:
    """The SDQ callback (``None`` when ``sdq.enabled`` is false: a floating-point run)."""
    if not cfg.sdq.get("enabled", True):
        return None
    from sdq_lightning.callbacks import SDQ

    kwargs = sdq_kwargs(cfg)
    kwargs.update(overrides)
    return SDQ(save_dir=str(save_dir), **kwargs)


def build_logger(cfg: DictConfig, run_dir: str | Path, name: str | None = None) -> Any:
    """``logger.kind`` = wandb (offline unless WANDB_MODE says otherwise), csv or none (returns False)."""
    kind = cfg.logger.kind
    if kind not in LOGGERS:
        raise ValueError(f"logger.kind must be one of {LOGGERS}, got {kind!r}")
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="", version="")
    setup_wandb_env(cfg.logger.get("mode", "offline"))
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(
        name=name or cfg.name,
        project=cfg.logger.project,
        entity=cfg.logger.get("entity"),
        group=cfg.logger.get("group"),
        tags=list(cfg.logger.get("tags") or []),
        save_dir=str(run_dir),
        offline=os.environ.get("WANDB_MODE") == "offline",
        log_model=False,
    )
    logger.log_hyperparams(to_dict(cfg))
    return logger


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], logger: Any, run_dir: str | Path) -> pl.Trainer:
    """``lightning.Trainer(**cfg.trainer)`` writing into ``run_dir``."""
    kwargs = {k: v for k, v in to_dict(cfg.trainer).items() if v is not None}
    return pl.Trainer(default_root_dir=str(run_dir), callbacks=callbacks, logger=logger, **kwargs)



