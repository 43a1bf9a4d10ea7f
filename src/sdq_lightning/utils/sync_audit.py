"""Find the host-device synchronisations of a training step (CUDA): where the step waits for the GPU.

A step that waits for the GPU (``.item()``, ``float(tensor)``, a blocking copy, ``nonzero``, a value check in a
metric) cannot queue the next step's work while the current one runs, so a small model becomes bound by the host.
:class:`SyncAudit` turns on ``torch.cuda.set_sync_debug_mode("warn")`` for ``steps`` training steps after
``start`` steps of warm-up, records the Python call site of every synchronising call, and prints a table
(call site, count, calls per step). Add it to any Lightning run, or to the Hydra app::

    sdq-train ... '+callbacks.sync_audit._target_=sdq_lightning.utils.sync_audit.SyncAudit'

The window runs from the start of step ``start`` to the start of step ``start + steps``, so it covers the forward,
backward, optimizer step, every callback's batch-end hook, logging and the loading of the next batch. Without CUDA
the callback says so once and does nothing. The table is written to ``<log dir>/sync_audit.json`` (or ``out``).
"""

from __future__ import annotations

import json
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

_SYNC_MESSAGE = r".*synchroniz.*"


def _site(stack: list[traceback.FrameSummary], depth: int) -> str:
    """The innermost ``depth`` frames outside this module and ``warnings``, innermost first."""
    frames = [f for f in reversed(stack) if f.filename != __file__ and Path(f.filename).name != "warnings.py"]
    parts = []
    for f in frames[:depth]:
        name = "/".join(Path(f.filename).parts[-2:])
        parts.append(f"{name}:{f.lineno} {f.name}")
    return " <- ".join(parts)


class SyncAudit(Callback):
    """Counts the CUDA host-device synchronisations of ``steps`` training steps, by Python call site."""

    def __init__(self, start: int = 10, steps: int = 20, depth: int = 3, out: str | None = None) -> None:
        if start < 0 or steps <= 0 or depth <= 0:
            raise ValueError(f"SyncAudit needs start >= 0, steps > 0 and depth > 0, got start={start!r}, "
                             f"steps={steps!r}, depth={depth!r}")
        self.start, self.steps, self.depth, self.out = int(start), int(steps), int(depth), out
        self.counts: Counter[str] = Counter()
        self.steps_audited = 0
        self._seen = 0
        self._active = False
        self._saved: tuple[Any, Any] | None = None
        self._cuda: bool | None = None

    # ---- recording
    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if "synchroniz" in str(message):
            stack = traceback.extract_stack()[:-1]
            if not any(f.name == "set_sync_debug_mode" for f in stack[-3:]):  # the audit's own switch, not the step
                self.counts[_site(stack, self.depth)] += 1
            return
        assert self._saved is not None
        self._saved[0](message, category, filename, lineno, file, line)

    def _begin(self) -> None:
        self._saved = (warnings.showwarning, list(warnings.filters))
        warnings.filterwarnings("always", message=_SYNC_MESSAGE)
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")
        self._active = True

    def _end(self, trainer: pl.Trainer) -> None:
        if not self._active:
            return
        torch.cuda.set_sync_debug_mode("default")
        assert self._saved is not None
        warnings.showwarning, warnings.filters[:] = self._saved[0], self._saved[1]
        self._active = False
        self.report(trainer)

    # ---- hooks
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._cuda is None:
            self._cuda = pl_module.device.type == "cuda"
            if not self._cuda:
                rank_zero_info(f"[SyncAudit] the module runs on {pl_module.device.type}, not CUDA: nothing to audit")
        if not self._cuda:
            return
        if self._active:
            self.steps_audited += 1
            if self.steps_audited >= self.steps:
                self._end(trainer)
        elif self._seen == self.start and self.steps_audited == 0:
            self._begin()
        self._seen += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:  # the epoch ended inside the window: count the steps it covered
            self.steps_audited += 1
            self._end(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer)

    # ---- output
    def table(self) -> list[dict[str, Any]]:
        steps = max(self.steps_audited, 1)
        return [{"site": site, "count": n, "per_step": n / steps} for site, n in self.counts.most_common()]

    def report(self, trainer: pl.Trainer | None = None) -> None:
        total = sum(self.counts.values())
        rows = self.table()
        lines = [f"[SyncAudit] {total} host-device synchronisations in {self.steps_audited} training steps "
                 f"({total / max(self.steps_audited, 1):.2f} per step), by call site (innermost first):"]
        lines += [f"  {r['per_step']:6.2f}/step  {r['site']}" for r in rows[:25]]
        rank_zero_info("\n".join(lines))
        path = Path(self.out) if self.out else None
        if path is None and trainer is not None and trainer.log_dir:
            path = Path(trainer.log_dir) / "sync_audit.json"
        if path is not None and (trainer is None or trainer.is_global_zero):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"steps": self.steps_audited, "total": total, "sites": rows}, indent=2))
