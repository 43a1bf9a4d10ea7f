"""Issue 13's table: SDQ against the controls that could refute the search, from the run folders that
experiments/cifar10_compare.sh writes (rows sdq_nokd, budget_only, projection_only, size_greedy, random, uniform2). Run folders
written before 2026-12-05 named the size heuristic ``random``: their ``random`` rows are size_greedy plans.

    python experiments/controls_table.py outputs/runs/c10cmp_*_ctl*

Per run: top-1, plan average bits, the freeze record (expected average bits before the projection, the average bits
of the search's own rounding, layers the projection changed and by how many levels at most); per row: mean and
spread (max - min) over seeds; how many layers the SDQ plan and the budget_only plan of the same seed and data
differ in; and sdq_nokd against each control paired by seed (mean difference, range, how often SDQ is ahead).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

ROWS = ("sdq_nokd", "budget_only", "projection_only", "size_greedy", "random", "uniform2")


def _runs(paths: list[str]):
    for top in paths:
        m = re.match(r"c10cmp_(.+?)_a(\w+?)_s(\d+)_(.*)", Path(top).name)
        if not m:
            continue
        row, seed, tag = m.group(1), int(m.group(3)), m.group(4)
        for run in sorted(p for p in Path(top).glob("*") if (p / "metrics.json").exists()):
            metrics = json.loads((run / "metrics.json").read_text())
            history = json.loads((run / "history.json").read_text()) if (run / "history.json").exists() else []
            frozen = next((h for h in history if h.get("frozen")), {})
            layers = {}
            if (run / "plan.yaml").exists():
                import yaml

                layers = yaml.safe_load((run / "plan.yaml").read_text()).get("layers", {})
            plan = dict(metrics.get("plan_bits") or {}) or {n: lb.get("w_bits") for n, lb in layers.items()}
            yield {"row": row, "seed": seed, "data": "full" if "sub" not in tag else tag.split("_")[-1],
                   "acc": 100 * (metrics.get("test/acc") or 0.0), "avg_bits": metrics["avg_bits"],
                   "expected": frozen.get("expected_avg_bits"), "changed": frozen.get("projection_changed_layers"),
                   "levels": frozen.get("projection_max_levels"), "plan": plan, "run": str(run),
                   "rounded": _rounded_avg_bits(layers, frozen.get("decided_bits"))}


def _rounded_avg_bits(layers: dict, decided: dict | None) -> float | None:
    """Average bits of the search's own rounding at the freeze (before the projection), weighted by parameters
    (``layers``: the plan file's layer table)."""
    if not decided or not layers:
        return None
    total = sum(lb["params"] for lb in layers.values())
    bits = {n: decided.get(n) if decided.get(n) is not None else lb["w_bits"] for n, lb in layers.items()}
    return sum(layers[n]["params"] * bits[n] for n in layers) / total if total else None


def main(paths: list[str]) -> None:
    runs = list(_runs(paths))
    print("| row | data | seed | top-1 (%) | plan avg bits | E[avg bits] at freeze | rounded avg bits "
          "| projection: layers (max levels) | layers differing from budget_only |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for r in sorted(runs, key=lambda r: (r["data"], ROWS.index(r["row"]) if r["row"] in ROWS else 9, r["seed"])):
        ctrl = next((c for c in runs if c["row"] == "budget_only" and c["seed"] == r["seed"]
                     and c["data"] == r["data"]), None)
        diff = "-" if ctrl is None or r["row"] == "budget_only" or r["row"] == "uniform2" else \
            str(sum(1 for n in r["plan"] if r["plan"][n] != ctrl["plan"].get(n)))
        exp = "-" if r["expected"] is None else f"{r['expected']:.3f}"
        proj = "-" if r["changed"] is None else f"{r['changed']} ({r['levels']})"
        rnd = "-" if r["rounded"] is None or r["expected"] is None else f"{r['rounded']:.3f}"
        print(f"| {r['row']} | {r['data']} | {r['seed']} | {r['acc']:.2f} | {r['avg_bits']:.3f} | {exp} | {rnd} | "
              f"{proj} | {diff} |")
    print()
    print("| row | data | seeds | mean top-1 (%) | spread (max - min) |")
    print("|---|---|---:|---:|---:|")
    groups: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        groups.setdefault((r["row"], r["data"]), []).append(r["acc"])
    for (row, data), accs in sorted(groups.items(), key=lambda kv: (kv[0][1], ROWS.index(kv[0][0])
                                                                     if kv[0][0] in ROWS else 9)):
        print(f"| {row} | {data} | {len(accs)} | {statistics.mean(accs):.2f} | {max(accs) - min(accs):.2f} |")
    # paired by seed and data: the search against each control
    by = {(r["row"], r["data"], r["seed"]): r["acc"] for r in runs}
    pairs = []
    for (row, data, seed), acc in sorted(by.items()):
        if row != "sdq_nokd" and ("sdq_nokd", data, seed) in by:
            pairs.append((row, data, by[("sdq_nokd", data, seed)] - acc))
    if pairs:
        print()
        print("| sdq_nokd minus | data | paired seeds | mean difference (points) | min | max | sdq_nokd ahead |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for row, data in sorted({(p[0], p[1]) for p in pairs}, key=lambda k: (k[1], ROWS.index(k[0])
                                                                               if k[0] in ROWS else 9)):
            d = [p[2] for p in pairs if (p[0], p[1]) == (row, data)]
            print(f"| {row} | {data} | {len(d)} | {statistics.mean(d):+.2f} | {min(d):+.2f} | {max(d):+.2f} | "
                  f"{sum(x > 0 for x in d)}/{len(d)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
