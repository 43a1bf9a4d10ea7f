"""``SDQ(compile=...)`` through Lightning (issue 14): the whole network compiled in one graph, with KD (the
classifier-output hook) and EBR, searches and trains like the eager callback.

Inductor needs a C++ compiler and minutes on a small CPU, so the test compiles through AOT autograd with the
``aot_eager`` backend (``nn.Module.compile`` patched to pass it): the same graph capture, functionalisation and
autograd split as inductor, eager kernels. Same seed, same draws: the plan and the weights must match eager."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from sdq_lightning import SDQ, SDQClassifier


def _run(make_trainer, digits, teacher, compile_mode):
    L.seed_everything(0, verbose=False)
    model = SDQClassifier("digits_cnn", in_chans=1, lr=0.05)
    model.model.load_state_dict(teacher.model.state_dict())
    sdq = SDQ(weight_bits=(1, 2, 4, 8), activation_bits=None, budget={"metric": "avg_bits", "target": 3.0},
              search_epochs=1, teacher=teacher, ebr_weight=0.1, compile=compile_mode, kernels="eager", guard=False)
    trainer = make_trainer(max_epochs=2, callbacks=[sdq], limit_train_batches=6)
    trainer.fit(model, digits.train())
    return model, sdq


def test_whole_network_compile_matches_eager_with_kd_and_ebr(make_trainer, digits, fp_teacher, monkeypatch):
    compiled_calls = []
    original = nn.Module.compile

    def aot_eager_compile(self, *args, **kwargs):
        compiled_calls.append(kwargs)
        kwargs.pop("mode", None)
        return original(self, *args, backend="aot_eager", **kwargs)

    eager_model, eager_sdq = _run(make_trainer, digits, fp_teacher, None)
    monkeypatch.setattr(nn.Module, "compile", aot_eager_compile)
    torch._dynamo.reset()
    model, sdq = _run(make_trainer, digits, fp_teacher, "default")
    assert compiled_calls and compiled_calls[0].get("fullgraph") is True
    assert model.model._compiled_call_impl is not None, "the network was not compiled"
    assert sdq.plan.average_bits <= 3.0
    assert dict(sdq.plan) == dict(eager_sdq.plan)
    assert "kd" in sdq._terms and "ebr" in sdq._terms  # the output hook and EBR ran in the compiled run
    for (name, a), b in zip(eager_model.model.state_dict().items(), model.model.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name
