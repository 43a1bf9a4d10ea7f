"""Divergence guard: stop a run whose training loss is not finite or whose val accuracy collapsed to chance.

Cheap by construction: a training step adds no device op and no host sync: its detached loss is kept in a list, and
the list is read (one ``isfinite`` over the stacked losses, one sync) every ``check_every_n_steps`` steps (default:
every step in one CPU process, where reading is free, else every 50 steps), at every epoch end and before every
validation check. Each validation after training has started whose metrics are sane replaces ``last_good.ckpt`` in
the run's own folder (a whole Lightning checkpoint: weights, optimizers, callback state), so the error can say where
the last sane state is; the untrained state before the first training step is never kept.

The accuracy is the user's own validation metric, found among the logged metrics under a usual name (``val/acc``,
``val_acc``, ``val/accuracy``, ...; see :data:`ACCURACY_NAMES`) or named with ``monitor``. When none is logged, the
guard warns once and checks the training loss only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

__all__ = ["ACCURACY_NAMES", "DivergenceError", "DivergenceGuard", "find_accuracy"]

# Validation accuracy names tried in this order; then any logged name matching ACCURACY_PATTERN.
ACCURACY_NAMES = ("val/acc", "val_acc", "val/accuracy", "val_accuracy", "val/top1", "val_top1", "valid/acc",
                  "valid_acc", "val/acc_epoch", "val_acc_epoch")
ACCURACY_PATTERN = re.compile(r"^val(id|idation)?[/_.-]?(acc|accuracy|top1|top_1|top-1)(_epoch)?$", re.IGNORECASE)

ACTIONS = ("raise", "stop")
ACCELERATOR_READ_EVERY = 50
LOSS_CAUSES = ("likely causes: learning rate too high (model lr, SDQ dbp_lr/step_lr), a budget too low for the "
               "model, fp16 overflow; try a lower lr, trainer.gradient_clip_val=1.0, precision 32 or a higher budget "
               "target")
COLLAPSE_CAUSES = ("likely causes: budget too low for the model (bits collapsed to the lowest candidate), "
                   "penalty_weight or dbp_lr too high, learning rate too high; try a higher budget target, "
                   "candidates starting at 2 bits, a lower penalty_weight/dbp_lr or lr")


class DivergenceError(RuntimeError):
    """Raised by :class:`DivergenceGuard`; the message is one line naming the step, the value and what to try."""


def _loss_of(outputs: Any) -> Tensor | None:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), Tensor):
        return outputs["loss"]
    return None


def infer_num_classes(pl_module: nn.Module) -> int | None:
    """``num_classes`` of the module (attribute or hyperparameter), else the last ``nn.Linear``'s outputs."""
    for source in (pl_module, getattr(pl_module, "hparams", {})):
        value = source.get("num_classes") if isinstance(source, Mapping) else getattr(source, "num_classes", None)
        if isinstance(value, int) and value > 1:
            return value
    linears = [m for m in pl_module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears and linears[-1].out_features > 1 else None


def find_accuracy(metrics: Mapping[str, Any], monitor: str | None = None) -> str | None:
    """The name of the validation accuracy among ``metrics``: ``monitor`` if given (and logged), else the first of
    :data:`ACCURACY_NAMES`, else the first name matching :data:`ACCURACY_PATTERN`; None if there is none."""
    if monitor is not None:
        return monitor if monitor in metrics else None
    for name in ACCURACY_NAMES:
        if name in metrics:
            return name
    return next((name for name in metrics if ACCURACY_PATTERN.match(name)), None)


class DivergenceGuard(Callback):
    """Stops training when the loss is NaN/inf or val accuracy falls to chance while it had been above it.

    Args:
        check_every_n_steps: read the losses every this many steps (and at epoch ends and before validation); None:
            every step in a single CPU process (no sync to save), every 50 steps on an accelerator or with DDP.
        monitor: the validation accuracy in ``trainer.callback_metrics`` (a fraction in [0, 1]); None (default)
            finds it under a usual name (:func:`find_accuracy`). With none logged the guard warns once and watches
            the training loss only.
        num_classes: chance is ``1/num_classes``; None reads it from the module (``num_classes`` or the last Linear).
        tolerance: accuracy <= ``chance + tolerance * (1 - chance)`` counts as chance (10 classes: 0.145).
        reference_acc: accuracy of the FP/initial model (e.g. the FP teacher's); besides it, the sanity-check
            accuracy and the best accuracy of this fit count as references. A collapse needs a reference above
            ``chance + 3 * tolerance * (1 - chance)``: a model that never left chance is not flagged.
        patience: consecutive validations at chance before stopping (2: one epoch at chance right after a phase
            change can recover).
        action: ``"raise"`` (default) raises :class:`DivergenceError`; ``"stop"`` sets ``trainer.should_stop``,
            warns, and keeps the message in ``self.message``.
        dirpath: where ``last_good.ckpt`` goes (default ``<run folder>/checkpoints``: the SDQ callback's
            ``save_dir`` when set, else ``trainer.log_dir``, the run's own log folder, which is ``default_root_dir``
            without a logger; the folder of ``plan.yaml``).
        save_last_good: False keeps no checkpoint (the message then names the last sane epoch only).
    """

    def __init__(self, check_every_n_steps: int | None = None, monitor: str | None = None,
                 num_classes: int | None = None, tolerance: float = 0.05, reference_acc: float | None = None,
                 patience: int = 2, action: str = "raise", dirpath: str | Path | None = None,
                 save_last_good: bool = True) -> None:
        super().__init__()
        if check_every_n_steps is not None and (isinstance(check_every_n_steps, bool)
                                                or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1):
            raise ValueError(f"check_every_n_steps must be None or an integer >= 1, got {check_every_n_steps!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"monitor must be None or a metric name, got {monitor!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 2):
            raise ValueError(f"num_classes must be None or an integer >= 2, got {num_classes!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 0.3:
            raise ValueError(f"tolerance must be a number in [0, 0.3), got {tolerance!r}")
        if reference_acc is not None and (isinstance(reference_acc, bool) or not isinstance(reference_acc, (int, float))
                                          or not 0 <= reference_acc <= 1):
            raise ValueError(f"reference_acc must be None or a fraction in [0, 1], got {reference_acc!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        self.check_every_n_steps = check_every_n_steps
        self.monitor = monitor
        self.found: str | None = None  # the accuracy name the last validation read
        self.run_dir: Path | None = None  # the run's folder, when the SDQ callback knows it (its save_dir)
        self._warned_missing = False
        self.num_classes = num_classes
        self.tolerance = float(tolerance)
        self.reference_acc = None if reference_acc is None else float(reference_acc)
        self.patience = patience
        self.action = action
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.save_last_good = bool(save_last_good)
        self.message: str | None = None
        self.best_acc: float | None = None
        self.initial_acc: float | None = None
        self.last_good: dict[str, Any] | None = None   # {"path", "epoch", "step", "acc"}
        self._at_chance = 0
        self._window: list[Tensor] = []   # detached losses since the last read (device tensors)
        self._window_start = 0

    # ------------------------------------------------------------------ thresholds
    def _classes(self, pl_module: nn.Module) -> int | None:
        return self.num_classes or infer_num_classes(pl_module)

    def chance_levels(self, num_classes: int) -> tuple[float, float, float]:
        """(chance, accuracy counted as chance, accuracy a reference must exceed)."""
        chance = 1.0 / num_classes
        return chance, chance + self.tolerance * (1 - chance), chance + 3 * self.tolerance * (1 - chance)

    # ------------------------------------------------------------------ loss (device side)
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss_of(outputs)
        if loss is None or self.message is not None:
            return
        loss = loss.detach()
        if loss.device.type == "cpu" and self.check_every_n_steps is None and trainer.world_size == 1:
            value = float(loss) if loss.numel() == 1 else float(loss.float().sum())  # reading is free on CPU
            if not math.isfinite(value):
                self._stop(trainer, f"training loss is {value} at epoch {trainer.current_epoch}, step "
                                    f"{trainer.global_step}; {LOSS_CAUSES}")
            return
        if not self._window:
            self._window_start = trainer.global_step - 1
        self._window.append(loss.reshape(-1)[:1])   # no device op, no sync: read in check_loss
        if len(self._window) >= (self.check_every_n_steps or ACCELERATOR_READ_EVERY):
            self.check_loss(trainer, pl_module)

    def check_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the losses since the last read (one host sync) and stop if one was not finite (on any rank)."""
        if self.message is not None:
            return
        first, value = -1, float("nan")
        if self._window:
            losses = torch.cat(self._window).float()
            bad = ~torch.isfinite(losses)
            if bool(bad.any()):
                first = int(bad.nonzero()[0, 0])
                value = float(losses[first])
        start = self._window_start
        self._window = []
        if not trainer.strategy.reduce_boolean_decision(first >= 0, all=False):
            return
        where = f"step {start + first + 1}" if first >= 0 else f"step <= {trainer.global_step} on another rank"
        self._stop(trainer, f"training loss is {value} at epoch {trainer.current_epoch}, {where}; {LOSS_CAUSES}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_loss(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.check_loss(trainer, pl_module)

    # ------------------------------------------------------------------ accuracy
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        name = find_accuracy(trainer.callback_metrics, self.monitor)
        acc = None if name is None else float(trainer.callback_metrics[name])
        if trainer.sanity_checking:
            self.initial_acc = acc
            return
        if self.message is not None:
            return
        if name is None:
            self._warn_missing(trainer)
            if trainer.global_step > 0:  # the losses read before this validation were finite
                self._save_last_good(trainer, None)
            return
        self.found = name
        ncls = self._classes(pl_module)
        collapsed = False
        if ncls is not None:
            chance, at_chance, ref_needed = self.chance_levels(ncls)
            refs = [r for r in (self.reference_acc, self.initial_acc, self.best_acc) if r is not None]
            was_sane = any(r > ref_needed for r in refs)
            low = (not math.isfinite(acc)) or acc <= at_chance
            collapsed = trainer.strategy.reduce_boolean_decision(low and was_sane, all=False)
        if not collapsed:
            self._at_chance = 0
            if math.isfinite(acc):
                self.best_acc = acc if self.best_acc is None else max(self.best_acc, acc)
                if trainer.global_step > 0:
                    self._save_last_good(trainer, acc)
            return
        self._at_chance += 1
        if self._at_chance >= self.patience:
            best = max(r for r in refs if r is not None)
            self._stop(trainer, f"{name} fell to {acc:.4f} at epoch {trainer.current_epoch}, step "
                                f"{trainer.global_step} (chance 1/{ncls} = {chance:.4f}; earlier {best:.4f}) for "
                                f"{self._at_chance} validation(s); {COLLAPSE_CAUSES}")

    # ------------------------------------------------------------------ checkpoint and stop
    def _warn_missing(self, trainer: pl.Trainer) -> None:
        if self._warned_missing:
            return
        self._warned_missing = True
        wanted = repr(self.monitor) if self.monitor is not None else f"any of {', '.join(ACCURACY_NAMES[:4])}, ..."
        logged = sorted(k for k in trainer.callback_metrics if not k.startswith("sdq/"))
        rank_zero_warn(f"divergence guard: no validation accuracy logged ({wanted}; logged: {logged or 'nothing'}), "
                       "so it checks the training loss only; log one in validation_step or name it with "
                       "SDQ(runtime={'guard': {'monitor': '<name>'}})")

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        root = self.run_dir or (Path(trainer.log_dir) if trainer.log_dir else Path(trainer.default_root_dir))
        return (self.dirpath or root / "checkpoints") / "last_good.ckpt"

    def _save_last_good(self, trainer: pl.Trainer, acc: float | None) -> None:
        record = {"path": None, "epoch": trainer.current_epoch, "step": trainer.global_step, "acc": acc}
        if self.save_last_good:
            path = self.checkpoint_path(trainer)
            trainer.save_checkpoint(path, weights_only=False)  # the whole state, to resume from
            record["path"] = str(path)
        self.last_good = record

    def _stop(self, trainer: pl.Trainer, what: str) -> None:
        good = self.last_good
        if good is None:
            keep = "no state was kept (no sane validation since training started)"
        else:
            acc = "" if good["acc"] is None else f", {self.found or self.monitor} {good['acc']:.4f}"
            where = f": {good['path']}" if good["path"] else " (save_last_good=False: not saved)"
            keep = f"last good state (epoch {good['epoch']}, step {good['step']}{acc}){where}"
        self.message = f"divergence guard: {what}; {keep}"
        if self.action == "raise":
            raise DivergenceError(self.message)
        rank_zero_warn(self.message)
        trainer.should_stop = True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"best_acc": self.best_acc, "initial_acc": self.initial_acc, "last_good": self.last_good,
                "at_chance": self._at_chance}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_acc = state_dict.get("best_acc")
        self.initial_acc = state_dict.get("initial_acc")
        self.last_good = state_dict.get("last_good")
        self._at_chance = int(state_dict.get("at_chance", 0))
