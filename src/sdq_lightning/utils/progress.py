"""Progress bars that name their stage, for runs that train several models in a row (FP teacher, SDQ, uniform)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

__all__ = ["stage_progress_bar"]


class _StageRichBar(RichProgressBar):
    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{self.stage}: {super()._get_train_description(current_epoch)}"


class _StageTQDMBar(TQDMProgressBar):
    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"{self.stage}: Epoch {trainer.current_epoch}")


def stage_progress_bar(stage: str) -> pl.Callback:
    """The bar Lightning would pick (rich when installed, else tqdm), its epochs labelled ``<stage>: Epoch N``."""
    return _StageRichBar(stage) if _RICH_AVAILABLE else _StageTQDMBar(stage)
