"""The batched weight pass (sdq_lightning.modules.batched): every layer's weight quantized in one pass per forward
gives what each layer's own quantizer gives (values bit for bit, the same draws, gradients up to summation order),
falls back per layer where it cannot batch, follows the freeze, composes with CUDA-graph capture and steps aside
under torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sdq_lightning as sq
from helpers.quantized import freeze_spread, quantized_model, scatter_levels, weight_quantizers
from sdq_lightning.modules.batched import BatchedWeights, batch_weights, segment_quantize
from sdq_lightning.modules.graphs import GraphedNetwork
from sdq_lightning.quantizers import SDQWeightQuantizer
from sdq_lightning.quantizers.estimators import register_estimator, unregister_estimator
from sdq_lightning.quantizers.functional import counter_uniform, counter_uniform_many, lsq_quantize


def _net(name="resnet20", per_channel=False, abits=None, bits=tuple(range(1, 9)), seed=0, **spec) -> nn.Module:
    model = quantized_model(name, seed, weight_bits=bits, activation_bits=abits, per_channel=per_channel, seed=3,
                            **spec)
    return scatter_levels(model, seed + 1)  # every layer at its own level, DBPs anywhere in [0, 1]


def _step(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in net.parameters():
        p.grad = None
    out = net(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """Per-layer ``a`` against batched ``b``: outputs bit-equal, gradients within float rounding of the sums, the
    quantizers' buffers (draw counter, last index, level) equal, and the same after SGD steps move the weights."""
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    for _ in range(steps):
        out_a, ga = _step(a, x)
        out_b, gb = _step(b, x)
        assert torch.equal(out_a, out_b)
        assert ga.keys() == gb.keys()
        for name in ga:
            scale = ga[name].abs().max().clamp_min(1e-12)
            err = float((ga[name] - gb[name]).abs().max() / scale)
            # step gradients cancel heavily: both float32 paths sit ~1e-4 (of the largest entry) from a float64
            # reference, the batched one no further than the per-layer one (measured when this test was written)
            assert err < 1e-3, (name, err)
        for qa, qb in zip(weight_quantizers(a), weight_quantizers(b)):
            for buf in ("draw_step", "last_index", "level"):
                assert torch.equal(getattr(qa, buf), getattr(qb, buf)), buf
        opt_a.step()
        opt_b.step()
        for q in weight_quantizers(a) + weight_quantizers(b):
            q.clamp_dbp_()
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    for qa, qb in zip(weight_quantizers(a), weight_quantizers(b)):
        assert torch.equal(qa.last_index, qb.last_index)
    a.train()
    b.train()


def _count_quantizer_calls(monkeypatch) -> list:
    calls = []
    original = SDQWeightQuantizer.forward

    def counted(self, w):
        calls.append(self)
        return original(self, w)

    monkeypatch.setattr(SDQWeightQuantizer, "forward", counted)
    return calls


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("estimator", ["gumbel", "ste"])
def test_batched_equals_per_layer_while_searching(per_channel, estimator, monkeypatch):
    a = _net(per_channel=per_channel, estimator=estimator)
    b = copy.deepcopy(a)
    bw = batch_weights(b)
    calls = _count_quantizer_calls(monkeypatch)
    x = torch.randn(4, 3, 32, 32)
    _assert_same(a, b, x)
    # a's quantizers ran per layer; none of b's did (the batched pass serves all of them)
    assert calls and not any(q in calls for q in weight_quantizers(b))
    groups = bw.groups()
    assert sorted((len(g.layers), g.frozen) for g in groups) == [(2, True), (20, False)]  # stem + fc fixed at 8


def test_batched_equals_per_layer_frozen_mixed_bits_with_binary_and_activations():
    a = _net(name="mobilenetv2_100", abits=4, bits=(1, 2, 3, 4, 8))
    freeze_spread(a)  # 1-bit layers among them
    b = copy.deepcopy(a)
    bw = batch_weights(b)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a(x)
        b(x)  # the activation quantizers' initialisation reads data
    _assert_same(a, b, x, steps=2)
    assert [g.frozen for g in bw.groups()] == [True, True]  # multi-bit and 1-bit layers apart
    assert [g.has_binary for g in bw.groups()] == [False, "all"]


