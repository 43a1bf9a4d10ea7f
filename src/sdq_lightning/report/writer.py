"""``report.md`` of one run: budget table, plan, plots, and (demo) the FP / SDQ / uniform comparison."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdq_lightning.report.plots import plot_bits_per_layer, plot_bits_vs_params, plot_training_curves

METRIC_LABELS = {"avg_bits": "average weight bits", "size": "size (bytes)", "bitops": "BitOPs / sample"}
FP_BITS = 32
SEARCH_SECTION = ("\n## The search\n\nEach searched layer's expected bits, the expected cost against the budget and "
                  "the budget controller over the search steps (data: `search_trace.json`).\n\n"
                  "![search trace](plots/search_trace.png)\n")


def plan_rows(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per layer: layer, w_bits, a_bits (32 = floating point), params, macs."""
    rows = []
    for name, lb in plan.get("layers", {}).items():
        rows.append({"layer": name,
                     "w_bits": FP_BITS if lb.get("w_bits") is None else int(lb["w_bits"]),
                     "a_bits": FP_BITS if lb.get("a_bits") is None else int(lb["a_bits"]),
                     "params": int(lb.get("params", 0)), "macs": int(lb.get("macs", 0))})
    return rows


def budget_rows(plan: Mapping[str, Any], budget: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Target against achieved for every cost metric (the target only exists for the budget's metric)."""
    costs = plan.get("costs", {})
    rows = []
    for metric in ("avg_bits", "size", "bitops"):
        achieved = costs.get(metric)
        target = budget.get("target") if budget.get("metric") == metric else None
        within = None if target is None or achieved is None else achieved <= float(target) * (1 + 1e-9)
        rows.append({"metric": metric, "target": target, "achieved": achieved, "within": within})
    return rows


def cost_rows(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What the plan costs in every metric (runs without a budget: floating point)."""
    costs = plan.get("costs", {})
    return [{"metric": m, "achieved": costs.get(m)} for m in ("avg_bits", "size", "bitops")]


def budget_heading(budget: Mapping[str, Any]) -> str:
    """``## Budget (average weight bits <= 2)``, or ``## Costs (no budget: floating-point run)``."""
    metric = budget.get("metric") if budget else None
    if not metric:
        return "\n## Costs (no budget: floating-point run)\n"
    return f"\n## Budget ({METRIC_LABELS.get(metric, metric)} <= {_fmt(budget.get('target'))})\n"


def budget_check(metrics: Mapping[str, Any], budget: Mapping[str, Any]) -> str:
    """``meets (1.314 <= 1.5)`` or ``MISSES by 0.1172 (2.117 > 2)`` for a run's achieved cost; ``-`` when unknown."""
    key = {"size": "size_bytes"}.get(budget.get("metric"), budget.get("metric"))
    achieved, target = metrics.get(key), budget.get("target")
    if achieved is None or target is None:
        return "-"
    achieved, target = float(achieved), float(target)
    if achieved <= target * (1 + 1e-9):
        return f"meets ({_fmt(achieved)} <= {_fmt(target)})"
    return f"MISSES by {_fmt(achieved - target)} ({_fmt(achieved)} > {_fmt(target)})"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, plan: Mapping[str, Any] | None, history: Sequence[Mapping[str, Any]],
                 metrics: Mapping[str, Any], budget: Mapping[str, Any], title: str = "SDQ run",
                 comparison: Sequence[Mapping[str, Any]] | None = None,
                 comparison_note: str | None = None) -> dict[str, Path]:
    """Write ``report.md`` and ``plots/*.png`` into ``run_dir``; returns the images by key. A search trace plotted
    into the run folder before (``plots/search_trace.png``) gets its section too."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    images: dict[str, Path] = {}
    if plan is not None:
        images["bits_per_layer"] = plot_bits_per_layer(plan, plots / "bits_per_layer.png", budget)
        images["bits_vs_params"] = plot_bits_vs_params(plan, plots / "bits_vs_params.png", budget)
    if history:
        images["training_curves"] = plot_training_curves(history, plots / "training_curves.png",
                                                         budget.get("target"), budget.get("metric"))
    out = [f"# {title}\n"]
    scalar = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    out += ["## Final metrics\n", markdown_table([{"key": k, "value": v} for k, v in scalar.items()])]
    if comparison:
        out += ["\n## FP vs SDQ vs uniform\n", markdown_table(comparison)]
        if comparison_note:
            out.append(f"\n{comparison_note}\n")
    if plan is not None:
        rows = budget_rows(plan, budget) if budget.get("metric") else cost_rows(plan)
        out += [budget_heading(budget), markdown_table(rows)]
        convention = plan.get("metadata", {}).get("convention")
        if convention:
            out.append(f"\nCounting convention: {convention}\n")
        out += ["\n## Bit plan\n", markdown_table(plan_rows(plan))]
    captions = {"bits_per_layer": "Bits per layer", "bits_vs_params": "Bits against parameter count",
                "training_curves": "Expected average bits and val accuracy over epochs"}
    if images:
        out.append("\n## Plots\n")
        for key, path in images.items():
            out.append(f"### {captions[key]}\n\n![{key}]({path.relative_to(run_dir).as_posix()})\n")
    if (plots / "search_trace.png").is_file():
        out.append(SEARCH_SECTION)
    (run_dir / "report.md").write_text("\n".join(out))
    return images
