"""Exact resume: 4 epochs straight == 2 epochs, stop, resume from the checkpoint for 2 more (CPU, fixed seed)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from sdq_lightning import SDQ, SDQClassifier


class StopAfter(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


EXTRA = {}


def _run(make_trainer, digits, teacher, search_epochs, ckpt_dir, stop=None, resume=None):
    L.seed_everything(0, verbose=False)
    module = SDQClassifier("digits_cnn", in_chans=1, lr=0.05)
    module.model.load_state_dict(teacher.model.state_dict())
    sdq = SDQ(activation_bits=4, budget={"metric": "avg_bits", "target": 2.5}, search_epochs=search_epochs,
              teacher=teacher.model, search={"dbp_lr": 0.2}, runtime={"save_dir": ckpt_dir}, **EXTRA)
    callbacks = [sdq, ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)]
    if stop:
        callbacks.append(StopAfter(stop))
    trainer = make_trainer(max_epochs=4, callbacks=callbacks, enable_checkpointing=True, limit_train_batches=10)
    trainer.fit(module, digits.train(), ckpt_path=resume)
    return sdq, module


@pytest.mark.parametrize(("search_epochs", "layers"), [(3, None), pytest.param(1, None, marks=pytest.mark.slow),
                                                        pytest.param(3, {"step_follow": True}, marks=pytest.mark.slow)],
                         ids=["stop-mid-search", "stop-mid-phase2", "stop-mid-search-step-follow"])
def test_resume_is_exact(make_trainer, digits, fp_teacher, tmp_path, search_epochs, layers, monkeypatch):
    if layers:  # step_follow: the scale the steps follow is not in the checkpoint; the fit start reads it anew
        monkeypatch.setitem(EXTRA, "layers", layers)
    straight_sdq, straight = _run(make_trainer, digits, fp_teacher, search_epochs, tmp_path / "a")
    first_sdq, _ = _run(make_trainer, digits, fp_teacher, search_epochs, tmp_path / "b", stop=2)
    assert (first_sdq.phase.value == "search") == (search_epochs == 3)
    resumed_sdq, resumed = _run(make_trainer, digits, fp_teacher, search_epochs, tmp_path / "c",
                                resume=str(tmp_path / "b" / "last.ckpt"))
    assert dict(resumed_sdq.plan) == dict(straight_sdq.plan)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    diff = [(k, float((a[k].float() - b[k].float()).abs().max())) for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ after resume: {diff[:5]}"
    assert [h["epoch"] for h in resumed_sdq.history] == [0, 1, 2, 3]
