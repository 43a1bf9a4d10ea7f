"""Build the data module, model, SDQ callback, loggers, callbacks and trainer from the composed Hydra config.

Every object comes from a config node with a ``_target_`` (``hydra.utils.instantiate``), as in the
lightning-hydra-template: ``sdq`` (the callback), ``logger.<name>`` and ``callbacks.<name>`` (any number of named
entries). The dataset comes from the registry (``dataset.name``, see :mod:`sdq_lightning.data.registry`) or a
``_target_``. The ``sdq`` node is typed by :class:`sdq_lightning.options.SDQConfig`: every key is passed as it is,
its option groups as dicts (``enabled`` is the app's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sdq_lightning.utils.wandb import setup_wandb_env


def to_dict(node: Any) -> dict[str, Any]:
    """A resolved plain-python copy of a config node."""
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The LightningDataModule registered as ``cfg.dataset.name`` (or named by ``cfg.dataset._target_``)."""
    from sdq_lightning.data.registry import _builder

    cls, kwargs = _builder(to_dict(cfg.dataset))
    return cls(**kwargs)


def build_model(cfg: DictConfig, datamodule: pl.LightningDataModule,
                init_state: dict[str, Any] | None = None) -> pl.LightningModule:
    """The LightningModule of ``cfg.model``; ``num_classes``/``in_chans`` default to the data module's;
    ``init_state``: a backbone state dict to start from."""
    kwargs = to_dict(cfg.model)
    target = kwargs.pop("_target_", "sdq_lightning.lit.SDQClassifier")
    for key in ("num_classes", "in_chans"):
        if kwargs.get(key) is None and hasattr(datamodule, key):
            kwargs[key] = getattr(datamodule, key)
    module = instantiate({"_target_": target, **kwargs})
    if init_state is not None:
        module.model.load_state_dict(init_state)
    return module


def sdq_node(cfg: DictConfig) -> dict[str, Any]:
    """The ``sdq`` node as ``instantiate`` gets it: resolved, without the app's ``enabled``."""
    node = to_dict(cfg.sdq)
    node.pop("enabled", None)
    if isinstance(node.get("weight_bits"), list):
        node["weight_bits"] = tuple(node["weight_bits"])
    budget = node.get("budget")
    if isinstance(budget, dict) and budget.get("target") is not None:
        node["budget"] = {**budget, "target": float(budget["target"])}
    if node.get("plan") is not None:
        node["plan"] = str(node["plan"])
    return node


def build_sdq(cfg: DictConfig, save_dir: str | Path | None, **overrides: Any) -> pl.Callback | None:
    """The SDQ callback from ``cfg.sdq`` (``None`` when ``sdq.enabled`` is false: a floating-point run), writing
    into ``save_dir`` (``runtime.save_dir``).

    ``overrides`` (a teacher module, the uniform baseline's bits, ...) replace config values."""
    if not cfg.sdq.get("enabled", True):
        return None
    node = sdq_node(cfg)
    node["runtime"] = {**node.get("runtime", {}), "save_dir": None if save_dir is None else str(save_dir)}
    partial = instantiate(node, _partial_=True, _convert_="all")
    return partial(**overrides)


def _named_entries(node: Any, group: str) -> dict[str, dict[str, Any]]:
    entries = {}
    for name, entry in to_dict(node).items():
        if not isinstance(entry, dict) or "_target_" not in entry:
            raise ValueError(f"{group}.{name} must be a config node with a _target_ (a class path), got {entry!r}")
        entries[name] = entry
    return entries


def build_logger(cfg: DictConfig, run_dir: str | Path, name: str | None = None) -> list[Any] | bool:
    """Every named ``_target_`` entry of ``cfg.logger`` (``save_dir`` null: ``run_dir``); ``False`` when none.

    A WandbLogger gets ``name`` (null: the run name), runs offline unless ``WANDB_MODE`` says otherwise, and logs
    the resolved config as hyperparameters."""
    loggers = []
    for key, entry in _named_entries(cfg.get("logger"), "logger").items():
        if entry.get("save_dir", None) is None:
            entry["save_dir"] = str(run_dir)
        wandb = str(entry["_target_"]).endswith("WandbLogger")
        if wandb:
            setup_wandb_env(entry.pop("mode", "offline"))
            entry["offline"] = os.environ.get("WANDB_MODE") == "offline"
            entry["name"] = entry.get("name") or name or cfg.name
        logger = instantiate(entry, _convert_="all")
        if wandb:
            logger.log_hyperparams(to_dict(cfg))
        loggers.append(logger)
    return loggers or False


def wandb_loggers(loggers: Any) -> list[Any]:
    """The WandbLoggers among what :func:`build_logger` returned."""
    return [lg for lg in (loggers or []) if type(lg).__name__ == "WandbLogger"]


def build_callbacks(cfg: DictConfig, run_dir: str | Path) -> list[pl.Callback]:
    """Every named ``_target_`` entry of ``cfg.callbacks`` (a ModelCheckpoint's ``dirpath`` null:
    ``run_dir/checkpoints``; ``model_checkpoint`` is skipped when ``save_checkpoint`` is false)."""
    out = []
    for key, entry in _named_entries(cfg.get("callbacks"), "callbacks").items():
        is_ckpt = str(entry["_target_"]).endswith("ModelCheckpoint")
        if is_ckpt and not cfg.get("save_checkpoint", True):
            continue
        if is_ckpt and entry.get("dirpath") is None:
            entry["dirpath"] = str(Path(run_dir) / "checkpoints")
        out.append(instantiate(entry, _convert_="all"))
    return out


def _uses_gpu(accelerator: Any) -> bool:
    import torch

    name = str(accelerator or "auto").lower()
    return name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available())


def resolve_trainer_kwargs(trainer_cfg: Any) -> dict[str, Any]:
    """``cfg.trainer`` as ``lightning.Trainer`` keyword arguments: nulls dropped, ``precision: auto`` (bf16-mixed
    on a GPU that supports it, else 16-mixed; 32-true on the CPU) and ``sync_batchnorm: auto`` (GPU only)."""
    kwargs = {k: v for k, v in to_dict(trainer_cfg).items() if v is not None}
    gpu = _uses_gpu(kwargs.get("accelerator"))
    if kwargs.get("precision") == "auto":
        if gpu:
            import torch

            kwargs["precision"] = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() \
                else "16-mixed"
        else:
            kwargs["precision"] = "32-true"
    if kwargs.get("sync_batchnorm") == "auto":
        kwargs["sync_batchnorm"] = gpu
    return kwargs


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], logger: Any, run_dir: str | Path) -> pl.Trainer:
    """``lightning.Trainer(**cfg.trainer)`` writing into ``run_dir``."""
    return pl.Trainer(default_root_dir=str(run_dir), callbacks=callbacks, logger=logger,
                      **resolve_trainer_kwargs(cfg.trainer))
