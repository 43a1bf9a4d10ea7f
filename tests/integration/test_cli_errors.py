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
    # found inside the run (after Hydra made the run folder): the folder is removed again
    "late_error_in_run": (["experiment=digits_demo", "dataset.batch_size=0"], "dataset.batch_size must be positive"),
}


def _assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


# each case is an app process (about 10 s on a 2-core CPU): the ones that run data and training go to the slow tier
# (in-process checks of the same errors: missing_dataset_root in tests/data/test_datamodules.py, unknown_model in
# tests/unit/test_extending_backbone.py; unknown_experiment stays here as the fast tier's command-line check)
SLOW_CASES = {"impossible_budget", "bad_activation_bits", "late_error_in_run", "missing_dataset_root", "unknown_model"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in sorted(CASES)])
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


# Checked before Hydra starts (in-process here: main() exits before Hydra runs anything).
PRECHECK_CASES = {
    # issue 10.7: found before the FP teacher trains (it used to train first, then fail and leave a run folder)
    "search_longer_than_run": (["experiment=digits_demo", "trainer.max_epochs=3", "phase.search_epochs=4"],
                               "phase.search_epochs=4 must be smaller than trainer.max_epochs=3"),
    "bad_sdq_argument": (["experiment=digits_demo", "sdq.search.dbp_lr=-1"], "dbp_lr must be a number > 0"),
    # the sdq node is typed (sdq_lightning.options): a wrong type or key fails when composed, with Hydra's reason
    "sdq_option_of_the_wrong_type": (["experiment=digits_demo", "sdq.search.settle=notabool"],
                                     "Error merging override sdq.search.settle=notabool: Value 'notabool' is not a "
                                     "valid bool (type str)"),
    "unknown_sdq_option": (["experiment=digits_demo", "sdq.search.nope=1"],
                           "Could not override 'sdq.search.nope': Key 'nope' not in 'SearchOptions'"),
    "train_without_plan": (["experiment=digits_demo", "phase=train"], "phase.plan"),
    "missing_init_checkpoint": (["experiment=digits_demo", "model.init_checkpoint=/no/such.pt"],
                                "model.init_checkpoint file not found: /no/such.pt"),
    "unknown_dataset_name": (["dataset=custom", "dataset.name=nope"], "unknown dataset.name='nope'; registered: "),
    # Hydra's own advice for a new key ('+key=...') made a Trainer TypeError inside the run
    "misspelled_trainer_argument": (["experiment=digits_demo", "+trainer.max_epoch=2"],
                                    "trainer.max_epoch is not a lightning.Trainer argument; did you mean "
                                    "trainer.max_epochs?"),
    "unbounded_epochs": (["experiment=digits_demo", "trainer.max_epochs=-1"],
                         "trainer.max_epochs=-1 must be a whole number of epochs >= 1"),
    "fp_teacher_without_epochs": (["experiment=digits_demo", "fp_teacher.epochs=0"],
                                  "fp_teacher.epochs=0 must be a whole number of epochs >= 1"),
    "weight_bits_not_a_list": (["experiment=digits_demo", "hardware.weight_bits=4"],
                               "hardware.weight_bits=4 must be a list of candidate bitwidths in 1..8: "
                               "hardware.weight_bits=[4] for uniform quantization"),
    "timm_teacher_without_weights": (["experiment=digits_demo", "sdq.teacher=resnet20"],
                                     "teacher 'resnet20' needs timm's pretrained weights, but timm has no "
                                     "pretrained weights for it"),
}


@pytest.mark.parametrize("case", sorted(PRECHECK_CASES))
def test_bad_command_line_in_process(case, tmp_path, monkeypatch, capsys):
    from sdq_lightning.cli.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDQ_OUTPUT_DIR", str(tmp_path / "outputs"))
    args, needle = PRECHECK_CASES[case]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def _main_fails_with(args: list[str], tmp_path, monkeypatch, capsys) -> str:
    from sdq_lightning.cli.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDQ_OUTPUT_DIR", str(tmp_path / "outputs"))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not (tmp_path / "outputs").exists()
    return lines[0]


@pytest.mark.parametrize("content", ["pickle", "text"])
def test_unreadable_init_checkpoint_never_suggests_unsafe_loading(content, tmp_path, monkeypatch, capsys):
    import argparse

    import torch

    bad = tmp_path / "ckpts" / "model.ckpt"
    bad.parent.mkdir()
    if content == "pickle":  # a pickle with an object torch does not load safely
        torch.save({"state_dict": argparse.Namespace(a=1)}, bad)
    else:
        bad.write_text("<html>not a checkpoint</html>")
    line = _main_fails_with(["experiment=digits_demo", f"model.init_checkpoint={bad}"], tmp_path, monkeypatch,
                            capsys)
    assert "weights_only" not in line and "trust" not in line
    expected = ("holds Python objects besides tensors (argparse.Namespace)" if content == "pickle" else
                "is not a PyTorch checkpoint (UnpicklingError")
    assert line.startswith(f"error: model.init_checkpoint: {bad} ") and expected in line, line


def test_offline_timm_teacher_fails_fast(tmp_path, monkeypatch, capsys):
    import time

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    run = tmp_path / "run"
    run.mkdir()
    start = time.perf_counter()
    line = _main_fails_with(["experiment=digits_demo", "sdq.teacher=resnet101"], run, monkeypatch, capsys)
    assert time.perf_counter() - start < 30
    assert line.startswith("error: sdq: teacher 'resnet101' needs timm's pretrained weights, but they are not in "
                           "the local cache and HF_HUB_OFFLINE is set;"), line


def test_missing_cifar10_offline(tmp_path):
    proc = run_cli(["dataset=cifar10", f"dataset.root={tmp_path}/nothing", "dataset.download=false"], tmp_path)
    _assert_one_line_error(proc, "dataset=imagefolder dataset.root=")


def test_cifar10_download_offline_leaves_no_folders(tmp_path):
    """Issue 10.7: offline, the CIFAR-10 download error used to leave empty outputs/runs/sdq/ and data/cifar10/."""
    from sdq_lightning.cli.precheck import _download_unreachable

    if _download_unreachable(timeout=3) is None:
        pytest.skip("the CIFAR-10 host is reachable: this test is about an offline machine")
    proc = run_cli(["dataset=cifar10"], tmp_path)  # root ${paths.data_dir}/cifar10 = data/cifar10 under tmp_path
    _assert_one_line_error(proc, "cannot be downloaded")
    assert "dataset.root=" in proc.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "data").exists()


def test_model_without_conv_or_linear_is_refused():
    """Issue 10.7: a model with nothing to quantize gave an empty plan that 'met' avg_bits 0."""
    from timm.models import register_model
    from torch import nn

    from app_helpers import compose_cfg
    from sdq_lightning.cli.errors import UserError
    from sdq_lightning.cli.precheck import check_config

    @register_model
    def sdq_test_no_layers(pretrained=False, num_classes=10, in_chans=1, **kwargs):
        return nn.Sequential(nn.Flatten(), nn.Identity())

    cfg = compose_cfg(["experiment=digits_demo", "model.backbone=sdq_test_no_layers"])
    with pytest.raises(UserError, match="has no Conv2d/Linear layer for SDQ to quantize"):
        check_config(cfg)
    cfg = compose_cfg(["experiment=digits_demo", "sdq.layers.exclude=[model.conv2,model.conv3]",
                       "sdq.layers.first_last=fp"])
    with pytest.raises(UserError, match="no Conv2d/Linear layer left after sdq.layers.include/exclude"):
        check_config(cfg)
