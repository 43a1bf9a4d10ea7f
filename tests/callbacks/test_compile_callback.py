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
from torch.utils.data import DataLoader

from sdq_lightning import SDQ, SDQClassifier


def _run(make_trainer, digits, teacher, compile_mode, kernels="eager", batched=True):
    L.seed_everything(0, verbose=False)
    model = SDQClassifier("digits_cnn", in_chans=1, lr=0.05)
    model.model.load_state_dict(teacher.model.state_dict())
    sdq = SDQ(weight_bits=(1, 2, 4, 8), activation_bits=4, budget={"metric": "avg_bits", "target": 3.0},
              search_epochs=2, teacher=teacher, ebr={"weight": 0.1},
              runtime={"compile": compile_mode, "kernels": kernels, "guard": False, "batched": batched})
    trainer = make_trainer(max_epochs=4, callbacks=[sdq], limit_train_batches=6)
    val = DataLoader(digits.test_set, batch_size=64)  # 450 images: a smaller last batch, another graph
    trainer.fit(model, digits.train(), val)
    # evaluation after fit: eval mode, inference mode, a smaller last batch, the frozen plan: each a recompile of
    # the compiled network (the first app run with compile failed here, past Dynamo's default recompile limit)
    acc = trainer.test(model, val, verbose=False)[0]["test/acc"]
    return model, sdq, acc


def _patch_compile(monkeypatch, calls):
    original = nn.Module.compile

    def aot_eager_compile(self, *args, **kwargs):
        calls.append(kwargs)
        kwargs.pop("mode", None)
        return original(self, *args, backend="aot_eager", **kwargs)

    monkeypatch.setattr(nn.Module, "compile", aot_eager_compile)


@pytest.mark.slow
def test_whole_network_compile_matches_eager_with_kd_and_ebr(make_trainer, digits, fp_teacher, monkeypatch):
    compiled_calls = []
    # under torch.compile the batched weight pass steps aside (the compiler fuses the per-layer quantizers): the
    # eager reference runs them per layer too (batched against per-layer: tests/unit/test_batched.py)
    eager_model, eager_sdq, eager_acc = _run(make_trainer, digits, fp_teacher, None, batched=False)
    _patch_compile(monkeypatch, compiled_calls)
    torch._dynamo.reset()
    model, sdq, acc = _run(make_trainer, digits, fp_teacher, "default")
    assert compiled_calls and compiled_calls[0].get("fullgraph") is True
    assert model.model._compiled_call_impl is not None, "the network was not compiled"
    assert sdq.plan.average_bits <= 3.0
    assert dict(sdq.plan) == dict(eager_sdq.plan)
    assert abs(acc - eager_acc) < 1e-6, (acc, eager_acc)
    assert "kd" in sdq._terms and "ebr" in sdq._terms  # the output hook and EBR ran in the compiled run
    for (name, a), b in zip(eager_model.model.state_dict().items(), model.model.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name


@pytest.mark.slow
def test_compiled_network_keeps_eager_kernels_through_test_and_has_room_to_recompile(make_trainer, digits, fp_teacher,
                                                                                     monkeypatch):
    """The app's default kernels="compile" with compile=...: the compiled graph runs the eager LSQ kernels, and the
    test stage's setup must not switch them back (each switch is a recompile: the first app run with compile hit
    Dynamo's recompile limit of 8 in trainer.test and failed after training)."""
    from sdq_lightning.modules import fused

    before = fused.get_kernels()
    limit = torch._dynamo.config.recompile_limit
    _patch_compile(monkeypatch, [])
    torch._dynamo.reset()
    try:
        _, sdq, acc = _run(make_trainer, digits, fp_teacher, "default", kernels="compile")
        assert fused.get_kernels() == "eager"
        assert torch._dynamo.config.recompile_limit >= 32
        assert acc > 0.5
    finally:
        fused.set_kernels(before)
        torch._dynamo.config.recompile_limit = limit
