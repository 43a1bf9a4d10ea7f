"""Reload an SDQ-trained user LightningModule for inference in a fresh process, and export a non-timm model. The
user's module (tests/helpers/user_module.py) is trained with the SDQ callback on real digits, with the
candidate set {2, 4, 8} (a searched checkpoint holds one step per candidate)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import sdq_lightning as sq
from sdq_lightning.checkpoint import plan_from_checkpoint
from sdq_lightning.export import export_model, load_packed, run_onnx
from helpers.data import digits_signed, digits_signed_loader
from helpers.user_module import UserNet

TESTS = Path(__file__).resolve().parents[1]  # the helpers package, for the fresh process


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """(checkpoint, held-out images, the trained module's logits on them)."""
    tmp = tmp_path_factory.mktemp("reload")
    pl.seed_everything(0, verbose=False)
    lit = UserNet()
    sdq = sq.SDQ(weight_bits=(2, 4, 8), activation_bits=4, budget={"metric": "avg_bits", "target": 3.0},
                 search_epochs=1, runtime={"kernels": "eager", "save_dir": tmp})
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=4, callbacks=[sdq], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    trainer.fit(lit, digits_signed_loader())
    ckpt = tmp / "own_sdq.ckpt"
    trainer.save_checkpoint(ckpt)
    x, _ = digits_signed(128, offset=1500)  # images not used for training
    lit.eval()
    with torch.no_grad():
        ref = lit(x)
    return ckpt, x, ref


def test_plain_load_from_checkpoint_fails(trained):
    """What the user met: Lightning's own reload does not know the quantized layers."""
    ckpt, _, _ = trained
    with pytest.raises(RuntimeError, match="weight_quant"):
        UserNet.load_from_checkpoint(ckpt)


def test_checkpoint_carries_a_searched_state_and_the_plan(trained):
    ckpt, _, _ = trained
    state = torch.load(ckpt, weights_only=True)
    assert state["state_dict"]["net.3.weight_quant.steps"].shape == (3,)  # one step per candidate 2, 4, 8
    plan = plan_from_checkpoint(state)
    assert plan.metadata["candidates"] == [2, 4, 8]
    assert plan.average_bits <= 3.0


@pytest.mark.slow  # a fresh interpreter (about 8 s); the in-process reload tests stay fast
def test_reload_in_a_fresh_process_is_exact(trained, tmp_path):
    ckpt, x, ref = trained
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch, sdq_lightning as sq\n"
              "from helpers.user_module import UserNet\n"
              "lit = sq.load_quantized(UserNet, sys.argv[1])\n"
              "assert not lit.training\n"
              "with torch.no_grad():\n"
              "    torch.save(lit(torch.load(sys.argv[2])), sys.argv[3])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(Path(sq.__file__).resolve().parents[1])])}
    res = subprocess.run([sys.executable, "-c", script, str(ckpt), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), ref)


def test_reload_into_an_instance_and_from_a_state_dict(trained, tmp_path):
    ckpt, x, ref = trained
    lit = sq.load_quantized(UserNet(width=16), ckpt)
    with torch.no_grad():
        assert torch.equal(lit(x), ref)
    # a plain state dict of the network plus the run's plan file
    plan = plan_from_checkpoint(ckpt).rebased(lit.net)
    plan.save(tmp_path / "plan.yaml")
    torch.save(lit.net.state_dict(), tmp_path / "net.pt")
    net = sq.load_quantized(UserNet().net, tmp_path / "net.pt", plan=tmp_path / "plan.yaml")
    with torch.no_grad():
        assert torch.equal(net(x), ref)


def test_reload_errors_are_one_line(trained, tmp_path):
    ckpt, _, _ = trained
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        sq.load_quantized(UserNet, tmp_path / "missing.ckpt")
    state = torch.load(ckpt, weights_only=True)
    state["callbacks"] = {}
    torch.save(state, tmp_path / "no_plan.ckpt")
    with pytest.raises(ValueError, match="holds no SDQ bit plan.*pass plan=") as err:
        sq.load_quantized(UserNet, tmp_path / "no_plan.ckpt")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="a plan for a different model") as err:
        sq.load_quantized(UserNet(width=8), ckpt)  # another model: the plan's layer sizes differ
    assert "\n" not in str(err.value)
    state = torch.load(ckpt, weights_only=True)
    del state["state_dict"]["net.4.running_var"]
    torch.save(state, tmp_path / "damaged.ckpt")
    with pytest.raises(ValueError, match=r"does not fit the model quantized with its plan: "
                                         r"missing \['net.4.running_var'\]"):
        sq.load_quantized(UserNet, tmp_path / "damaged.ckpt")


def test_export_a_non_timm_model(trained, tmp_path):
    """export_model on the user's own network (no timm name): packed, ONNX and report written; the packed file is
    rebuilt from a float instance; the ONNX model agrees with PyTorch on real images."""
    ckpt, x, ref = trained
    net = sq.load_quantized(UserNet, ckpt).net
    summary = export_model(net, tmp_path, x[:4])
    assert summary["onnx_top1_agreement"] == 1.0
    with pytest.raises(ValueError, match="pass load_packed\\(path, model="):
        load_packed(tmp_path / "model.sdqpack")
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "model.sdqpack", model=UserNet().net)(x), ref)
    got = torch.from_numpy(run_onnx(tmp_path / "model.onnx", x))
    assert (got.argmax(1) == ref.argmax(1)).all() and (got - ref).abs().max() < 1e-4


def test_export_model_input_and_opset_errors(trained, tmp_path):
    ckpt, x, _ = trained
    net = sq.load_quantized(UserNet, ckpt).net
    with pytest.raises(ValueError, match=r"example input of shape \(1, 3, 32, 32\) does not fit the model"):
        export_model(net, tmp_path, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"opset must be an integer in \[18, \d+\] for this model.*got 13"):
        export_model(net, tmp_path, x[:1], opset=13)
    with pytest.raises(ValueError, match="export format must be one of .*got 'tflite'"):
        export_model(net, tmp_path, x[:1], formats=["tflite"])


def test_reload_of_a_checkpoint_saved_before_the_quantizer_named_its_candidates(trained, tmp_path):
    """Checkpoints written before the quantizer stored its candidate set (no ``_extra_state``) with a set other than
    1..8 (here {2, 4, 8}): the plan in the checkpoint names the set, and the reload is exact."""
    ckpt, x, ref = trained
    state = torch.load(ckpt, weights_only=True)
    old = {k: v for k, v in state["state_dict"].items() if not k.endswith("weight_quant._extra_state")}
    assert len(old) < len(state["state_dict"])
    state["state_dict"] = old
    torch.save(state, tmp_path / "old.ckpt")
    with torch.no_grad():
        assert torch.equal(sq.load_quantized(UserNet, tmp_path / "old.ckpt")(x), ref)


def test_sdq_export_on_the_users_own_checkpoint_points_to_load_quantized(trained, tmp_path, capsys):
    from sdq_lightning.cli.export import main

    ckpt, _, _ = trained
    assert main([str(ckpt), "--out", str(tmp_path / "out")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"sdq-export: error: {ckpt} is not from an sdq-train run")
    assert "sdq_lightning.load_quantized(YourModule, path)" in lines[0] and "export_model" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_garbage_checkpoint_is_refused_without_unsafe_advice(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80junk")  # a truncated download
    with pytest.raises(ValueError) as err:
        sq.load_quantized(UserNet, bad)
    assert str(err.value).startswith(f"{bad} is not a PyTorch checkpoint (")
    assert "weights_only" not in str(err.value)