def test_groups_follow_the_freeze_and_unbatchable_layers_run_their_own_forward(monkeypatch):
    register_estimator("plain_ste_test", lambda beta, mixed, u, t: ((u < beta.detach()).to(beta.dtype), beta))
    try:
        a = _net(bits=(2, 4, 8))
        # one layer with an estimator not declared vectorised, one reading its DBPs as a cascade: per layer
        layers = [m for m in sq.quant_layers(a).values() if not m.weight_quant.frozen]
        layers[3].weight_quant = SDQWeightQuantizer((2, 4, 8), estimator="plain_ste_test", weight=layers[3].weight,
                                                    layer_id=33)
        layers[5].weight_quant = SDQWeightQuantizer((2, 4, 8), reading="cascade", weight=layers[5].weight,
                                                    layer_id=55)
        b = copy.deepcopy(a)
        bw = batch_weights(b)
        calls = _count_quantizer_calls(monkeypatch)
        x = torch.randn(4, 3, 32, 32)
        _assert_same(a, b, x, steps=2)
        own = {id(q) for q in calls}
        b_layers = [m for m in sq.quant_layers(b).values() if not m.weight_quant.frozen]
        assert {id(b_layers[3].weight_quant), id(b_layers[5].weight_quant)} <= own
        assert not any(id(m.weight_quant) in own for i, m in enumerate(b_layers) if i not in (3, 5))
        assert bw.builds == 1
        for net in (a, b):  # the freeze of half the layers: rebuilt once, still equal
            for i, q in enumerate(weight_quantizers(net)):
                if not q.frozen and i % 2 == 0:
                    q.freeze(q.candidates[1])
        _assert_same(a, b, x, steps=2)
        assert bw.builds == 2
    finally:
        unregister_estimator("plain_ste_test")


def test_a_failed_forward_leaves_no_stale_weight():
    net = _net()
    batch_weights(net)
    with pytest.raises(RuntimeError):
        net(torch.randn(2, 5, 32, 32))  # wrong channel count: the stem convolution raises
    assert all(m._batched_weight is None for m in sq.quant_layers(net).values())


def test_batch_weights_is_idempotent_refreshes_and_is_removable():
    net = _net()
    bw = batch_weights(net)
    assert batch_weights(net) is bw and vars(net)["forward"] is bw
    old = net.layer1[0].conv1
    net.layer1[0].conv1 = copy.deepcopy(old)  # a surgery that replaced a layer: a second call lists the new one
    assert batch_weights(net) is bw and net.layer1[0].conv1 in bw.layers and old not in bw.layers
    batch_weights(net, enabled=False)
    assert not bw.enabled
    bw.remove()
    assert "forward" not in vars(net)
    with pytest.raises(ValueError, match="already replaced"):
        net.forward = lambda x: x
        BatchedWeights(net)


def test_counter_uniform_many_equals_the_per_layer_draws():
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 2**32, (64,), generator=g, dtype=torch.long)
    counters = torch.randint(0, 2**40, (64,), generator=g, dtype=torch.long)
    many = counter_uniform_many(keys, counters)
    one = torch.stack([counter_uniform(int(k), c, 1)[0] for k, c in zip(keys, counters)])
    assert torch.equal(many, one)


def test_segment_quantize_matches_lsq_per_segment():
    """Two segments with their own step and range against PyTorch-checked lsq_quantize (tests/unit/
    test_lsq_numerics.py), values and gradients."""
    torch.manual_seed(0)
    w = torch.randn(300, dtype=torch.float64, requires_grad=True)
    seg = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    steps = torch.tensor([0.3, 0.05], dtype=torch.float64, requires_grad=True)
    table = torch.tensor([[-2, 1, 0, 0.1], [-128, 127, 0, 0.01]], dtype=torch.float64)
    out = segment_quantize(w, seg, steps, table, has_binary=False)
    w2 = w.detach().clone().requires_grad_(True)
    s2 = steps.detach().clone().requires_grad_(True)
    ref = torch.cat([lsq_quantize(w2[:100], s2[0], -2, 1, 0.1), lsq_quantize(w2[100:], s2[1], -128, 127, 0.01)])
    assert torch.equal(out, ref)
    gy = torch.randn(300, dtype=torch.float64)
    out.backward(gy)
    ref.backward(gy)
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(steps.grad, s2.grad)


