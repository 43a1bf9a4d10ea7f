"""AddedLosses on its own (issue 12, the callback split): the gradients it adds equal those of the written-out loss
``ce_weight * CE + kd_weight * KD + ebr_weight * EBR``, and follow the gradient scaler's scale."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdq_lightning.core.losses import AddedLosses
from sdq_lightning.losses import EntropyBinRegularizer, kd_loss
from sdq_lightning.modules.graphs import capture_eagerly
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


@pytest.mark.parametrize("scale", [1.0, 1024.0, torch.tensor(1024.0)], ids=["unscaled", "scaled", "scaler_tensor"])
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
    added = {n: g / scale for n, g in _grads(student).items()}  # EBR's gradient is added times the scale
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


# ------------------------------------------------------------------- under CUDA graphs (a CPU stand-in capture)
def _call_stand_in(log: list):
    """``capture_eagerly`` (the CPU stand-in of a CUDA-graph capture: static inputs, static outputs overwritten by
    every replay), logging each replay."""

    def capture(fn, inputs, warmup):
        replay = capture_eagerly(fn, inputs, warmup)

        def logged():
            log.append(fn)
            return replay()

        return logged

    return capture


def test_graphed_teacher_and_ebr_equal_eager_over_steps():
    student, teacher, _, _ = _nets()
    twin = copy.deepcopy(student)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    log: list = []
    runs = []
    for net, graphed in ((student, False), (twin, True)):
        layers = [m for m in quant_layers(net).values() if m.weight_quant is not None]
        losses = AddedLosses(ebr_weight=0.3, teacher=teacher, kd_temperature=2.0, kd_weight=0.7)
        losses.teacher = teacher
        losses.attach(net, "3", torch.device("cpu"))
        if graphed:
            losses.use_graphs(True, capture_fn=_call_stand_in(log))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        terms_seen, grads_seen = [], []
        for x, y in data:  # the weights change between steps: a replay must see them (read in place)
            losses.before_batch(x, torch.device("cpu"), kd=True)
            loss = F.cross_entropy(net(x), y)
            terms_seen.append(losses.before_backward(loss, 1.0, layers))
            loss.backward()
            losses.after_backward()
            grads_seen.append(_grads(net))
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append((terms_seen, grads_seen, losses))
    (terms_e, grads_e, _), (terms_g, grads_g, losses_g) = runs
    teacher_graph, kd_graph, ebr_graph = losses_g.graphs
    for graph in (teacher_graph, kd_graph, ebr_graph):
        assert (graph.captures, graph.replays, graph.failed) == (1, 3, None)
    assert len(log) == 9
    for te, tg, ge, gg in zip(terms_e, terms_g, grads_e, grads_g):
        # the logged EBR term of an earlier step is a copy, not the graph's output that the next replay overwrote
        assert set(te) == set(tg) == {"ebr", "kd"}
        for k in te:
            torch.testing.assert_close(tg[k], te[k])
        assert set(ge) == set(gg)
        for name in ge:
            torch.testing.assert_close(gg[name], ge[name])
    assert len({float(t["ebr"]) for t in terms_g}) == 3  # three different steps, three values kept


def test_graphed_ebr_is_recaptured_at_a_new_plan_and_stays_eager_beyond_one_pass():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    quantize_model(net, QuantSpec(weight_bits=(2, 4), activation_bits=None, first_last="8bit"))
    layers = [m for m in quant_layers(net).values() if m.weight_quant is not None]
    searched = [m for m in layers if m.weight_quant.candidates == (2, 4)]
    assert searched
    for m in searched:
        m.weight_quant.freeze(2)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    losses = AddedLosses(ebr_weight=0.3)
    losses.use_graphs(True, capture_fn=_call_stand_in([]))
    _, _, ebr_graph = losses.graphs

    def ebr_term():
        return float(losses.before_backward(F.cross_entropy(net(x), y), 1.0, layers)["ebr"])

    first = ebr_term()
    ebr_term()
    assert (ebr_graph.captures, ebr_graph.replays) == (1, 2)
    searched[0].weight_quant.freeze(4)  # another plan: other bins, so another graph (the key holds the frozen levels)
    assert ebr_term() != first and ebr_graph.captures == 2
    assert ebr_term() == pytest.approx(float(0.3 * EntropyBinRegularizer()(layers).detach()), rel=1e-6)
    losses.ebr.batched_max_weights = 10  # the per-layer form (large models; it may read the device): not graphed
    assert ebr_term() == pytest.approx(float(0.3 * EntropyBinRegularizer().per_layer(layers).detach()), rel=1e-6)
    assert (ebr_graph.captures, ebr_graph.replays) == (2, 4)


def test_graphed_call_copies_inputs_keeps_a_graph_per_key_and_falls_back_to_eager():
    from sdq_lightning.modules.graphs import GraphedCall

    w = torch.ones(3)
    state = {"k": 0}
    call = GraphedCall(lambda x: x * w + state["k"], key=lambda: state["k"], capture_fn=_call_stand_in([]))
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])
    out_a = call(a).clone()
    out = call(b)  # same shape: a replay on the new input, copied into the captured one
    assert torch.equal(out_a, a) and torch.equal(out, b) and (call.captures, call.replays) == (1, 2)
    w.mul_(2)  # state changed in place is seen by a replay
    assert torch.equal(call(a), 2 * a) and call.captures == 1
    call(torch.ones(2, 3))  # another shape
    state["k"] = 1  # another key
    assert torch.equal(call(a), 2 * a + 1) and call.captures == 3
    state["k"] = 0  # a key seen before replays its own graph (the last max_graphs are kept)
    assert torch.equal(call(b), 2 * b) and call.captures == 3
    small = GraphedCall(lambda x: x * w, capture_fn=_call_stand_in([]), max_graphs=1)
    small(a), small(torch.ones(2, 3)), small(a)
    assert small.captures == 3  # one graph kept: the first shape was dropped and captured again

    def failing(fn, inputs, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")

    broken = GraphedCall(lambda x: x + 1, name="the thing", capture_fn=failing)
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture of the thing failed .*stream is capturing.*eager"):
        assert torch.equal(broken(a), a + 1)
    assert torch.equal(broken(b), b + 1) and broken.failed and broken.captures == 0  # eager, no second attempt
