"""Issue 22's table: plans trained by the fixed-plan protocol (experiments/fixed_plan_protocol.sh), paired by seed.

    python experiments/fixed_plan_table.py outputs/runs/fixedplan_*_e1_sub10000 [--metric test/acc]

Run folders are named ``fixedplan_b<budget>_<plan>_s<seed>_<tag>``. Per budget and plan: runs, plan average bits,
mean and standard deviation of the metric; then every measured plan (oracle, hawq, any extra plan such as sdq)
against every control (random, size_greedy, uniform) and against each other on the seeds both have: mean paired difference with its 95 %
t-interval, and how many seeds the plan is ahead. ``--metric val/acc`` reads the held-out split (for choices);
the default, test/acc, is the final table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

CONTROLS = ("random", "size_greedy", "uniform")
NAME = re.compile(r"fixedplan_b(?P<budget>[\d.]+)_(?P<plan>.+?)_s(?P<seed>\d+)_(?P<tag>.+)")


def finished_runs(paths: list[str], name: re.Pattern, metric: str) -> Iterator[tuple[re.Match, dict]]:
    """(the match of ``name`` on the run name, the run's metrics) for every finished run (``<name>/<time>/metrics.json``)
    under ``paths`` whose name matches; a run without ``metric`` is an error."""
    for top in paths:
        m = name.fullmatch(Path(top).name)
        if not m:
            continue
        for run in sorted(Path(top).glob("*/metrics.json")):
            metrics = json.loads(run.read_text())
            if metric not in metrics:
                raise SystemExit(f"error: {run} has no {metric} (metrics: {', '.join(sorted(metrics))})")
            yield m, metrics


def collect(paths: list[str], metric: str) -> dict[tuple[str, str, str], dict[int, tuple[float, float]]]:
    """{(tag, budget, plan): {seed: (metric in %, plan average bits)}} from the finished runs under ``paths``."""
    out: dict[tuple[str, str, str], dict[int, tuple[float, float]]] = defaultdict(dict)
    for m, metrics in finished_runs(paths, NAME, metric):
        out[(m["tag"], m["budget"], m["plan"])][int(m["seed"])] = (100 * metrics[metric], metrics["avg_bits"])
    return out


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and the two ends of its 95 % Student-t interval (nan ends with one value)."""
    from scipy.stats import t

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="fixedplan_* folders under outputs/runs/")
    ap.add_argument("--metric", default="test/acc", help="test/acc (default) or val/acc")
    args = ap.parse_args()
    rows = collect(args.paths, args.metric)
    if not rows:
        raise SystemExit("error: no finished fixedplan_b<budget>_<plan>_s<seed>_<tag> runs under the given paths")
    print(f"| setting | budget | plan | runs | plan avg bits | {args.metric} mean (%) | sd |")
    print("|---|---|---|---|---|---|---|")
    for (tag, budget, plan), by_seed in sorted(rows.items()):
        accs = [a for a, _ in by_seed.values()]
        bits = sorted({round(b, 3) for _, b in by_seed.values()})
        bits_text = f"{bits[0]:.3f}" if len(bits) == 1 else f"{bits[0]:.3f}-{bits[-1]:.3f}"
        sd = statistics.stdev(accs) if len(accs) > 1 else math.nan
        print(f"| {tag} | {budget} | {plan} | {len(accs)} | {bits_text} | {statistics.fmean(accs):.2f} | {sd:.2f} |")
    print()
    print("| setting | budget | plan - control | seeds | mean diff (points) | 95 % interval | plan ahead |")
    print("|---|---|---|---|---|---|---|")
    measured = sorted({plan for (_, _, plan) in rows if plan not in CONTROLS})
    for (tag, budget, plan), by_seed in sorted(rows.items()):
        if plan in CONTROLS:
            continue
        # every control, then the measured plans after this one in name order (each pair once)
        for control in [*CONTROLS, *(m for m in measured if m > plan)]:
            other = rows.get((tag, budget, control))
            if not other:
                continue
            seeds = sorted(set(by_seed) & set(other))
            if not seeds:
                continue
            diffs = [by_seed[s][0] - other[s][0] for s in seeds]
            mean, lo, hi = t_interval(diffs)
            ahead = sum(d > 0 for d in diffs)
            print(f"| {tag} | {budget} | {plan} - {control} | {len(seeds)} | {mean:+.2f} | [{lo:+.2f}, {hi:+.2f}] "
                  f"| {ahead}/{len(seeds)} |")


if __name__ == "__main__":
    main()
