"""benchmarks/bench_step.py runs end to end (tiny repeats) and writes its table: the benchmark cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app_helpers import run_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_step_runs_and_writes_its_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--repeats", "1", "--steps", "1",
                          "--warmup", "1", "--kernels", "eager", "--batch", "8", "--threads", "1", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "bench_step.md").read_text()
    for mode in ("| fp |", "| search |", "| frozen |"):
        assert mode in table
    data = json.loads((tmp_path / "bench_step.json").read_text())
    assert all(len(v) == 1 and v[0] > 0 for v in data["eager"].values())


def test_bench_step_refuses_cuda_without_a_gpu(tmp_path, monkeypatch, capsys):
    """In-process (the script with its command line): exit status 2 and the reason, nothing written."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as info:
        run_script(ROOT / "benchmarks" / "bench_step.py", ["--device", "cuda", "--out", str(tmp_path / "out")],
                   monkeypatch)
    assert info.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_count_ops_prints_every_part_and_the_quantized_steps_issue_more(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "count_ops.py"), "--batch", "2"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.split("|") for line in out.stdout.splitlines() if line.startswith(("| fp", "| search", "| frozen"))]
    rows = {c[1].strip(): [int(v) for v in c[2:8]] for c in lines}
    ebr = {c[1].strip(): c[9].strip() for c in lines}
    assert set(rows) == {"fp", "search", "search+pl", "frozen", "frozen+pl"}
    for mode in ("search", "search+pl"):
        fwd, bwd, sgd, dbp, stp, total = rows[mode]
        assert dbp > 0 and stp > 0 and total == fwd + bwd + sgd + dbp + stp
    assert rows["fp"][3] == rows["fp"][4] == 0 and rows["frozen"][3] == 0
    assert rows["search"][5] > rows["frozen"][5] > rows["fp"][5]
    # the batched weight pass issues fewer operations than the per-layer quantizers, in both passes, and so does
    # the batched EBR
    for mode in ("search", "frozen"):
        assert rows[mode][0] < rows[mode + "+pl"][0] and rows[mode][1] < rows[mode + "+pl"][1]
    assert int(ebr["frozen"]) < int(ebr["frozen+pl"]) and ebr["fp"] == "-"


@pytest.mark.slow
def test_count_app_ops_attributes_the_steps_to_hooks():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "count_app_ops.py"), "--batch", "2", "--skip", "1",
                          "--steps", "1"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {c[1].strip(): [int(v) for v in c[2:5]] for c in
            (line.split("|") for line in out.stdout.splitlines() if line.startswith(("| fp", "| sdq")))}
    assert set(rows) == {"fp", "sdq search", "sdq frozen", "sdq search (per layer)", "sdq frozen (per layer)"}
    for net, rest, total in rows.values():
        assert net > 0 and rest > 0 and total == net + rest
    # the batched weight pass: fewer operations in the network's hooks, the same around them
    assert rows["sdq search"][0] < rows["sdq search (per layer)"][0]
    assert rows["sdq search"][1] == rows["sdq search (per layer)"][1]
    assert "SDQ.on_before_optimizer_step" in out.stdout  # the DBP step, attributed to its hook
