"""Run reports: budget heading and checks, the compare verdict, plot markings (FP row, fixed layers, budget line)
and sweep labels by override."""

from __future__ import annotations

import json

import pytest

from sdq_lightning.cli.compare import verdict
from sdq_lightning.report import plots
from sdq_lightning.report.sweep import override_labels, write_sweep_summary
from sdq_lightning.report.writer import budget_check, budget_heading, write_report


def _plan(bits: dict[str, int | None], fixed=("conv1", "fc"), budget=None) -> dict:
    params = {"conv1": 288, "conv2": 18432, "conv3": 73728, "fc": 1280}
    layers = {n: {"w_bits": b, "a_bits": None, "params": params[n], "macs": 1000} for n, b in bits.items()}
    total = sum(params.values())
    avg = sum((32 if b is None else b) * params[n] for n, b in bits.items()) / total
    meta = {"fixed_layers": {n: 8 for n in fixed}}
    if budget:
        meta["budget"] = budget
    return {"metadata": meta, "costs": {"avg_bits": avg, "size": 1.0, "bitops": 2.0}, "layers": layers}


FP_PLAN = _plan(dict.fromkeys(("conv1", "conv2", "conv3", "fc")), fixed=())
SDQ_PLAN = _plan({"conv1": 8, "conv2": 2, "conv3": 1, "fc": 8}, budget={"metric": "avg_bits", "target": 1.5})


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would save (kept open for inspection)."""
    captured = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: captured.append(fig) or path)
    return captured


def test_fp_report_has_no_none_budget(tmp_path) -> None:
    write_report(tmp_path, FP_PLAN, [], {"val/acc": 0.97}, {}, title="fp")
    text = (tmp_path / "report.md").read_text()
    assert "## Costs (no budget: floating-point run)" in text
    assert "None" not in text and "target -" not in text and "## Budget" not in text
    assert budget_heading({"metric": "avg_bits", "target": 2.0}) == "\n## Budget (average weight bits <= 2)\n"


def test_budget_check_flags_misses() -> None:
    assert budget_check({"avg_bits": 1.314}, {"metric": "avg_bits", "target": 1.5}) == "meets (1.314 <= 1.5)"
    assert budget_check({"avg_bits": 2.117}, {"metric": "avg_bits", "target": 2.0}) == "MISSES by 0.117 (2.117 > 2)"
    assert budget_check({"size_bytes": 1000.0}, {"metric": "size", "target": 900}).startswith("MISSES by 100 ")
    assert budget_check({}, {"metric": "bitops", "target": 1.0}) == "-"


def _row(run, acc, bits, target=1.5):
    row = {"run": run, "val/acc": acc, "test/acc": acc, "avg_bits": bits}
    row["budget"] = budget_check(row, {"metric": "avg_bits", "target": target})
    return row


@pytest.mark.parametrize(("sdq", "uni", "start"), [
    (_row("SDQ", 0.95, 1.4), _row("uniform 1-bit", 0.90, 1.4), "SDQ is ahead of uniform by 5.00 points at the same"),
    (_row("SDQ", 0.95, 1.4), _row("uniform 1-bit", 0.95, 1.1), "SDQ is NOT ahead of uniform here: the same test/acc"),
    (_row("SDQ", 0.90, 1.4), _row("uniform 1-bit", 0.95, 1.1), "SDQ is NOT ahead of uniform here: 5.00 points behind"),
    (_row("SDQ", 0.95, 1.4), _row("uniform 1-bit", 0.90, 1.1), "SDQ is 5.00 points more accurate but uses more"),
])
def test_verdict(sdq, uni, start) -> None:
    text = verdict(sdq, uni, {"metric": "avg_bits", "target": 1.5})
    assert text.startswith(start), text
    assert "\n" not in text


def test_verdict_says_which_rows_meet_the_budget() -> None:
    budget = {"metric": "avg_bits", "target": 2.0}
    text = verdict(_row("SDQ", 0.95, 1.99, 2.0), _row("uniform 2-bit", 0.94, 2.12, 2.0), budget)
    assert text.startswith("SDQ is ahead of uniform by 1.00 points")
    text = verdict(_row("SDQ", 0.95, 1.99, 2.0), _row("uniform 1-bit", 0.94, 1.1, 2.0), budget)
    assert text.endswith("both meet the budget, so this is not a same-cost win.")
    text = verdict(_row("SDQ", 0.95, 2.5, 2.0), _row("uniform 3-bit", 0.94, 2.2, 2.0), budget)
    assert "neither meets the budget" in text


def _texts(items) -> list[str]:
    return [t.get_text() for t in items]


def test_bits_plot_labels_fp_row_and_marks_fixed_layers_and_budget(figures, tmp_path) -> None:
    plots.plot_bits_per_layer(FP_PLAN, tmp_path / "fp.png", {})
    ax = figures[-1].axes[0]
    assert "FP (32)" in _texts(ax.get_yticklabels())
    assert max(p.get_height() for p in ax.patches) == plots.FP_ROW < ax.get_ylim()[1]
    assert "floating-point model, no budget" in ax.get_title() and "None" not in ax.get_title()

    plots.plot_bits_per_layer(SDQ_PLAN, tmp_path / "sdq.png")
    ax = figures[-1].axes[0]
    legend = _texts(ax.get_legend().get_texts())
    assert "fixed (first/last layer)" in legend and "searched" in legend
    assert "budget: average over layers <= 1.5" in legend
    assert [p.get_facecolor()[:3] for p in ax.patches][0] != [p.get_facecolor()[:3] for p in ax.patches][1]
    assert "budget avg_bits <= 1.5 (met)" in ax.get_title()


def test_bits_vs_params_includes_fixed_layers_and_budget(figures, tmp_path) -> None:
    plots.plot_bits_vs_params(SDQ_PLAN, tmp_path / "bvp.png", {"metric": "avg_bits", "target": 1.2})
    ax = figures[-1].axes[0]
    legend = _texts(ax.get_legend().get_texts())
    assert legend == ["searched", "fixed (first/last layer)", "budget: average over layers <= 1.2"]
    assert "(MISSED)" in ax.get_title()


def test_plots_write_png_files(tmp_path) -> None:
    for fn in (plots.plot_bits_per_layer, plots.plot_bits_vs_params):
        for plan in (FP_PLAN, SDQ_PLAN):
            path = fn(plan, tmp_path / f"{fn.__name__}_{id(plan)}.png")
            assert path.stat().st_size > 5000


def test_override_labels_keep_what_differs() -> None:
    jobs = [["experiment=digits_demo", "hardware.target=2"], ["experiment=digits_demo", "hardware.target=3"]]
    assert override_labels(jobs) == ["hardware.target=2", "hardware.target=3"]
    assert override_labels([["a=1", "b=2"]]) == ["a=1 b=2"]
    assert override_labels([["a=1"], ["a=1"]]) == ["(common)", "(common)"]


def test_sweep_summary_labels_points_by_overrides(tmp_path, figures) -> None:
    for job, target in ((0, 2), (1, 3)):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps({
            "val/acc": 0.9 + job / 100, "avg_bits": target - 0.01, "budget_met": True,
            "overrides": ["experiment=digits_demo", f"hardware.target={target}"]}))
    text = write_sweep_summary(tmp_path).read_text()
    assert "Overrides common to every job: `experiment=digits_demo`" in text
    assert "| 0 | hardware.target=2 |" in text and "| 1 | hardware.target=3 |" in text
    annotations = [c.get_text() for c in figures[-1].axes[0].texts]
    assert annotations == ["hardware.target=2", "hardware.target=3"]


def test_uniform_plan_marks_middle_layers_not_searched(figures, tmp_path) -> None:
    plan = _plan({"conv1": 8, "conv2": 1, "conv3": 1, "fc": 8}, fixed=("conv1", "conv2", "conv3", "fc"))
    plots.plot_bits_per_layer(plan, tmp_path / "u.png", {"metric": "avg_bits", "target": 1.5})
    legend = _texts(figures[-1].axes[0].get_legend().get_texts())
    assert legend == ["budget: average over layers <= 1.5", "fixed (first/last layer)", "fixed (not searched)"]


RESNET_NAMES = ("model.conv1", "model.layer1.0.conv1", "model.layer1.0.conv2", "model.layer2.0.conv1",
                "model.layer2.0.downsample.0", "model.fc")


def _resnet_plan() -> dict:
    layers = {n: {"w_bits": b, "a_bits": 4, "params": p, "macs": 1000}
              for n, b, p in zip(RESNET_NAMES, (8, 2, 3, 2, 4, 8), (432, 2304, 2304, 4608, 512, 640))}
    meta = {"fixed_layers": {"model.conv1": 8, "model.fc": 8}, "budget": {"metric": "avg_bits", "target": 1.93}}
    return {"metadata": meta, "costs": {"avg_bits": 1.9287, "size": 1.0, "bitops": 2.0}, "layers": layers}


def test_bits_vs_params_names_layers_by_path_and_keeps_its_title_inside(figures, tmp_path) -> None:
    plots.plot_bits_vs_params(_resnet_plan(), tmp_path / "bvp.png")
    fig = figures[-1]
    ax = fig.axes[0]
    labels = {t.get_text() for t in ax.texts}
    assert {"layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.downsample.0", "fc"} <= labels
    fig.tight_layout()
    fig.canvas.draw()
    title = ax.title.get_window_extent(fig.canvas.get_renderer())
    assert 0 <= title.x0 and title.x1 <= fig.bbox.width and title.y1 <= fig.bbox.height, (title, fig.bbox)


def test_short_names_strip_the_shared_prefix_and_cut_long_paths() -> None:
    names = plots.short_names(["net.0", "net.3", "net.features.12.block.conv_pw"], width=12)
    assert names == {"net.0": "0", "net.3": "3", "net.features.12.block.conv_pw": "\u2026ock.conv_pw"}
    assert plots.short_names(["model.a.conv", "model.b.conv"]) == {"model.a.conv": "a.conv", "model.b.conv": "b.conv"}


def test_training_curves_bits_axis_starts_at_zero_with_the_budget_inside(figures, tmp_path) -> None:
    history = [{"epoch": 0, "expected_avg_bits": 1.93, "val/acc": 0.5},
               {"epoch": 1, "expected_avg_bits": 1.91, "val/acc": 0.7, "frozen": True},
               {"epoch": 2, "expected_avg_bits": 1.89, "val/acc": 0.8}]
    plots.plot_training_curves(history, tmp_path / "curves.png", 2.0, "avg_bits")
    ax = figures[-1].axes[0]
    low, high = ax.get_ylim()
    assert low == 0 and high >= 2.0 * 1.1  # the budget line is drawn inside the axis, not on its border
    assert "budget: avg bits <= 2" in _texts(ax.get_legend().get_texts())


def test_training_curves_of_a_floating_point_run_have_no_bits_axis(figures, tmp_path) -> None:
    plots.plot_training_curves([{"epoch": 0, "val/acc": 0.6}, {"epoch": 1, "val/acc": 0.8}], tmp_path / "fp.png")
    fig = figures[-1]
    assert len(fig.axes) == 1 and fig.axes[0].get_ylabel() == "val accuracy"
    assert [list(line.get_ydata()) for line in fig.axes[0].lines] == [[0.6, 0.8]]
