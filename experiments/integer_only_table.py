"""Issue 24's accuracy table: phase 2 in the integer-only mode against the fake-quant model, paired by seed.

    python experiments/integer_only_table.py outputs/runs/io24_*_full_e4_s* [--metric test/acc] [--margin 0.5]

Run folders are named ``io24_<plan>_<mode>_<tag>`` (experiments/integer_only_accuracy.sh), ``mode`` being
``fakequant`` or ``integer_only`` and ``tag`` ending in ``_s<seed>``. Per plan and setting (the tag without its
seed): the seeds that have both runs, each model's mean, the mean paired difference integer-only - fake-quant with its
95 % t-interval, how many seeds the integer-only model is ahead or equal, and whether the interval lies inside
+-``margin`` points (the issue's "within 0.5 points": 0.5 at W8A8 and W4A8, 1 on a mixed plan).
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict

from fixed_plan_table import finished_runs, t_interval

NAME = re.compile(r"io24_(?P<plan>[^_]+)_(?P<mode>fakequant|integer_only)_(?P<setting>.+)_s(?P<seed>\d+)")
MODES = ("fakequant", "integer_only")


def collect(paths: list[str], metric: str) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """{(setting, plan): {seed: {mode: metric in %}}} from the finished runs under ``paths``."""
    out: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for m, metrics in finished_runs(paths, NAME, metric):
        out[(m["setting"], m["plan"])][int(m["seed"])][m["mode"]] = 100 * metrics[metric]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="io24_* folders under outputs/runs/")
    ap.add_argument("--metric", default="test/acc", help="test/acc (default) or val/acc")
    ap.add_argument("--margin", type=float, default=0.5, help="the target: |difference| within this many points")
    args = ap.parse_args()
    if args.margin <= 0:
        raise SystemExit(f"error: --margin must be a positive number of points, got {args.margin}")
    rows = collect(args.paths, args.metric)
    if not rows:
        raise SystemExit("error: no finished io24_<plan>_<fakequant|integer_only>_<tag>_s<seed> runs under the "
                         "given paths")
    print(f"| setting | plan | seeds | fake-quant mean (%) | integer-only mean (%) | integer-only - fake-quant | "
          f"95 % interval | ahead or equal | interval within +-{args.margin:g} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (setting, plan), by_seed in sorted(rows.items()):
        seeds = sorted(s for s, modes in by_seed.items() if all(m in modes for m in MODES))
        if not seeds:
            continue
        fq = [by_seed[s]["fakequant"] for s in seeds]
        io = [by_seed[s]["integer_only"] for s in seeds]
        diffs = [b - a for a, b in zip(fq, io)]
        mean, lo, hi = t_interval(diffs)
        inside = "yes" if -args.margin <= lo and hi <= args.margin else "no"
        print(f"| {setting} | {plan} | {len(seeds)} | {statistics.fmean(fq):.2f} | {statistics.fmean(io):.2f} | "
              f"{mean:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {sum(d >= 0 for d in diffs)}/{len(seeds)} | {inside} |")
    print()
    print("| setting | plan | seed | fake-quant (%) | integer-only (%) | difference |")
    print("|---|---|---|---|---|---|")
    for (setting, plan), by_seed in sorted(rows.items()):
        for seed, modes in sorted(by_seed.items()):
            if all(m in modes for m in MODES):
                a, b = modes["fakequant"], modes["integer_only"]
                print(f"| {setting} | {plan} | {seed} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")


if __name__ == "__main__":
    main()
