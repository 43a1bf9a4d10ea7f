"""Bad command lines: one 'error: ...' line on stderr, exit status 2, no traceback, no run folder written."""

from __future__ import annotations

import pytest

from app_helpers import run_cli

CASES = {
    "unknown_model": (["experiment=digits_demo", "model.backbone=no_such_net"], "unknown model 'no_such_net'"),
    "missing_dataset_root": (["dataset=imagefolder", "dataset.root=/no/such/dir"], "/no/such/dir"),
    "impossible_budget": (["experiment=digits_demo", "hardware.target=1.01"], "impossible budget"),
    "bad_activation_bits": (["experiment=digits_demo", "hardware.activation_bits=1"], "activation_bits"),
    "unknown_experiment": (["experiment=no_such_experiment"], "Could not find 'experiment/no_such_experiment'"),
}


def _assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_command_line(case, tmp_path):
    earlier = tmp_path / "outputs" / "runs" / "digits_demo" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text("{}")
    before = sorted((tmp_path / "outputs").rglob("*"))
    args, needle = CASES[case]
    proc = run_cli(args, tmp_path, timeout=120)
    _assert_one_line_error(proc, needle)
    assert sorted((tmp_path / "outputs").rglob("*")) == before  # no new run folder
    assert (earlier / "metrics.json").read_text() == "{}"


def test_missing_cifar10_offline(tmp_path):
    proc = run_cli(["dataset=cifar10", f"dataset.root={tmp_path}/nothing", "dataset.download=false"], tmp_path)
    _assert_one_line_error(proc, "dataset=imagefolder dataset.root=")
