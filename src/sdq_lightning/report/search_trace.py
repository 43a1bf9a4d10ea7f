"""Plot of the bit search over its steps: every layer's expected bits, the expected cost against the target, and
the budget controller (the multiplier under ``budget_control="dual"``, the penalty under ``"penalty"``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_search_trace"]


def plot_search_trace(trace: Mapping[str, Any], path: str | Path, target: float | None = None,
                      metric: str = "avg_bits", control: str = "dual") -> Path | None:
    """Write the PNG; returns its path, or None when the trace is empty (no search ran)."""
    steps = list(trace.get("step") or [])
    if not steps:
        return None
    per_layer = trace["expected_bits"]
    names = list(per_layer[0].keys())
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True, gridspec_kw={"height_ratios": [3, 1.3, 1]})
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(names):
        axes[0].plot(steps, [row[name] for row in per_layer], color=cmap(i / max(len(names) - 1, 1)), lw=1.2,
                     label=name)
    axes[0].set_ylabel("expected weight bits")
    axes[0].set_title("Bit search: each layer's expected bits (colour: depth, first searched layer dark)")
    if len(names) <= 24:
        axes[0].legend(fontsize=6, ncol=3, loc="upper right")
    axes[1].plot(steps, trace["expected_cost"], color="black", lw=1.5, label=f"expected {metric}")
    if target is not None:
        axes[1].axhline(float(target), color="tab:red", ls="--", lw=1, label=f"budget {target:g}")
    axes[1].set_ylabel(metric)
    axes[1].legend(fontsize=8)
    axes[2].plot(steps, trace["control"], color="tab:purple", lw=1.2)
    axes[2].set_ylabel("multiplier" if control == "dual" else "penalty")
    axes[2].set_xlabel("search step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
