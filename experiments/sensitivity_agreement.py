"""How far other sensitivities agree with the oracle's: Spearman rank correlations over layers.

    python experiments/sensitivity_agreement.py outputs/fixed_plan/plans/oracle.json \\
        hawq=outputs/fixed_plan/plans/hawq.json search=<search run folder or .ckpt>

A ``.json`` file is ``{layer: {bits: loss_increase}}`` (``sdq-plan --sensitivities``); a run folder or checkpoint is
read as the search's own measurements, restricted to the levels it measured (a level a layer never reached has no
measurement to compare). Per other method: the correlation of the one-level drops S(lo) - S(hi) over every layer and
level both have, then per level (over layers: the comparisons a plan at that level makes), then of the values
themselves (json files only), and how many layer-levels were compared.

``--candidates 1,2,...,8``: the searches' candidate bitwidths where the reference file has fewer levels (e.g. the
in-context oracle of ``experiments/oracle_context.py``, 1..4 bits); compared are the reference's levels.

``--between``: also how far the other methods agree with each other (e.g. searches of different seeds: how
repeatable a search's measurement is), per level the Spearman of every pair over the layer-levels both measured, and
the mean over pairs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sdq_lightning.planning import Sensitivity, spearman


def _load(path: str, name: str, layers: list[str], bits: list[int]) -> Sensitivity:
    if path.endswith(".json"):
        return Sensitivity.from_json(path, name)
    from sdq_lightning.planning import from_search

    ckpt = Path(path)
    if ckpt.is_dir():
        ckpt = ckpt / "checkpoints" / "last.ckpt"
    return from_search(ckpt, layers, bits)


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("oracle", help="the reference sensitivity file (.json)")
    ap.add_argument("others", nargs="+", metavar="NAME=OTHER.json|RUN")
    ap.add_argument("--candidates", default=None, help="the searches' candidate bits, e.g. 1,2,3,4,5,6,7,8")
    ap.add_argument("--between", action="store_true", help="also compare every pair of the others")
    args = ap.parse_args(argv)
    bad = [o for o in args.others if "=" not in o]
    if bad:
        ap.error(f"{bad[0]!r} is not NAME=OTHER.json|RUN")
    ref = Sensitivity.from_json(args.oracle, "oracle")
    layers = list(ref.values)
    bits = ([int(b) for b in args.candidates.split(",")] if args.candidates
            else sorted({b for t in ref.values.values() for b in t}))
    levels = ref.one_level_drops()
    print("| method vs oracle | one-level drops, all levels | " + " | ".join(f"{h}->{lo}" for h, lo in levels)
          + " | values | compared |")
    print("|---|---:|" + "---:|" * len(levels) + "---:|---:|")
    others = {}
    for arg in args.others:
        name, path = arg.split("=", 1)
        other = others[name] = _load(path, name, layers, bits)
        agree = ref.agreement(other, levels)
        flat_ref = {(n, b): v for n, t in ref.values.items() for b, v in t.items() if b != bits[-1]}
        flat_other = {(n, b): v for n, t in other.values.items() for b, v in t.items() if b != bits[-1]}
        values = f"{spearman(flat_ref, flat_other):.3f}" if "measured" not in other.meta else "-"
        compared = len(other.increments(levels))
        print(f"| {name} | {agree.pop('all'):.3f} | " + " | ".join(f"{r:.3f}" for r in agree.values())
              + f" | {values} | {compared} |")
    if args.between and len(others) > 1:
        _between(others, levels)


def _between(others: dict[str, Sensitivity], levels: list[tuple[int, int]]) -> None:
    """Spearman of every pair of ``others`` per level, over the layer-levels both have."""
    names = list(others)
    print("\n| pair | " + " | ".join(f"{h}->{lo}" for h, lo in levels) + " |")
    print("|---|" + "---:|" * len(levels))
    per_level: dict[tuple[int, int], list[float]] = {lv: [] for lv in levels}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            cells = []
            for lv in levels:
                try:
                    r = spearman(others[a].increments([lv]), others[b].increments([lv]))
                    per_level[lv].append(r)
                    cells.append(f"{r:.3f}")
                except ValueError:  # fewer than 3 layers both measured at this level
                    cells.append("-")
            print(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    print("| mean over pairs | " + " | ".join(
        f"{sum(v) / len(v):.3f} ({len(v)})" if v else "-" for v in per_level.values()) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
