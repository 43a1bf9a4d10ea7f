"""Run reports (report.md + PNG plots) and the sweep summary written at the end of a multirun."""

from sdq_lightning.report.plots import plot_bits_per_layer, plot_bits_vs_params, plot_pareto, plot_training_curves
from sdq_lightning.report.writer import budget_rows, plan_rows, write_report

__all__ = [
    "budget_rows",
    "plan_rows",
    "plot_bits_per_layer",
    "plot_bits_vs_params",
    "plot_pareto",
    "plot_training_curves",
    "write_report",
]
