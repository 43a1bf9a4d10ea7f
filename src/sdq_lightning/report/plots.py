"""Matplotlib plots (Agg backend, PNG files) of a bit plan, a run's history and a sweep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FP_BITS = 32


def _layers(plan: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return dict(plan.get("layers", plan))


def _bits(value: int | None) -> int:
    return FP_BITS if value is None else int(value)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bits_per_layer(plan: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart of weight bits per layer, in network order (FP layers drawn at 32 with a hatch)."""
    layers = _layers(plan)
    names = list(layers)
    bits = [_bits(lb.get("w_bits")) for lb in layers.values()]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4))
    bars = ax.bar(range(len(names)), bits, color="tab:blue")
    for bar, lb in zip(bars, layers.values()):
        if lb.get("w_bits") is None:
            bar.set_hatch("//")
            bar.set_color("tab:gray")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("weight bits")
    ax.set_ylim(0, max([8, *[b for b in bits if b < FP_BITS]]) + 1)
    ax.set_title("bits per layer")
    return _save(fig, path)


def plot_bits_vs_params(plan: Mapping[str, Any], path: str | Path) -> Path:
    """Scatter of weight bits against a layer's parameter count (log x): do larger layers get fewer bits?"""
    layers = {n: lb for n, lb in _layers(plan).items() if lb.get("w_bits") is not None and lb.get("params")}
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [lb["params"] for lb in layers.values()]
    ys = [lb["w_bits"] for lb in layers.values()]
    ax.scatter(xs, ys, color="tab:orange", edgecolor="black", zorder=3)
    if xs:
        ax.set_xscale("log")
    ax.set_xlabel("parameters in layer (log)")
    ax.set_ylabel("weight bits")
    ax.grid(True, alpha=0.3)
    ax.set_title("bits against layer size")
    return _save(fig, path)


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path,
                         budget_target: float | None = None, budget_metric: str | None = None) -> Path:
    """Expected average bits (left axis) and val accuracy (right axis) per epoch; dashed: the phase boundary."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    bits = [(e, h["expected_avg_bits"]) for e, h in zip(epochs, history) if h.get("expected_avg_bits") is not None]
    if bits:
        ax.plot(*zip(*bits), "o-", color="tab:blue", label="expected avg bits")
    if budget_target is not None and budget_metric == "avg_bits":
        ax.axhline(budget_target, color="tab:blue", ls=":", label="avg-bits target")
    ax.set_xlabel("epoch")
    ax.set_ylabel("average weight bits", color="tab:blue")
    boundary = [e for e, h in zip(epochs, history) if h.get("frozen")]
    for e in boundary:
        ax.axvline(e + 0.5, color="gray", ls="--", label="plan frozen")
    acc = [(e, h["val/acc"]) for e, h in zip(epochs, history) if h.get("val/acc") is not None]
    ax2 = ax.twinx()
    if acc:
        ax2.plot(*zip(*acc), "s-", color="tab:green", label="val acc")
    ax2.set_ylabel("val accuracy", color="tab:green")
    ax2.set_ylim(0, 1.02)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="lower left", fontsize=8)
    ax.set_title("search and training")
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
