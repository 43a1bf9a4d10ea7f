"""AddedLosses on its own (issue 12, the callback split): the gradients it adds equal those of the written-out loss
``ce_weight * CE + kd_weight * KD + ebr_weight * EBR``, and follow the gradient scaler's scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdq_lightning.callbacks.losses import AddedLosses
from sdq_lightning.losses import EntropyBinRegularizer, kd_loss
from sdq_lightning.surgery import QuantSpec, quant_layers, quantize_model


def _nets():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    quantize_model(student, QuantSpec(weight_bits=(2,), activation_bits=None, first_last="8bit"))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    return student, teacher, x, y


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scale", [1.0, 1024.0], ids=["unscaled", "scaled"])
def test_added_gradients_equal_the_written_out_loss(scale):
    student, teacher, x, y = _nets()
    layers = [m for m in quant_layers(student).values() if m.weight_quant is not None]
    losses = AddedLosses(ebr_weight=0.3, teacher=teacher, kd_temperature=2.0, kd_weight=0.7, ce_weight=0.5)
    losses.teacher = teacher  # as load_teacher would (an nn.Module teacher)
    losses.attach(student, "3", torch.device("cpu"))
    losses.before_batch(x, torch.device("cpu"), kd=True)
    loss = F.cross_entropy(student(x), y) * scale  # what a gradient scaler hands to backward
    terms = losses.before_backward(loss, scale, layers)
    loss.backward()
    losses.after_backward()
    added = {n: g / scale for n, g in _grads(student).items()}
    losses.detach()

    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t = teacher(x)
    out = student(x)
    ebr = EntropyBinRegularizer("uniform", 0.0)(layers)
    (0.5 * F.cross_entropy(out, y) + 0.7 * kd_loss(out, t, 2.0) + 0.3 * ebr).backward()
    direct = _grads(student)
    assert set(added) == set(direct)
    for name in direct:
        torch.testing.assert_close(added[name], direct[name], rtol=1e-4, atol=1e-7)
    assert set(terms) == {"ebr", "kd"} and float(terms["ebr"]) > 0 and float(terms["kd"]) > 0
    assert float(terms["kd"]) == pytest.approx(float(kd_loss(out.detach(), t, 2.0)), rel=1e-5)


def test_nothing_added_without_teacher_or_ebr():
    student, _, x, y = _nets()
    losses = AddedLosses(ebr_weight=0.0)
    losses.attach(student, "3", torch.device("cpu"))  # no teacher: no hook
    losses.before_batch(x, torch.device("cpu"), kd=True)
    loss = F.cross_entropy(student(x), y)
    assert losses.before_backward(loss, 1.0, layers=None) == {}
    loss.backward()
    plain = _grads(student)
    losses.after_backward()
    for name, g in _grads(student).items():
        assert torch.equal(g, plain[name])


def test_teacher_with_other_classes_is_refused():
    losses = AddedLosses(teacher=None)
    losses.teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    with pytest.raises(ValueError, match="teacher outputs 7 classes but the student has 10"):
        losses.check_teacher(torch.randn(2, 1, 8, 8), 10)
