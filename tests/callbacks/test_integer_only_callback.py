"""SDQ(integer_only=True): phase 2 trains the integer graph (from the start with fixed bits, or from the freeze
of a search), the plan says so, and the trained network's ONNX integer graph computes its logits exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdq_lightning import SDQ, SDQClassifier
from sdq_lightning.export.integer_only import export_integer_onnx
from sdq_lightning.integer import is_integer_only


def _logits_equal_onnxruntime(net: torch.nn.Module, x: torch.Tensor, tmp_path) -> bool:
    import onnxruntime as ort

    path = export_integer_onnx(net, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    net.eval()
    with torch.no_grad():
        ref = net(x).numpy()
    return np.array_equal(sess.run(None, {"input": x.numpy()})[0], ref)


@pytest.mark.parametrize("searched", [False, True])
def test_integer_only_phase_2(searched, digits, make_trainer, tmp_path):
    torch.manual_seed(0)
    lit = SDQClassifier("digits_cnn", num_classes=10, in_chans=1, lr=0.05)
    bits = (2, 4, 8) if searched else (4,)
    cb = SDQ(weight_bits=bits, activation_bits=8, budget={"metric": "avg_bits", "target": 5.0},
             search_epochs=1 if searched else 0, integer_only=True, ebr={"weight": 0.0},
             runtime={"save_dir": tmp_path})
    trainer = make_trainer(max_epochs=2, callbacks=[cb], limit_train_batches=4)
    trainer.fit(lit, digits.train())
    net = lit.model
    assert is_integer_only(net) and cb.plan.metadata["integer_only"] is True
    assert net.conv1.weight_quant.per_channel
    stats = net.bn1.running_mean.clone()
    trainer.fit_loop.max_epochs = 3
    trainer.fit(lit, digits.train())
    assert torch.equal(net.bn1.running_mean, stats)  # BatchNorm frozen in phase 2
    x = next(iter(digits.test()))[0][:64]
    assert _logits_equal_onnxruntime(net, x, tmp_path)


def test_integer_only_errors():
    with pytest.raises(ValueError, match="integer_only must be true or false"):
        SDQ(weight_bits=(4,), integer_only="yes")
    with pytest.raises(ValueError, match="bn_fold_steps must be an integer >= 0"):
        SDQ(weight_bits=(4,), integer_only=True, freeze={"bn_fold_steps": -1})
    with pytest.raises(ValueError, match="integer_only runs eager"):
        SDQ(weight_bits=(4,), integer_only=True, runtime={"compile": "default"})


def test_batchnorm_live_for_bn_steps_then_folded(digits, make_trainer, tmp_path):
    """Phase 2 keeps BatchNorm live (its statistics follow the quantized weights) for ``freeze.bn_fold_steps`` steps,
    then folds it: from that step on the forward is the integer graph and the statistics stay put."""
    import lightning.pytorch as pl

    seen: list[tuple[int, bool, torch.Tensor]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            net = pl_module.model
            seen.append((trainer.global_step, is_integer_only(net), net.bn1.running_mean.clone()))

    torch.manual_seed(0)
    lit = SDQClassifier("digits_cnn", num_classes=10, in_chans=1, lr=0.05)
    cb = SDQ(weight_bits=(2,), activation_bits=8, search_epochs=0, integer_only=True, freeze={"bn_fold_steps": 3},
             ebr={"weight": 0.0}, runtime={"save_dir": tmp_path})
    trainer = make_trainer(max_epochs=2, callbacks=[cb, Watch()], limit_train_batches=4)
    trainer.fit(lit, digits.train())
    modes = [m for _, m, _ in seen]
    assert modes == [False] * 3 + [True] * 5  # folded before the 4th step's forward
    assert not torch.equal(seen[0][2], seen[2][2])  # live: the statistics moved
    assert all(torch.equal(seen[3][2], s) for _, _, s in seen[4:])  # folded: frozen


def test_short_phase_2_ends_folded(digits, make_trainer, tmp_path):
    """A phase 2 shorter than ``freeze.bn_fold_steps`` folds at its last step: the run's last checkpoint holds the
    integer-only model."""
    torch.manual_seed(0)
    lit = SDQClassifier("digits_cnn", num_classes=10, in_chans=1, lr=0.05)
    cb = SDQ(weight_bits=(4,), activation_bits=8, search_epochs=0, integer_only=True, freeze={"bn_fold_steps": 1000},
             ebr={"weight": 0.0}, runtime={"save_dir": tmp_path})
    trainer = make_trainer(max_epochs=1, callbacks=[cb], limit_train_batches=3)
    trainer.fit(lit, digits.train())
    assert is_integer_only(lit.model) and cb.state_dict()["fold_at"] == 1000
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert bool(state["model.integer_only.active"])
