"""The quantized model is one graph (issue 14): no graph breaks in train-mode forwards, compiled == eager, and (on a
GPU) no host-device synchronisation in a training step."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch._dynamo

import sdq_lightning as sq
from helpers.quantized import freeze_spread, freeze_where_candidate, quantized_model, weight_quantizers
from sdq_lightning.modules.fused import get_kernels, set_kernels


@pytest.fixture(autouse=True)
def _eager_kernels():
    before = get_kernels()
    set_kernels("eager")
    torch._dynamo.reset()
    yield
    set_kernels(before)
    torch._dynamo.reset()


def _model(name: str, frozen: bool, abits=4, size=32) -> tuple[torch.nn.Module, torch.Tensor]:
    model = quantized_model(name, 0, weight_bits=tuple(range(1, 9)), activation_bits=abits, seed=3)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        model(x)  # initialises the activation quantizers (sign and step from data, once)
    if frozen:
        freeze_spread(model)
    else:
        for i, q in enumerate(weight_quantizers(model)):
            if not q.frozen:
                q.set_level(3 + i % 5, reinit_dbp=0.6)
    return model, x


@pytest.mark.slow  # 17 s a case on 2 cores: torch.compile's graph-break checks are all in the slow tier
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_100"])
@pytest.mark.parametrize("frozen", [False, True], ids=["search", "frozen"])
def test_train_forward_has_no_graph_break(name, frozen):
    model, x = _model(name, frozen)
    out = torch._dynamo.explain(model)(x)
    assert out.graph_break_count == 0, [str(b.reason) for b in out.break_reasons][:5]
    assert out.graph_count == 1


@pytest.mark.slow  # about 20 s a case on a 2-core CPU
@pytest.mark.parametrize("frozen", [False, True], ids=["search", "frozen"])
def test_fullgraph_compiled_training_step_equals_eager(frozen):
    """Same draws (the counter lives on the device), same values and gradients: whole-model compile through AOT
    autograd (backend aot_eager, so the test does not pay for code generation)."""
    model, x = _model("resnet20", frozen)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for step in range(2):
        for m in (model, twin):
            for q in m.modules():
                if isinstance(q, sq.SDQWeightQuantizer):
                    q.set_draw_step(step)
        ye, yc = model(x), compiled(x)
        assert torch.allclose(ye, yc, rtol=1e-5, atol=1e-5)
        ye.square().mean().backward()
        yc.square().mean().backward()
    pa, pb = dict(model.named_parameters()), dict(twin.named_parameters())
    for k in pa:
        if pa[k].grad is None:
            assert pb[k].grad is None or not pb[k].grad.any(), k
            continue
        assert torch.allclose(pa[k].grad, pb[k].grad, rtol=1e-4, atol=1e-6), k
    for a, b in zip(model.modules(), twin.modules()):
        if isinstance(a, sq.SDQWeightQuantizer) and not frozen:
            assert a.last_bits == b.last_bits


@pytest.mark.gpu
@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
@pytest.mark.parametrize("frozen", [False, True], ids=["search", "frozen"])
def test_cuda_training_step_never_synchronises(frozen, batched):
    from sdq_lightning.budget import Budget, CostModel, profile_model
    from sdq_lightning.core.search import BitSearch
    from sdq_lightning.quantizers.optim import LogStepAdam

    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10)
    prof = profile_model(model, torch.randn(1, 3, 32, 32))
    sq.quantize_model(model, sq.QuantSpec(weight_bits=tuple(range(1, 9)), activation_bits=4))
    model = model.cuda().train()
    x, y = torch.randn(128, 3, 32, 32, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    with torch.no_grad():
        model(x)
    search = BitSearch(CostModel(model, prof), Budget("avg_bits", 2.0))
    search.start(100, 1)
    if frozen:
        freeze_where_candidate(model, 2)
    steps = [m.steps for m in model.modules() if isinstance(m, sq.SDQWeightQuantizer)]
    sgd = torch.optim.SGD([p for n, p in model.named_parameters() if not n.endswith(("dbp", "steps", "step"))],
                          lr=0.01)
    step_opt = LogStepAdam(steps)
    if batched:  # the batched weights build their index tensors (host to device copies) at the first step after
        from sdq_lightning.modules.batched import batch_weights  # a freeze: that step may synchronise, no other

        batch_weights(model)
    for i in range(4 if batched else 3):
        torch.cuda.set_sync_debug_mode("error" if i > 0 or not batched else 0)
        try:
            search.begin_step(i, 0.5)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if not frozen:
                search.step()
            step_opt.step()
            sgd.step()
            sgd.zero_grad()
            step_opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("value,expected", [("auto", "eager"), ("compile", "compile"), ("eager", "eager")])
def test_sdq_kernels_env_accepts_what_the_app_config_passes(monkeypatch, value, expected):
    """The app's ``kernels: ${oc.env:SDQ_KERNELS,auto}`` and the module's process default read the same variable:
    ``auto`` (the callback resolves it per device) must not fail at import, and a typo names what is allowed."""
    from sdq_lightning.modules import fused

    monkeypatch.setenv("SDQ_KERNELS", value)
    assert fused._env_kernels() == expected
    monkeypatch.setenv("SDQ_KERNELS", "fast")
    with pytest.raises(ValueError, match="SDQ_KERNELS must be one of .*auto"):
        fused._env_kernels()


def test_counter_uniform_compiles_to_the_same_draws_as_an_opaque_op():
    """Under torch.compile the counter hash is the custom op ``sdq::counter_uniform`` (kept out of inductor's fused
    network kernels); its draws equal the eager function's for every counter, without recompiling per counter."""
    from sdq_lightning.quantizers.functional import _counter_uniform, counter_uniform

    torch._dynamo.reset()
    key = 0x1234ABCD
    fn = torch.compile(lambda c: counter_uniform(key, c, 3) * 2.0, fullgraph=True)
    counter = torch.zeros((), dtype=torch.int64)
    for step in (0, 1, 7, 123456):
        counter.fill_(step)
        torch.testing.assert_close(fn(counter), _counter_uniform(key, counter, 3) * 2.0, rtol=0, atol=0)
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda c: counter_uniform(key, c, 3), backend=capture, fullgraph=True)(counter)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("sdq.counter_uniform" in t for t in targets), targets
