"""sdq-export on a run folder laid out like the Hydra app's (plan.yaml, a Lightning *.ckpt, .hydra/config.yaml)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from sdq_lightning import BitPlan
from sdq_lightning.cli.export import main
from sdq_lightning.export import export_from_checkpoint, load_packed, run_onnx


def _run_folder(model, x, root):
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    BitPlan.from_model(model, x[:1]).save(run / "plan.yaml")
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"model": {"backbone": "resnet20",
                                                                          "num_classes": 10}}))
    # what Lightning writes for SDQClassifier: the backbone under "model.", plus other entries
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.5"},
               run / "checkpoints" / "last.ckpt")
    return run


def test_export_from_checkpoint_is_exact(resnet20_mixed, digits_batch, tmp_path) -> None:
    x, _ = digits_batch
    run = _run_folder(resnet20_mixed, x, tmp_path)
    model = export_from_checkpoint(run / "checkpoints" / "last.ckpt", "resnet20", 10, run / "plan.yaml")
    with torch.no_grad():
        assert torch.equal(model(x), resnet20_mixed(x))


def test_cli_writes_everything(resnet20_mixed, digits_batch, tmp_path, capsys) -> None:
    x, _ = digits_batch
    run = _run_folder(resnet20_mixed, x, tmp_path)
    out = tmp_path / "out"
    assert main([str(run), "--out", str(out), "--example-input-size", "3,32,32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for name in ("model.sdqpack", "model.onnx", "capability.md", "capability.json", "plan.yaml", "export.json"):
        assert (out / name).is_file(), name
    assert summary["onnx_top1_agreement"] == 1.0
    with torch.no_grad():
        ref = resnet20_mixed(x)
        assert torch.equal(load_packed(out / "model.sdqpack")(x), ref)
    assert (run_onnx(out / "model.onnx", x).argmax(1) == ref.numpy().argmax(1)).all()


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdq-export: error:") and "\n" not in err
    (tmp_path / "run").mkdir()
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert "no *.ckpt" in capsys.readouterr().err
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--formats", "tflite"]) == 2


def test_help_shows_defaults_and_minimum_opset(capsys) -> None:
    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: packed,onnx,report)" in text
    assert "ONNX opset (default: 25; minimum 18." in text
    assert "default: the run's dataset.image_size" in text


def test_bad_opset_and_input_size_are_one_line(resnet20_mixed, digits_batch, tmp_path, capsys) -> None:
    x, _ = digits_batch
    run = _run_folder(resnet20_mixed, x, tmp_path)
    cases = {("--opset", "13"): "sdq-export: error: --opset must be an integer in [18, ",
             ("--opset", "x"): "sdq-export: error: --opset must be an integer >= 18 (default 25), got 'x'",
             ("--example-input-size", "1,8,8"): "sdq-export: error: --example-input-size: input of shape (1, 1, 8, 8) "
                                                "does not fit the model: ",
             ("--example-input-size", "3,a"): "sdq-export: error: --example-input-size must be positive integers",
             ("--bogus", "1"): "sdq-export: error: unrecognized arguments: --bogus 1"}
    for args, start in cases.items():
        try:
            code = main([str(run), "--out", str(tmp_path / "o"), *args])
        except SystemExit as ex:  # argparse's own errors
            code = ex.code
        assert code == 2, args
        err = capsys.readouterr().err
        assert err.startswith(start), (args, err)
        assert err.count("\n") == 1, (args, err)
    assert not (tmp_path / "o" / "model.onnx").exists()
