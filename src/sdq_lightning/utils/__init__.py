"""Helpers of the Hydra app: building objects from config, rank-zero logging, wandb setup."""

from sdq_lightning.utils.instantiate import (
    build_callbacks,
    build_datamodule,
    build_logger,
    build_model,
    build_sdq,
    build_trainer,
)
from sdq_lightning.utils.logging import get_logger

__all__ = ["build_callbacks", "build_datamodule", "build_logger", "build_model", "build_sdq", "build_trainer",
           "get_logger"]
