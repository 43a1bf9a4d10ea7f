"""``sdq-plan``: bad arguments are one line with exit status 2 and write nothing; the oracle and HAWQ measure a model
on held-out digits and plan under the budget; a search run's checkpoint gives its own sensitivities, and the plans
train with ``phase=train phase.plan=...``."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import sdq_lightning  # noqa: F401 - registers digits_cnn in timm
from app_helpers import TINY, compose_cfg
from sdq_lightning.budget import BitPlan
from sdq_lightning.cli.plan import main
from sdq_lightning.cli.train import run

DIGITS = ["--model", "digits_cnn", "--dataset", "digits", "--data", "digits", "--image-size", "8",
          "--val-size", "200", "--batches", "2", "--batch-size", "64"]


def _fail(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sdq-plan: error:")
    return err


def _bits(plan: BitPlan) -> dict[str, int | None]:
    return {n.removeprefix("model."): plan[n] for n in plan}


@pytest.fixture
def fp_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "fp.pt"
    torch.save(timm.create_model("digits_cnn", num_classes=10, in_chans=1).state_dict(), path)
    return path


def test_bad_arguments_are_one_line_and_overwrite_nothing(tmp_path, capsys, fp_checkpoint) -> None:
    out = tmp_path / "plan.yaml"
    base = ["--budget", "avg_bits=2.0", "--out", str(out)]
    assert "pass --checkpoint" in _fail(["--method", "oracle", *base, *DIGITS], capsys)
    assert "metric=target" in _fail(["--method", "random", "--budget", "2.0", "--out", str(out)], capsys)
    assert "--checkpoint file not found" in _fail(["--method", "hawq", *base, "--checkpoint", "nope.pt", *DIGITS],
                                                 capsys)
    assert "--run" in _fail(["--method", "search", *base, *DIGITS], capsys)
    assert "unknown --model" in _fail(["--method", "uniform", *base, "--model", "no_such_net"], capsys)
    assert ".yaml, .yml or .json" in _fail(["--method", "uniform", "--budget", "avg_bits=2",
                                            "--out", str(tmp_path / "p.txt")], capsys)
    assert "--weight-bits" in _fail(["--method", "uniform", *base, "--weight-bits", "1,x"], capsys)
    assert not out.exists()
    out.write_text("earlier result\n")
    assert "exists" in _fail(["--method", "uniform", *base, *DIGITS], capsys)
    assert out.read_text() == "earlier result\n"
    assert "metric" in _fail(["--method", "uniform", "--budget", "latency=2", "--out", str(tmp_path / "q.yaml"),
                              *DIGITS], capsys)


@pytest.mark.parametrize("method", ["oracle", "hawq"])
def test_measured_plans_meet_the_budget_and_replan_from_their_file(tmp_path, capsys, fp_checkpoint, method) -> None:
    out, sens_path = tmp_path / "plan.yaml", tmp_path / "sens.json"
    main(["--method", method, "--budget", "avg_bits=2.0", "--out", str(out), "--sensitivities", str(sens_path),
          "--checkpoint", str(fp_checkpoint), "--probes", "8", *DIGITS])
    printed = capsys.readouterr().out
    assert "held-out images" in printed and str(out) in printed
    plan = BitPlan.load(out)
    assert plan.cost("avg_bits") <= 2.0
    assert plan.metadata["method"] == method
    sens = json.loads(sens_path.read_text())
    assert set(sens) == {"conv2", "conv3"} and all(len(t) == 8 for t in sens.values())
    again = tmp_path / "again.yaml"
    main(["--method", "file", "--from-sensitivities", str(sens_path), "--budget", "avg_bits=2.0", "--out", str(again),
          *DIGITS])
    assert _bits(BitPlan.load(again)) == _bits(plan)


def test_the_oracle_prints_its_split_half_agreement_per_level(tmp_path, capsys, fp_checkpoint) -> None:
    """Every layer searched (4 layers): the overall split-half correlation, then one per level, each in [-1, 1]."""
    main(["--method", "oracle", "--budget", "avg_bits=3.0", "--out", str(tmp_path / "plan.yaml"), "--first-last",
          "search", "--weight-bits", "1,2,3,4", "--checkpoint", str(fp_checkpoint), *DIGITS])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("split-half Spearman"))
    per_level = dict(part.split(": ") for part in line.split("; ")[1].split(", "))
    assert list(per_level) == ["2->1", "3->2", "4->3"]
    assert all(-1.0 <= float(v) <= 1.0 for v in per_level.values())


@pytest.mark.slow
def test_a_search_runs_sensitivities_plan_and_the_plan_trains(tmp_path, capsys) -> None:
    base = ["experiment=digits_demo", "compare.enabled=false", "fp_teacher.enabled=false", *TINY]
    searched = run(compose_cfg(base), tmp_path / "searched")
    out, sens_path = tmp_path / "plan.yaml", tmp_path / "sens.json"
    main(["--method", "search", "--run", str(tmp_path / "searched"), "--budget", "avg_bits=1.5", "--out", str(out),
          "--sensitivities", str(sens_path), *DIGITS])
    sens = json.loads(sens_path.read_text())
    assert set(sens) == {"conv2", "conv3"}
    for table in sens.values():  # integrated gains: non-increasing in the bits, 0 at the top candidate
        values = [table[str(b)] for b in range(1, 9)]
        assert values[-1] == 0.0 and all(a >= b for a, b in zip(values, values[1:]))
    assert BitPlan.load(out).cost("avg_bits") <= 1.5
    trained = run(compose_cfg([*base, "phase=train", f"phase.plan={out}"]), tmp_path / "trained")
    assert trained is not None and searched is not None
    assert _bits(BitPlan.load(next((tmp_path / "trained").rglob("plan.yaml")))) == _bits(BitPlan.load(out))


def test_held_out_batches_mix_the_classes(tmp_path) -> None:
    """An ImageFolder held-out split is sorted by class: measuring on its first batches would measure one class per
    batch (and a few classes in all). The batches sdq-plan measures on are a seeded random order of it."""
    from helpers.data import digits_tree

    from sdq_lightning.cli.plan import _batches, _parser

    root = digits_tree(tmp_path / "tree", splits=("train", "test"), per_class=12, size=8)
    args = _parser().parse_args(["--model", "digits_cnn", "--dataset", "imagefolder", "--data", str(root),
                                 "--image-size", "8", "--val-size", "60", "--batches", "2", "--batch-size", "16",
                                 "--method", "uniform", "--budget", "avg_bits=2", "--out", str(tmp_path / "p.yaml")])
    first, second = _batches(args)
    assert len(set(first[1].tolist())) >= 5 and len(set(second[1].tolist())) >= 5
    again = _batches(args)
    assert torch.equal(again[0][1], first[1])  # seeded: the same images every time