def _stand_in_calling_the_instance_forward(log: list):
    """Like make_graphed_callables as the network sees it: passes through ``net(...)`` (so through the batched weights
    installed on the instance), then a graphed forward on the instance."""

    def capture(net, sample, warmup):
        inner = vars(net)["forward"]
        for _ in range(warmup + 1):
            out = net(*sample)
            torch.autograd.grad(out.float().sum(), [p for p in net.parameters() if p.requires_grad],
                                allow_unused=True)

        def graphed(*args):
            log.append(len(args))
            return inner(*args)

        net.forward = graphed
        return net

    return capture


def test_graphed_network_captures_the_batched_weights(monkeypatch):
    a = _net()
    b = copy.deepcopy(a)
    bw = batch_weights(b)
    log: list = []
    graphs = GraphedNetwork(b, warmup=1, capture_fn=_stand_in_calling_the_instance_forward(log))
    calls = _count_quantizer_calls(monkeypatch)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # the stem's input quantizer initialises from data before the capture, as in the callback
        a(x)
        b(x)
    _assert_same(a, b, x, steps=2)
    assert graphs.captures == 1 and graphs.replays == 2 and log
    assert not any(q in calls for q in weight_quantizers(b))
    graphs.remove()
    assert vars(b)["forward"] is bw


@pytest.mark.slow  # 12-16 s on 2 cores (torch.compile); with test_compile's graph-break cases in the slow tier
def test_under_torch_compile_the_batching_steps_aside_with_no_graph_break():
    import torch._dynamo

    net = _net()
    batch_weights(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net(x)  # the activation quantizers' initialisation reads data once (before compiling, as the callback does)
    torch._dynamo.reset()
    try:
        out = torch._dynamo.explain(net)(x)
    finally:
        torch._dynamo.reset()
    assert out.graph_break_count == 0 and out.graph_count == 1


def test_the_callback_installs_the_batched_weights_by_default():
    from sdq_lightning import SDQ

    assert SDQ().batched is True
    with pytest.raises(ValueError, match="batched must be true or false"):
        SDQ(runtime={"batched": "yes"})


# ---------------------------------------------------------------------------- the vectorised expected cost
@pytest.mark.parametrize("metric", ["avg_bits", "size", "bitops"])
def test_linear_expected_cost_equals_the_per_layer_sum(metric):
    from sdq_lightning.budget import cost as cost_mod

    net = _net(abits=4)
    prof = sq.profile_model(net, torch.randn(1, 3, 32, 32))
    cm = sq.CostModel(net, prof)
    fast = cm.expected(metric)
    assert cm._linear_cache[1] is not None  # the vectorised path ran
    dbps = [q.dbp for q in weight_quantizers(net) if not q.frozen]
    g_fast = torch.autograd.grad(fast, dbps)
    cost_mod._LINEAR.discard(metric)  # the per-layer sum, as for a metric not declared linear
    try:
        slow = cm.expected(metric)
        g_slow = torch.autograd.grad(slow, dbps)
    finally:
        cost_mod._LINEAR.add(metric)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=0)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_a_metric_not_declared_linear_takes_the_per_layer_sum():
    from sdq_lightning.budget import register_metric, unregister_metric

    @register_metric("squares_test")
    def squares(layers, other):
        return sum(lc.params * sq.budget.cost.bits_or_fp(lc.w_bits) ** 2 for lc in layers)

    try:
        net = _net()
        cm = sq.CostModel(net, sq.profile_model(net, torch.randn(1, 3, 32, 32)))
        value = cm.expected("squares_test")
        assert cm._linear_cache is None
        bits = {n: q.expected_bits() for n, q in ((n, m.weight_quant) for n, m in sq.quant_layers(net).items())}
        ref = sum(p.params * bits[n] ** 2 for n, p in prof_items(net))
        torch.testing.assert_close(value, ref)
    finally:
        unregister_metric("squares_test")


def prof_items(net):
    return sq.profile_model(net, torch.randn(1, 3, 32, 32)).items()


