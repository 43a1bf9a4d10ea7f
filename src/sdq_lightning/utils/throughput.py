"""Training throughput: images per second, the median over timed windows of steps."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_size(batch: Any) -> int:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(x.shape[0]) if hasattr(x, "shape") and len(x.shape) > 0 else 0


class ThroughputRecorder(Callback):
    """Records training images/s (all ranks together): the median over windows of ``window`` steps.

    The first ``skip`` training steps of the fit are not timed (warm-up: cuDNN autotuning, allocator growth,
    first-call compilation; in a fit too short for that, half of its steps). A window ends after ``window`` steps, at a validation start or at the epoch's end,
    so validation and epoch-end callbacks (the SDQ plan freeze, say) are never inside one. The device is
    synchronised only at window edges, so timing costs one sync per ``window`` steps.

    After fit, ``images_per_s`` holds the median (``None`` when no step was timed) and ``windows`` the per-window
    rates; the median is printed once on rank zero.
    """

    def __init__(self, window: int = 20, skip: int = 5) -> None:
        if window <= 0 or skip < 0:
            raise ValueError(f"window must be positive and skip >= 0, got window={window!r}, skip={skip!r}")
        self.window, self.skip = int(window), int(skip)
        self._start()

    def _start(self) -> None:
        self.windows: list[float] = []
        self.images_per_s: float | None = None
        self.steps_timed = self._seen = 0
        self._skip = self.skip
        self._reset()

    def _reset(self) -> None:
        self._t0: float | None = None
        self._steps = 0
        self._images = 0

    def _close(self, pl_module: pl.LightningModule) -> None:
        if self._t0 is not None and self._steps > 0:
            _sync(pl_module.device)
            dt = time.perf_counter() - self._t0
            if dt > 0:
                self.windows.append(self._images / dt)
                self.steps_timed += self._steps
        self._reset()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_epoch, epochs = trainer.num_training_batches, trainer.max_epochs
        if isinstance(per_epoch, int) and epochs is not None and epochs > 0:
            self._skip = min(self.skip, per_epoch * epochs // 2)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._t0 is None and self._seen >= self._skip:
            _sync(pl_module.device)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._seen += 1
        if self._t0 is None:
            return
        self._steps += 1
        self._images += _batch_size(batch) * max(int(trainer.world_size), 1)
        if self._steps >= self.window:
            self._close(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(pl_module)
        self.images_per_s = statistics.median(self.windows) if self.windows else None
        if self.images_per_s is not None:
            rank_zero_info(f"train images/s: {self.images_per_s:.1f} (median of {len(self.windows)} windows, "
                           f"{self.steps_timed} steps timed, first {self._skip} skipped)")
