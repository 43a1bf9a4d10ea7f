"""GraphedNetwork (sdq_lightning.modules.graphs): CUDA-graph replay of the quantized network's training step.

On the CPU the capture is a stand-in that behaves like ``torch.cuda.make_graphed_callables`` as far as the
network sees it (warm-up passes that move the buffers, then a forward installed on the instance): these tests check
the dispatch (when to replay, re-capture or run eager), the buffer restore and the KD output routing. The work
around the network (``GraphedCall``: the teacher's forward, KD, EBR, the DBP step, the step sizes) goes through
``capture_eagerly``, the CPU stand-in with a graph's contract. The ``gpu`` tests capture real CUDA graphs and compare
the training steps with eager ones.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import timm
import torch
from torch import nn

import sdq_lightning as sq
from helpers.quantized import freeze_where_candidate, quantized_model
from helpers.user_module import UserNet
from sdq_lightning.modules.graphs import GraphedNetwork


def _stand_in(log: list):
    """A CPU stand-in for make_graphed_callables: ``warmup`` + 1 forward/backward passes, then an instance forward."""

    def capture(net, sample, warmup):
        for _ in range(warmup + 1):
            out = type(net).forward(net, *sample)
            grads = [p for p in net.parameters() if p.requires_grad]
            torch.autograd.grad(out.float().sum(), grads, allow_unused=True)
        orig = type(net).forward

        def graphed(*args):
            log.append(tuple(a.shape for a in args))
            return orig(net, *args)

        net.forward = graphed
        return net

    return capture


def _searched_net(seed: int = 0) -> nn.Module:
    # the activation quantizers' initialisation reads data: before capture
    return quantized_model("resnet20", seed, calibrate=(8, 3, 32, 32), weight_bits=tuple(range(1, 9)),
                           activation_bits=4)


def _buffers(net: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in net.buffers()]


def test_replay_recapture_and_eager_fallback_with_buffers_restored():
    net = _searched_net()
    twin = copy.deepcopy(net)
    replays: list = []
    outputs: list = []
    g = GraphedNetwork(net, warmup=2, on_output=outputs.append, capture_fn=_stand_in(replays))
    x = torch.randn(8, 3, 32, 32)
    before = _buffers(net)
    out = net(x)
    assert g.captures == 1 and g.replays == 1 and len(replays) == 1
    # the capture's warm-up passes moved BatchNorm statistics and draw counters; they were put back, so the graphed
    # network's buffers after one step equal those of an eager twin after one step
    ref = twin(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(net.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, _buffers(net)))  # the step itself did move them
    assert outputs and outputs[-1] is out

    net(x)  # same key: replay, no capture
    assert (g.captures, g.replays) == (1, 2)
    net(x[:5])  # the smaller last batch: eager
    assert (g.captures, g.replays) == (1, 2)
    with torch.no_grad():
        net(x)  # no gradients: eager
    net.eval()
    n_out = len(outputs)
    net(x)  # evaluation: eager, and not a KD output
    assert (g.captures, g.replays) == (1, 2) and len(outputs) == n_out
    net.train()

    q = next(m for m in net.modules() if isinstance(m, sq.SDQWeightQuantizer) and len(m.candidates) > 1)
    q.freeze(2)  # the freeze changes the captured work: re-capture
    net(x)
    assert (g.captures, g.replays) == (2, 3)
    g.remove()
    assert "forward" not in vars(net)
    net(x)
    assert g.replays == 3


@pytest.mark.slow  # about 8 s; test_a_fit_with_the_eager_work_graphed_equals_the_eager_fit stays fast
def test_graphed_training_equals_eager_training():
    """Five SGD steps through the dispatcher (stand-in capture) equal five eager steps exactly."""
    torch.manual_seed(1)
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(5)]
    nets = [_searched_net(), _searched_net()]
    GraphedNetwork(nets[1], capture_fn=_stand_in([]))
    losses = []
    for net in nets:
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        run = []
        for i, (x, y) in enumerate(data):
            for q in net.modules():
                if isinstance(q, sq.SDQWeightQuantizer):
                    q.set_draw_step(i)
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _failing_capture(net, sample, warmup):
    raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_raises_or_falls_back_to_eager_with_a_warning():
    net, twin = _searched_net(), _searched_net()
    x = torch.randn(8, 3, 32, 32)
    GraphedNetwork(net, capture_fn=_failing_capture)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        net(x)
    del net.forward
    outputs: list = []
    g = GraphedNetwork(net, capture_fn=_failing_capture, fallback=True, on_output=outputs.append)
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture of .* failed .*stream is capturing.*runs eager"):
        out = net(x)
    torch.testing.assert_close(out, twin(x), rtol=0, atol=0)  # eager, buffers untouched by the failed capture
    assert g.failed and g.captures == 0 and outputs[-1] is out
    net(x)  # no second attempt, no second warning
    assert g.captures == 0


def test_a_replaced_forward_is_refused():
    net = _searched_net()
    GraphedNetwork(net, capture_fn=_stand_in([]))
    with pytest.raises(ValueError, match="already replaced"):
        GraphedNetwork(net, capture_fn=_stand_in([]))


def _lit() -> UserNet:
    return UserNet("rgb_tiny", width=8, lr=0.05, momentum=0.0)


def _fit(tmp_path, cuda: bool, graph_work=None, **sdq_kwargs):
    """Fit ``_lit()`` with SDQ (search 1 epoch of 6 batches, then 1 epoch frozen); ``graph_work``: a capture function
    for the graphs around the network (``SDQ._graph_eager_work``), as ``compile="cuda-graphs"`` turns them on."""
    torch.manual_seed(0)
    x, y = torch.randn(96, 3, 16, 16), torch.randint(0, 4, (96,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    runtime = {"save_dir": tmp_path, **sdq_kwargs.pop("runtime", {})}
    cb = sq.SDQ(weight_bits=(2, 4, 8), budget={"metric": "avg_bits", "target": 4.0}, search_epochs=1, runtime=runtime,
                **sdq_kwargs)
    if graph_work is not None:
        cb._graph_eager_work(graph_work)
    hw = {"accelerator": "cuda", "devices": 1, "precision": "bf16-mixed"} if cuda else {"accelerator": "cpu"}
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **hw)
    lit = _lit()
    trainer.fit(lit, loader)
    return cb, lit


def test_a_fit_with_the_eager_work_graphed_equals_the_eager_fit(tmp_path):
    """The eager work around a graphed network replayed as graphs of its own (``SDQ._graph_eager_work``, what
    ``compile="cuda-graphs"`` turns on: the teacher's forward, KD, EBR, the DBP step, the step sizes), here through
    ``capture_eagerly`` (static inputs, static outputs overwritten by every replay, warm-up passes that run for real):
    a whole fit equals the eager fit bit for bit."""
    from sdq_lightning.modules.graphs import capture_eagerly

    torch.manual_seed(0)
    teacher = _lit().net.eval()
    kw = {"teacher": teacher, "kd": {"in_search": True}, "ebr": {"weight": 0.1}, "activation_bits": 4,
          "runtime": {"guard": False}}
    cb_e, lit_e = _fit(tmp_path / "eager", cuda=False, **copy.deepcopy(kw))
    cb_g, lit_g = _fit(tmp_path / "graphed", cuda=False, graph_work=capture_eagerly, **copy.deepcopy(kw))
    teacher_g, kd_g, ebr_g = cb_g.losses.graphs
    graphs = {"teacher": teacher_g, "kd": kd_g, "ebr": ebr_g, "dbp": cb_g.search.graph,
              "step sizes": cb_g._step_graph.graph}
    replays = {name: (g.captures, g.replays, g.failed) for name, g in graphs.items()}
    # 6 batches per epoch: KD every step (kd_in_search), the DBP step in the search epoch, EBR in the frozen one, the
    # step sizes from their second step (the first makes the optimizer's state)
    assert replays == {"teacher": (1, 12, None), "kd": (1, 12, None), "ebr": (1, 6, None), "dbp": (1, 6, None),
                       "step sizes": (1, 11, None)}, replays
    assert cb_g.plan.layers == cb_e.plan.layers
    state_e, state_g = lit_e.state_dict(), lit_g.state_dict()
    assert state_e.keys() == state_g.keys()
    for k in state_e:
        assert torch.equal(state_e[k], state_g[k]), k
    assert torch.equal(cb_g.search.optimizer.multiplier, cb_e.search.optimizer.multiplier)


def test_graphed_optimizer_step_equals_the_optimizer_and_recaptures_at_a_new_lr():
    from sdq_lightning.modules.graphs import GraphedOptimizerStep, capture_eagerly
    from sdq_lightning.quantizers.optim import LogStepAdam

    torch.manual_seed(0)
    params = [[nn.Parameter(torch.rand(3) + 0.5), nn.Parameter(torch.rand(()) + 0.5)] for _ in range(2)]
    params[1] = [nn.Parameter(p.detach().clone()) for p in params[0]]
    plain, graphed = LogStepAdam(params[0], lr=0.05), LogStepAdam(params[1], lr=0.05)
    stepper = GraphedOptimizerStep(graphed, capture_fn=capture_eagerly)
    for i in range(6):
        if i == 4:  # a new learning rate is a new graph (the rate is baked into the captured kernels)
            for opt in (plain, graphed):
                opt.param_groups[0]["lr"] = 0.01
        grads = [torch.randn(3), torch.randn(())]
        for ps, run in ((params[0], plain.step), (params[1], stepper.step)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            run()
        for a, b in zip(*params):
            assert torch.equal(a, b), i
    # the first step made the state (eager), then one capture per learning rate
    assert (stepper.graph.captures, stepper.graph.replays) == (2, 5)


def test_sdq_cuda_graphs_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="compile='cuda-graphs' needs a CUDA device, but this run is on cpu"):
        _fit(tmp_path, cuda=False, runtime={"compile": "cuda-graphs"})


def test_sdq_compile_auto_is_eager_on_cpu(tmp_path):
    cb, lit = _fit(tmp_path, cuda=False, runtime={"compile": "auto"})
    from sdq_lightning.modules.batched import BatchedWeights

    # no graphs: the network's forward is the batched weight pass the callback installs by default, nothing else
    assert cb.compile is None and cb._graphs is None and isinstance(vars(lit.net).get("forward"), BatchedWeights)
    assert cb.plan.average_bits <= 4.0


# ----------------------------------------------------------------------------------------------------- GPU
def _cuda_nets(frozen: bool) -> list[nn.Module]:
    """Two identical searched ResNet20s on the GPU (``frozen``: every layer with a 2-bit candidate frozen there)."""
    nets = []
    for _ in range(2):
        net = _searched_net().cuda()
        if frozen:
            freeze_where_candidate(net, 2)
        nets.append(net)
    return nets


def _cuda_batches(batch: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return [(torch.randn(batch, 3, 32, 32, device="cuda", generator=g),
             torch.randint(0, 10, (batch,), device="cuda", generator=g)) for _ in range(n)]


def _train(net: nn.Module, data, frozen: bool, strict_from: int | None = None) -> list[float]:
    """SGD on the weights, LogStepAdam on the steps and (searching) SGD on the DBPs over ``data``; from step
    ``strict_from`` on, under ``torch.cuda.set_sync_debug_mode("error")``."""
    from sdq_lightning.quantizers.optim import LogStepAdam

    steps = [m.steps for m in net.modules() if isinstance(m, sq.SDQWeightQuantizer)]
    sgd = torch.optim.SGD([p for n, p in net.named_parameters() if not n.endswith(("dbp", "steps", "step"))],
                          lr=0.02, momentum=0.9)
    dbp = torch.optim.SGD([m.dbp for m in net.modules() if isinstance(m, sq.SDQWeightQuantizer)], lr=0.05)
    step_opt = LogStepAdam(steps)
    losses = []
    try:
        for i, (x, y) in enumerate(data):
            if strict_from is not None and i == strict_from:
                torch.cuda.set_sync_debug_mode("error")
            for q in net.modules():
                if isinstance(q, sq.SDQWeightQuantizer):
                    q.set_draw_step(i)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            for opt in (sgd, step_opt) if frozen else (sgd, step_opt, dbp):
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [float(v) for v in losses]


@pytest.mark.gpu
@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
@pytest.mark.parametrize("frozen", [False, True], ids=["search", "frozen"])
def test_cuda_graph_steps_match_eager_and_never_synchronise(frozen, batched):
    from sdq_lightning.modules.batched import batch_weights

    nets, data = _cuda_nets(frozen), _cuda_batches(128, 6)
    if batched:  # the graph captures the batched weight pass; the eager reference runs each layer's quantizer
        batch_weights(nets[1])
    graphs = GraphedNetwork(nets[1])
    eager = _train(nets[0], data, frozen)
    graphed = _train(nets[1], data, frozen, strict_from=1)  # step 0 captures (that synchronises); then replays only
    assert graphs.captures == 1 and graphs.replays == 6
    # the same kernels replayed: equal up to cuDNN's non-deterministic weight-gradient sums, compounded over 5 steps
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-2, atol=2e-2)
    bits = [[q.last_bits for q in n.modules() if isinstance(q, sq.SDQWeightQuantizer)] for n in nets]
    assert bits[0] == bits[1]


@pytest.mark.gpu
def test_sdq_callback_with_cuda_graphs_searches_freezes_and_distils(tmp_path):
    teacher = _lit().net
    cb_e, _ = _fit(tmp_path / "eager", cuda=True, teacher=copy.deepcopy(teacher), activation_bits=None)
    cb_g, _ = _fit(tmp_path / "graphs", cuda=True, teacher=copy.deepcopy(teacher), activation_bits=None,
                   runtime={"compile": "cuda-graphs"})
    assert cb_g.plan.average_bits <= 4.0
    assert [h["phase"] for h in cb_g.history] == ["search", "train"]
    # KD reached the graphed network's output in phase 2 (the term is logged only when the teacher's gradient was added)
    assert "kd" in cb_g._terms and float(cb_g._terms["kd"]) > 0
    # the teacher's forward, KD and EBR (phase 2), the DBP step (phase 1) and the step sizes replayed as graphs
    teacher_graph, kd_graph, ebr_graph = cb_g.losses.graphs
    for g in (teacher_graph, kd_graph, ebr_graph, cb_g.search.graph, cb_g._step_graph.graph):
        assert g.failed is None and g.captures >= 1 and g.replays > g.captures
    assert "ebr" in cb_g._terms and float(cb_g._terms["ebr"]) > 0
    assert cb_g.history[0]["expected_avg_bits"] == pytest.approx(cb_e.history[0]["expected_avg_bits"], abs=0.25)


def test_kernels_auto_compiles_the_lsq_kernels_on_the_cpu(tmp_path):
    from sdq_lightning.modules.fused import get_kernels, set_kernels

    before = get_kernels()
    try:
        set_kernels("eager")
        cb = sq.SDQ(budget={"metric": "avg_bits", "target": 4.0}, weight_bits=(2, 4, 8), runtime={"kernels": "auto"})
        trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        cb.setup(trainer, _lit(), "validate")
        assert get_kernels() == "compile"
    finally:
        set_kernels(before)


@pytest.mark.gpu
def test_graphed_teacher_and_ebr_match_eager_and_never_synchronise():
    from torch.nn import functional as F

    from sdq_lightning.core.losses import AddedLosses

    teacher = timm.create_model("resnet20", num_classes=10).cuda().eval()
    nets, data = _cuda_nets(frozen=True), _cuda_batches(64, 5)
    results = []
    for net, graphed in zip(nets, (False, True)):
        layers = [m for m in sq.quant_layers(net).values() if m.weight_quant is not None]
        losses = AddedLosses(ebr_weight=0.1, teacher=teacher, kd_weight=1.0)
        losses.teacher = teacher
        losses.attach(net, "fc", torch.device("cuda"))
        losses.use_graphs(graphed)
        opt = torch.optim.SGD(net.parameters(), lr=0.02)
        seen = []
        try:
            for i, (x, y) in enumerate(data):
                if graphed and i == 1:  # step 0 captures (that synchronises); then replays only
                    torch.cuda.set_sync_debug_mode("error")
                losses.before_batch(x, torch.device("cuda"), kd=True)
                loss = F.cross_entropy(net(x), y)
                terms = losses.before_backward(loss, 1.0, layers)
                loss.backward()
                losses.after_backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                seen.append(torch.stack([loss.detach(), terms["ebr"], terms["kd"]]))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results.append(torch.stack(seen).cpu())
        if graphed:
            assert [(c.captures, c.replays, c.failed) for c in losses.graphs] == [(1, 5, None)] * 3
    torch.testing.assert_close(results[1], results[0], rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
def test_graphed_dbp_step_matches_eager_and_never_synchronises():
    from sdq_lightning.core.search import BitSearch

    results, steps = [], 60  # the last quarter hardens and settles
    for graphed in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("resnet20", num_classes=10)
        prof = sq.profile_model(model, torch.randn(1, 3, 32, 32))
        sq.quantize_model(model, sq.QuantSpec(weight_bits=tuple(range(1, 9)), activation_bits=None, estimator="ste"))
        model.cuda()
        search = BitSearch(sq.CostModel(model, prof), sq.Budget("avg_bits", 2.0))
        if graphed:
            search.use_graphs(True)
        search.start(steps_per_epoch=steps, search_epochs=1)
        g = torch.Generator(device="cuda").manual_seed(0)
        slope = -torch.rand(len(search.quantizers), device="cuda", generator=g)
        seen = []
        try:
            for t in range(steps):
                if graphed and t == 1:  # step 0 captures (that synchronises); then replays only
                    torch.cuda.set_sync_debug_mode("error")
                search.begin_step(t, 1.0)
                for i, q in enumerate(search.quantizers):  # a task gradient on the live DBP, no host read
                    live = (torch.arange(q.dbp.shape[0], device="cuda") == q.level).float()
                    q.dbp.grad = live * (slope[i] + torch.randn((), device="cuda", generator=g))
                seen.append(search.step()["expected_cost"])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results.append((torch.stack(seen).cpu(), torch.stack([q.dbp.detach() for q in search.quantizers]).cpu(),
                        [int(q.level) for q in search.quantizers]))
        if graphed:
            assert (search.graph.captures, search.graph.replays, search.graph.failed) == (1, steps, None)
    (cost_e, dbp_e, lv_e), (cost_g, dbp_g, lv_g) = results
    torch.testing.assert_close(cost_g, cost_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dbp_g, dbp_e, rtol=1e-5, atol=1e-6)
    assert lv_g == lv_e
