"""Collect metrics.json of finished runs into one markdown table (a run without metrics.json is listed as unfinished).

    python experiments/summarize.py outputs/runs/c10cmp_*            # every run folder below these
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    print("| run | epochs | top-1 (%) | avg W bits | size (bytes) | BitOPs (G) | budget | wall time (min) | folder |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---|")
    for top in paths:
        for run in sorted(p for p in Path(top).glob("*") if p.is_dir()) or [Path(top)]:
            if not (run / "config.yaml").exists():
                continue
            mfile = run / "metrics.json"
            if not mfile.exists():
                print(f"| {Path(top).name} | | did not finish | | | | | | {run} |")
                continue
            m = json.loads(mfile.read_text())
            acc = m.get("test/acc") or m.get("val/acc")
            budget = (f"{m['budget_metric']} <= {m['budget_target']:g}: {'met' if m['budget_met'] else 'NOT met'}"
                      if m.get("budget_metric") else "-")
            print(f"| {m['name']} | {m.get('epochs', '')} | {100 * acc:.2f} | {m['avg_bits']:.3f} | {m['size_bytes']:,.0f} | "
                  f"{m['bitops'] / 1e9:.3f} | {budget} | {m['wall_time_s'] / 60:.1f} | {run} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["outputs/runs"])
