"""experiments/fixed_plan_table.py pairs runs by seed with a t-interval; fixed_plan_protocol.sh refuses bad methods."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from scipy.stats import t

from app_helpers import run_script

REPO = Path(__file__).resolve().parents[2]


def _runs(root: Path, plan: str, accs: dict[int, float], bits: float = 1.99) -> None:
    for seed, acc in accs.items():
        run = root / f"fixedplan_b2.0_{plan}_s{seed}_e1_sub10000" / "2026-12-05_00-00-00_0"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"test/acc": acc, "val/acc": acc - 0.01, "avg_bits": bits}))


def test_the_table_pairs_plans_by_seed_with_a_t_interval(tmp_path) -> None:
    _runs(tmp_path, "oracle", {0: 0.84, 1: 0.83, 2: 0.85})
    _runs(tmp_path, "random", {0: 0.82, 1: 0.825, 2: 0.81, 3: 0.90})  # seed 3 has no oracle run: not paired
    out = subprocess.run([sys.executable, str(REPO / "experiments" / "fixed_plan_table.py"),
                          *map(str, sorted(tmp_path.iterdir()))], capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if "oracle - random" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    diffs = [2.0, 0.5, 4.0]
    half = t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    mean = statistics.fmean(diffs)
    assert cells[3] == "3" and cells[4] == f"{mean:+.2f}"
    assert cells[5] == f"[{mean - half:+.2f}, {mean + half:+.2f}]" and cells[6] == "3/3"
    means = {c[2]: c[5] for c in ([x.strip() for x in line.strip("|").split("|")] for line in out.splitlines()[2:4])
             if len(c) > 5}
    assert means == {"oracle": "84.00", "random": "83.88"}


def test_the_integer_only_table_pairs_the_two_modes_by_seed(tmp_path) -> None:
    """experiments/integer_only_table.py: integer-only - fake-quant per seed, a t-interval over the seeds that have
    both runs, and whether it lies inside the margin."""
    accs = {"fakequant": {1: 0.876, 2: 0.877, 3: 0.870}, "integer_only": {1: 0.877, 2: 0.875, 4: 0.99}}
    for mode, by_seed in accs.items():
        for seed, acc in by_seed.items():
            run = tmp_path / f"io24_w4a8_{mode}_full_e4_s{seed}" / "2026-12-07_00-00-00_0"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({"test/acc": acc}))
    script = str(REPO / "experiments" / "integer_only_table.py")
    out = subprocess.run([sys.executable, script, *map(str, sorted(tmp_path.iterdir()))], capture_output=True,
                         text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| full_e4 | w4a8 | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    diffs = [0.1, -0.2]  # seeds 1 and 2: seed 3 has no integer-only run, seed 4 no fake-quant run
    half = t.ppf(0.975, 1) * statistics.stdev(diffs) / math.sqrt(2)
    mean = statistics.fmean(diffs)
    assert cells[3:5] == ["87.65", "87.60"] and cells[5] == f"{mean:+.2f}"
    assert cells[6] == f"[{mean - half:+.2f}, {mean + half:+.2f}]" and cells[7] == "1/2" and cells[8] == "no"
    wide = subprocess.run([sys.executable, script, "--margin", "2", *map(str, sorted(tmp_path.iterdir()))],
                          capture_output=True, text=True, check=True).stdout
    assert "| full_e4 | w4a8 | 2 |" in wide and wide.split("| full_e4 | w4a8 | 2 |")[1].splitlines()[0].endswith(
        "| yes |")
    bad = subprocess.run([sys.executable, script, "--margin", "0", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1] == (
        "error: --margin must be a positive number of points, got 0.0")


def test_the_protocol_refuses_an_unknown_method_in_one_line(tmp_path) -> None:
    fp = tmp_path / "fp.pt"
    fp.write_bytes(b"")
    env = dict(os.environ, CIFAR10_ROOT=str(tmp_path), FP_CKPT=str(fp), METHODS="oracle hawq_v9", PY="false")
    res = subprocess.run(["bash", str(REPO / "experiments" / "fixed_plan_protocol.sh")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: unknown method 'hawq_v9' (allowed: oracle hawq random size_greedy uniform; other plans: "
        "EXTRA=budget:name=file)"]


def test_sensitivity_agreement_between_compares_every_pair_per_level(tmp_path, monkeypatch, capsys) -> None:
    from scipy.stats import spearmanr

    layers = [f"l{i}" for i in range(5)]
    drops = {"a": [5, 4, 3, 2, 1], "b": [5, 4, 3, 1, 2], "c": [1, 2, 3, 4, 5]}  # the 2->1 drop of each layer
    files = {}
    for name, d in {"oracle": [5, 4, 3, 2, 1], **drops}.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({n: {"1": float(x), "2": 0.0} for n, x in zip(layers, d)}))
    run_script(REPO / "experiments" / "sensitivity_agreement.py",
               [str(files["oracle"]), *(f"{n}={files[n]}" for n in drops), "--between"], monkeypatch)
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines()
            if line.startswith(("| a vs ", "| b vs "))}
    expect = {f"{x} vs {y}": spearmanr(drops[x], drops[y]).statistic for x, y in (("a", "b"), ("a", "c"), ("b", "c"))}
    assert rows == {k: f"{v:.3f}" for k, v in expect.items()}
    mean = next(line for line in out.splitlines() if line.startswith("| mean over pairs"))
    assert f"{sum(expect.values()) / 3:.3f} (3)" in mean
