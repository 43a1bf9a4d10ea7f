"""FP teacher first, then SDQ (and, for ``compare.enabled``, a uniform baseline at the same budget)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sdq_lightning.cli.run import RunResult, fit_one
from sdq_lightning.report import write_report
from sdq_lightning.report.writer import markdown_table


def uniform_bits(cfg: DictConfig) -> int:
    """Bits of the uniform baseline: ``compare.uniform_bits``, else floor of an avg_bits target among the
    candidates, else the lowest candidate >= 2."""
    if cfg.compare.get("uniform_bits") is not None:
        return int(cfg.compare.uniform_bits)
    cands = sorted(int(b) for b in cfg.hardware.weight_bits)
    if cfg.hardware.metric == "avg_bits":
        fits = [b for b in cands if b <= math.floor(float(cfg.hardware.target))]
        if fits:
            return max(fits)
    return min([b for b in cands if b >= 2] or cands)


def train_teacher(cfg: DictConfig, run_dir: Path) -> RunResult:
    """A floating-point model trained for ``fp_teacher.epochs`` into ``run_dir/fp``."""
    return fit_one(cfg, run_dir / "fp", label="fp", sdq_enabled=False, max_epochs=int(cfg.fp_teacher.epochs))


def _row(label: str, result: RunResult) -> dict[str, Any]:
    m = result.metrics
    return {"run": label, "val/acc": m["val/acc"], "test/acc": m["test/acc"], "avg_bits": m["avg_bits"],
            "size_bytes": m["size_bytes"], "bitops": m["bitops"]}


def run_with_teacher(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``fp_teacher.enabled`` (and ``compare.enabled``): FP teacher, SDQ with KD from it (and uniform)."""
    fp = train_teacher(cfg, run_dir)
    teacher = copy.deepcopy(fp.module.model).eval()
    init = fp.module.model.state_dict() if cfg.fp_teacher.init_student else None
    sdq = fit_one(cfg, run_dir, label="sdq", teacher=teacher, init_state=init)
    if not cfg.compare.enabled:
        return sdq.metrics
    bits = uniform_bits(cfg)
    uni = fit_one(cfg, run_dir / "uniform", label=f"uniform_w{bits}", teacher=copy.deepcopy(teacher), init_state=init,
                  sdq_overrides={"weight_bits": (bits,), "search_epochs": 0})
    rows = [_row("FP (32-bit)", fp), _row("SDQ (mixed)", sdq), _row(f"uniform {bits}-bit", uni)]
    budget = {"metric": cfg.hardware.metric, "target": float(cfg.hardware.target)}
    write_report(run_dir, sdq.plan, sdq.history, sdq.metrics, budget, title=f"{cfg.name}: FP vs SDQ vs uniform",
                 comparison=rows)
    from sdq_lightning.budget import BitPlan

    print(f"\n{cfg.name}: budget {budget['metric']} <= {budget['target']:g} "
          f"(first/last layers at 8 bits count towards it)\n")
    print(markdown_table(rows))
    print("SDQ bit plan:\n" + BitPlan.from_dict(sdq.plan).table())
    print(f"\nrun folder: {run_dir}")
    result = dict(sdq.metrics)
    result["comparison"] = rows
    return result
