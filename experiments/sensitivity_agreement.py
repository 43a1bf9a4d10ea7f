"""How far other sensitivities agree with the oracle's: Spearman rank correlations over layers.

    python experiments/sensitivity_agreement.py outputs/fixed_plan/plans/oracle.json \\
        hawq=outputs/fixed_plan/plans/hawq.json search=search_sens.json

Each file is ``{layer: {bits: loss_increase}}`` (``sdq-plan --sensitivities``). Per other method: the correlation of
the one-level drops S(b-1) - S(b) over every layer and level both have, then per level (over layers: the comparisons
a plan at that level makes), then of the values themselves.
"""

from __future__ import annotations

import sys

from sdq_lightning.planning import Sensitivity, spearman


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        raise SystemExit("usage: sensitivity_agreement.py ORACLE.json NAME=OTHER.json [NAME=OTHER.json ...]")
    ref = Sensitivity.from_json(argv[0], "oracle")
    bits = sorted({b for t in ref.values.values() for b in t})
    levels = [(hi, hi - 1) for hi in bits if hi - 1 in bits]
    print("| method vs oracle | one-level drops, all levels | " + " | ".join(f"{h}->{lo}" for h, lo in levels)
          + " | values |")
    print("|---|---:|" + "---:|" * len(levels) + "---:|")
    for arg in argv[1:]:
        name, path = arg.split("=", 1)
        other = Sensitivity.from_json(path, name)
        per_level = [spearman(ref.increments([lv]), other.increments([lv])) for lv in levels]
        flat_ref = {(n, b): v for n, t in ref.values.items() for b, v in t.items() if b != bits[-1]}
        flat_other = {(n, b): v for n, t in other.values.items() for b, v in t.items() if b != bits[-1]}
        print(f"| {name} | {spearman(ref.increments(levels), other.increments(levels)):.3f} | "
              + " | ".join(f"{r:.3f}" for r in per_level) + f" | {spearman(flat_ref, flat_other):.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
