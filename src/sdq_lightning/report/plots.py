"""Matplotlib plots (Agg backend, PNG files) of a bit plan, a run's history and a sweep."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _layers(plan: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return dict(plan.get("layers", plan))


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a legend outside the axes and a long title stay in the image
    plt.close(fig)
    return path


def _wrapped(title: str, width: int = 64) -> str:
    return "\n".join(textwrap.wrap(title, width))


def short_names(names: Sequence[str], width: int = 24) -> dict[str, str]:
    """Point labels: each name without the prefix every layer shares (``model.``), cut to its last ``width``
    characters; never a bare last component such as ``0`` or ``conv1`` that several layers share."""
    parts = [n.split(".") for n in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    out = {}
    for name, p in zip(names, parts):
        rel = ".".join(p[common:])
        out[name] = rel if len(rel) <= width else "\u2026" + rel[-(width - 1):]
    return out


FP_ROW = 9.5          # where floating-point layers are drawn on a bits axis (labelled "FP (32)")
COLORS = {"searched": "tab:blue", "edge": "tab:orange", "fixed": "tab:olive", "fp": "tab:gray"}
LABELS = {"searched": "searched", "edge": "fixed (first/last layer)", "fixed": "fixed (not searched)",
          "fp": "floating point"}


def _budget(plan: Mapping[str, Any], budget: Mapping[str, Any] | None) -> tuple[str | None, float | None]:
    budget = budget if budget and budget.get("metric") else plan.get("metadata", {}).get("budget") or {}
    target = budget.get("target")
    return budget.get("metric"), None if target is None else float(target)


def _kinds(plan: Mapping[str, Any]) -> dict[str, str]:
    """Per layer: ``fp`` (floating point), ``edge`` (first or last layer, fixed outside the search), ``fixed``
    (another layer outside the search, e.g. a uniform run) or ``searched``."""
    fixed = plan.get("metadata", {}).get("fixed_layers") or {}
    names = list(_layers(plan))
    ends = {names[0], names[-1]} if names else set()
    return {name: "fp" if lb.get("w_bits") is None else ("edge" if name in ends else "fixed") if name in fixed
            else "searched" for name, lb in _layers(plan).items()}


def _bits_axis(ax: plt.Axes, show_fp: bool) -> None:
    ticks = list(range(9))
    ax.set_yticks(ticks + ([FP_ROW] if show_fp else []), [str(t) for t in ticks] + (["FP (32)"] if show_fp else []))
    ax.set_ylim(0, FP_ROW + 1 if show_fp else 9)
    ax.set_ylabel("weight bits")


def _title(plan: Mapping[str, Any], metric: str | None, target: float | None, what: str) -> str:
    costs = plan.get("costs", {})
    avg = costs.get("avg_bits")
    text = what if avg is None else f"{what}: plan {avg:.3g} avg bits"
    if metric and target is not None:
        achieved = costs.get(metric)
        met = "" if achieved is None else (" (met)" if achieved <= target * (1 + 1e-9) else " (MISSED)")
        text += f"; budget {metric} <= {target:g}{met}"
    elif not any(lb.get("w_bits") is not None for lb in _layers(plan).values()):
        text += " (floating-point model, no budget)"
    return text


def _target_line(ax: plt.Axes, metric: str | None, target: float | None) -> None:
    if metric == "avg_bits" and target is not None:
        ax.axhline(target, color="tab:red", ls="--", lw=1.2, label=f"budget: average over layers <= {target:g}")


def plot_bits_per_layer(plan: Mapping[str, Any], path: str | Path, budget: Mapping[str, Any] | None = None) -> Path:
    """Bar chart of weight bits per layer, in network order: searched layers blue, fixed first/last layers orange,
    other fixed layers (uniform runs) olive, floating-point layers grey at the "FP (32)" row; each bar labelled with
    its bits; the avg-bits budget dashed."""
    layers = _layers(plan)
    kinds = _kinds(plan)
    names = list(layers)
    heights = [FP_ROW if lb.get("w_bits") is None else int(lb["w_bits"]) for lb in layers.values()]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names) + 2.5), 4.2))
    seen: set[str] = set()
    for i, (name, h) in enumerate(zip(names, heights)):
        kind = kinds[name]
        ax.bar(i, h, color=COLORS[kind], edgecolor="black", linewidth=0.5, hatch="//" if kind == "fp" else None,
               label=None if kind in seen else LABELS[kind])
        seen.add(kind)
        if len(names) <= 60:
            ax.annotate("FP" if kind == "fp" else str(h), (i, h), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 1), textcoords="offset points")
    metric, target = _budget(plan, budget)
    _target_line(ax, metric, target)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    _bits_axis(ax, "fp" in seen)
    ax.set_ylim(0, ax.get_ylim()[1] + 0.6)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(_wrapped(_title(plan, metric, target, "bits per layer"), 90), fontsize=9)
    return _save(fig, path)


def plot_bits_vs_params(plan: Mapping[str, Any], path: str | Path, budget: Mapping[str, Any] | None = None) -> Path:
    """Scatter of weight bits against a layer's parameter count (log x): do larger layers get fewer bits?
    Fixed first/last layers are orange squares, floating-point layers grey at the "FP (32)" row."""
    layers = {n: lb for n, lb in _layers(plan).items() if lb.get("params")}
    kinds = _kinds(plan)
    labels = short_names(list(layers))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = {"searched": "o", "edge": "s", "fixed": "D", "fp": "X"}
    for kind in ("searched", "edge", "fixed", "fp"):
        pts = [(lb["params"], FP_ROW if lb.get("w_bits") is None else lb["w_bits"], n) for n, lb in layers.items()
               if kinds[n] == kind]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=COLORS[kind], marker=markers[kind],
                   edgecolor="black", zorder=3, label=LABELS[kind])
        if len(layers) <= 30:
            for x, y, n in pts:
                ax.annotate(labels[n], (x, y), fontsize=6, xytext=(4, 3), textcoords="offset points")
    if layers:
        ax.set_xscale("log")
    metric, target = _budget(plan, budget)
    _target_line(ax, metric, target)
    _bits_axis(ax, any(k == "fp" for k in kinds.values()))
    ax.set_xlabel("parameters in layer (log)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(_wrapped(_title(plan, metric, target, "bits against layer size")), fontsize=9)
    return _save(fig, path)


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path,
                         budget_target: float | None = None, budget_metric: str | None = None) -> Path:
    """Expected average bits (left axis, from 0, the budget line inside it) and val accuracy (right axis) per epoch;
    dashed: the phase boundary. A floating-point run (no bits recorded) plots the accuracy alone."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    bits = [(e, h["expected_avg_bits"]) for e, h in zip(epochs, history) if h.get("expected_avg_bits") is not None]
    acc = [(e, h["val/acc"]) for e, h in zip(epochs, history) if h.get("val/acc") is not None]
    ax.set_xlabel("epoch")
    if not bits:  # floating point: no bits axis
        if acc:
            ax.plot(*zip(*acc), "s-", color="tab:green", label="val acc")
        ax.set_ylabel("val accuracy", color="tab:green")
        ax.set_ylim(0, 1.02)
        ax.set_title("training (floating point, no bits)")
        return _save(fig, path)
    ax.plot(*zip(*bits), "o-", color="tab:blue", label="expected avg bits")
    line = budget_target is not None and budget_metric == "avg_bits"
    if line:
        ax.axhline(budget_target, color="tab:red", ls="--", lw=1.2, label=f"budget: avg bits <= {budget_target:g}")
    top = max([b for _, b in bits] + ([budget_target] if line else []))
    ax.set_ylim(0, top * 1.15)  # from 0: a change of a few hundredths of a bit does not fill the axis
    ax.set_ylabel("average weight bits", color="tab:blue")
    boundary = [e for e, h in zip(epochs, history) if h.get("frozen")]
    for e in boundary:
        ax.axvline(e + 0.5, color="gray", ls="--", label="plan frozen")
    ax2 = ax.twinx()
    if acc:
        ax2.plot(*zip(*acc), "s-", color="tab:green", label="val acc")
    ax2.set_ylabel("val accuracy", color="tab:green")
    ax2.set_ylim(0, 1.02)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="center right", fontsize=8)
    ax.set_title("search and training" + (f" (budget {budget_metric} <= {budget_target:g})"
                                          if budget_target is not None and budget_metric else ""))
    return _save(fig, path)


def plot_pareto(points: Sequence[Mapping[str, Any]], path: str | Path, cost_key: str = "avg_bits",
                acc_key: str = "val/acc") -> Path:
    """Accuracy against cost for each sweep job; the Pareto front (cheaper and at least as accurate) as a line."""
    pts = sorted((float(p[cost_key]), float(p[acc_key]), str(p.get("label", ""))) for p in points
                 if p.get(cost_key) is not None and p.get(acc_key) is not None)
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:purple", zorder=3)
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front, best = [], float("-inf")
        for x, y, _ in pts:
            if y > best:
                front.append((x, y))
                best = y
        ax.plot(*zip(*front), "--", color="tab:purple", alpha=0.6, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel(cost_key)
    ax.set_ylabel(acc_key)
    ax.grid(True, alpha=0.3)
    ax.set_title("accuracy against cost")
    return _save(fig, path)
