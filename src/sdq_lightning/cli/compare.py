"""FP teacher first, then SDQ (and, for ``compare.enabled``, a uniform baseline at the same budget)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sdq_lightning.cli.run import RunResult, fit_one
from sdq_lightning.report import write_report
from sdq_lightning.report.writer import METRIC_LABELS, _fmt, budget_check, markdown_table


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
    return fit_one(cfg, run_dir / "fp", label="fp", sdq_enabled=False, max_epochs=int(cfg.fp_teacher.epochs),
                   stage="FP teacher")


def _row(label: str, result: RunResult, budget: dict[str, Any]) -> dict[str, Any]:
    m = result.metrics
    return {"run": label, "val/acc": m["val/acc"], "test/acc": m["test/acc"], "avg_bits": m["avg_bits"],
            "size_bytes": m["size_bytes"], "bitops": m["bitops"], "budget": budget_check(m, budget)}


def _cost(row: dict[str, Any], metric: str) -> float | None:
    value = row.get({"size": "size_bytes"}.get(metric, metric))
    return None if value is None else float(value)


def verdict(sdq: dict[str, Any], uniform: dict[str, Any], budget: dict[str, Any]) -> str:
    """One plain sentence: is SDQ ahead of the uniform baseline at the same or lower cost (test accuracy, else val)?"""
    key = "test/acc" if sdq.get("test/acc") is not None and uniform.get("test/acc") is not None else "val/acc"
    metric = budget["metric"]
    a_s, a_u = sdq.get(key), uniform.get(key)
    c_s, c_u = _cost(sdq, metric), _cost(uniform, metric)
    if a_s is None or a_u is None or c_s is None or c_u is None:
        return "No verdict: an accuracy or cost is missing."
    diff = 100 * (float(a_s) - float(a_u))
    where = (f"{key} {100 * float(a_s):.2f} % at {metric} {_fmt(c_s)} against {uniform['run']} "
             f"{100 * float(a_u):.2f} % at {_fmt(c_u)}")
    if abs(diff) < 1e-9:
        return f"SDQ is NOT ahead of uniform here: the same {key} ({where})."
    if diff < 0:
        return f"SDQ is NOT ahead of uniform here: {-diff:.2f} points behind ({where})."
    if c_s <= c_u * (1 + 1e-9):
        label = METRIC_LABELS.get(metric, metric)
        return f"SDQ is ahead of uniform by {diff:.2f} points at the same or lower {label} ({where})."
    ok = [str(r.get("budget", "")).startswith("meets") for r in (sdq, uniform)]
    meets = {(True, True): "both meet", (True, False): "only SDQ meets", (False, True): "only uniform meets",
             (False, False): "neither meets"}[tuple(ok)]
    return (f"SDQ is {diff:.2f} points more accurate but uses more {METRIC_LABELS.get(metric, metric)} than uniform "
            f"({where}); "
            f"{meets} the budget, so this is not a same-cost win.")


def run_with_teacher(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``fp_teacher.enabled`` (and ``compare.enabled``): FP teacher, SDQ with KD from it (and uniform)."""
    fp = train_teacher(cfg, run_dir)
    teacher = copy.deepcopy(fp.module.model).eval()
    init = fp.module.model.state_dict() if cfg.fp_teacher.init_student else None
    sdq = fit_one(cfg, run_dir, label="sdq", teacher=teacher, init_state=init, stage="SDQ")
    if not cfg.compare.enabled:
        return sdq.metrics
    bits = uniform_bits(cfg)
    uni = fit_one(cfg, run_dir / "uniform", label=f"uniform_w{bits}", teacher=copy.deepcopy(teacher), init_state=init,
                  sdq_overrides={"weight_bits": (bits,), "search_epochs": 0}, stage=f"uniform {bits}-bit")
    budget = {"metric": cfg.hardware.metric, "target": float(cfg.hardware.target)}
    rows = [_row("FP (32-bit)", fp, budget), _row("SDQ (mixed)", sdq, budget), _row(f"uniform {bits}-bit", uni, budget)]
    note = verdict(rows[1], rows[2], budget)
    write_report(run_dir, sdq.plan, sdq.history, sdq.metrics, budget, title=f"{cfg.name}: FP vs SDQ vs uniform",
                 comparison=rows, comparison_note=note)
    from sdq_lightning.budget import BitPlan

    first_last = {"8bit": "first/last layers at 8 bits count towards it",
                  "fp": "first/last layers in floating point count at 32 bits",
                  "search": "first/last layers are searched too"}.get(str(cfg.sdq.layers.first_last), "")
    print(f"\n{cfg.name}: budget {budget['metric']} <= {budget['target']:g} ({first_last})\n")
    print(markdown_table(rows))
    print(note + "\n")
    print("SDQ bit plan:\n" + BitPlan.from_dict(sdq.plan).table())
    print(f"\nrun folder: {run_dir}")
    result = dict(sdq.metrics)
    result["comparison"] = rows
    result["verdict"] = note
    return result