def test_stacked_expected_bits_equals_each_quantizer():
    from sdq_lightning.quantizers.sdq import stacked_expected_bits

    net = _net()
    qs = [q for q in weight_quantizers(net) if not q.frozen]
    with torch.no_grad():
        qs[0].dbp[qs[0].current_level] = 1.3  # outside [0, 1]: clamped in value, identity gradient, as per layer
    qs[1].set_level(0)
    stacked = stacked_expected_bits(qs)
    each = torch.stack([q.expected_bits() for q in qs])
    assert torch.equal(stacked, each)
    dbps = [q.dbp for q in qs]
    for a, b in zip(torch.autograd.grad(stacked.sum(), dbps), torch.autograd.grad(each.sum(), dbps)):
        assert torch.equal(a, b)
    cascade = SDQWeightQuantizer((2, 4, 8), reading="cascade", weight=torch.randn(4, 4))
    assert stacked_expected_bits(qs + [cascade]) is None
    assert stacked_expected_bits(qs[:1] + [weight_quantizers(net)[0]]) is None  # a frozen (fixed 8-bit) stem


@pytest.mark.parametrize("frozen", [False, True], ids=["search", "frozen"])
def test_chunks_give_the_same_values_and_gradients(frozen, monkeypatch):
    """The flat pass in chunks (bounded temporaries for large models) against one chunk: forward bit-equal, weight
    gradients bit-equal (elementwise), step and DBP gradients equal up to float64 summation order."""
    from sdq_lightning.modules import batched as batched_mod

    a = _net()
    if frozen:
        freeze_spread(a)
    b = copy.deepcopy(a)
    batch_weights(a)
    batch_weights(b)
    x = torch.randn(2, 3, 32, 32)
    out_a, ga = _step(a, x)
    monkeypatch.setattr(batched_mod, "CHUNK", 10_007)  # ~27 chunks, boundaries inside segments
    out_b, gb = _step(b, x)
    assert torch.equal(out_a, out_b)
    for name in ga:
        if name.endswith("weight"):
            assert torch.equal(ga[name], gb[name]), name
        else:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-6, atol=1e-12)


def test_progressive_choice_draws_beta_and_decides_at_one_half():
    """The one progressive choice (per layer and batched): evaluation takes the higher width when the live DBP is at
    least 0.5 (always at the lowest level); training with ``ste`` takes it when ``u < beta``, its mask carries the
    gradient of beta, and at the lowest level the mask is 1 without a gradient."""
    from sdq_lightning.quantizers import get_estimator
    from sdq_lightning.quantizers.sdq import progressive_choice

    live = torch.tensor([0.2, 0.5, 0.7, 1.3, 0.1], requires_grad=True)
    hi, lo = torch.tensor([3, 2, 1, 4, 0]), torch.tensor([2, 1, 0, 3, 0])
    take, index = progressive_choice(live, hi, lo)
    assert take.tolist() == [False, True, True, True, True] and index.tolist() == [2, 2, 1, 4, 0]
    u = torch.tensor([0.1, 0.9, 0.6, 0.99, 0.5])
    mask, index = progressive_choice(live, hi, lo, get_estimator("ste"), 0.0, u, torch.tensor(1.0))
    assert mask.tolist() == pytest.approx([1.0, 0.0, 1.0, 1.0, 1.0]) and index.tolist() == [3, 1, 1, 4, 0]
    mask.sum().backward()
    assert live.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # straight through the clamp; none at the bottom


def test_structure_key_follows_the_freeze_and_the_activation_initialisation():
    from sdq_lightning.quantizers import ActQuantizer
    from sdq_lightning.quantizers.sdq import structure_key

    net = _net(bits=(2, 4, 8))
    layers = list(sq.quant_layers(net).values())
    key = structure_key(layers)
    assert structure_key(layers) == key
    layers[1].weight_quant.set_level(0)  # a level change is a device value: the structure is the same
    assert structure_key(layers) == key
    layers[1].weight_quant.freeze(4)
    assert structure_key(layers) != key
    aq = ActQuantizer(4)
    before = structure_key([aq])
    aq.initialize(torch.randn(8))
    assert structure_key([aq]) != before
