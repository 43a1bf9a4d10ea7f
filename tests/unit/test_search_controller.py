"""The search machinery without Lightning: the budget controller on a toy cost, the task force, the optimizers,
device-side draws and the quantizer's own state (candidate sets)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sdq_lightning as sq
from sdq_lightning.core.search import BitSearch
from sdq_lightning.quantizers.optim import LogStepAdam


def _wide_net(widths=(64, 64, 64, 64, 64)) -> nn.Sequential:
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def _searched(widths=(16, 64, 128, 32, 8), cands=tuple(range(1, 9)), metric="avg_bits", target=2.0, **kw):
    torch.manual_seed(0)
    model = _wide_net(widths)
    prof = sq.profile_model(model, torch.randn(1, widths[0]))
    sq.quantize_model(model, sq.QuantSpec(weight_bits=cands, activation_bits=None, first_last="search",
                                          estimator="ste"))
    cm = sq.CostModel(model, prof)
    search = BitSearch(cm, sq.Budget(metric, target), **kw)
    return model, cm, search


def _run(model, cm, search, steps, task_fn=None):
    search.start(steps_per_epoch=steps, search_epochs=1)
    trajectory = []
    for t in range(steps):
        search.begin_step(t, 1.0)
        if task_fn is not None:
            task_fn(model, t)
        terms = search.step()
        trajectory.append(float(terms["expected_cost"]))
    return trajectory


@pytest.mark.parametrize("steps", [40, 400])
def test_dual_controller_reaches_the_target_without_a_task(steps):
    """Budget only (no gradient in .grad): the expected cost follows the schedule and reaches the target by the end
    of the reaching part (75 % of the steps), whatever the search length; the levels moved on the device."""
    model, cm, search = _searched(signal="budget_only")
    traj = _run(model, cm, search, steps)
    reach = int(0.75 * steps)
    final = float(cm.expected("avg_bits").detach())
    assert traj[0] == pytest.approx(8.0)
    assert abs(final - 2.0) / 2.0 <= 0.05, (final, traj[reach - 1], traj[-1])
    assert abs(traj[reach] - 2.0) / 2.0 <= 0.10, traj[reach]
    assert all(q.current_level < 7 for q in search.quantizers)


def test_penalty_control_is_kept_and_differs():
    model, cm, search = _searched(control="penalty", signal="budget_only", dbp_lr=0.05)
    traj = _run(model, cm, search, 60)
    assert traj[-1] < traj[0]  # the penalty pushes down
    model2, cm2, search2 = _searched(signal="budget_only")
    traj2 = _run(model2, cm2, search2, 60)
    # the dual controller follows its schedule to the target in 60 steps; the penalty alone has no schedule and is
    # still far above it (5.0 bits here): another controller, not the default under another name
    assert traj2[-1] == pytest.approx(2.0, rel=0.05)
    assert traj[-1] > 4.0


def test_task_force_decides_which_layers_keep_bits():
    """A task gradient that favours bits in layer '1' (dL/dbeta < 0 there, 0 elsewhere) keeps that layer higher
    than the budget-only control does, at the same final cost."""
    def favour(model, t):
        q = model[1].weight_quant
        q.dbp.grad = torch.zeros_like(q.dbp)
        q.dbp.grad[q.level] = -1.0
        for i in (0, 2, 3):
            other = model[i].weight_quant
            other.dbp.grad = torch.zeros_like(other.dbp)
            other.dbp.grad[other.level] = 0.05 * (1 if t % 2 else -1)

    m1, cm1, s1 = _searched()
    _run(m1, cm1, s1, 300, favour)
    m2, cm2, s2 = _searched(signal="budget_only")
    _run(m2, cm2, s2, 300, favour)
    with_task, without = cm1.current_bits(), cm2.current_bits()
    assert with_task["1"] > without["1"], (with_task, without)
    assert abs(float(cm1.expected("avg_bits")) - 2.0) <= 0.1


def test_freeze_projection_is_a_small_correction_and_meets_the_budget():
    model, cm, search = _searched(signal="budget_only")
    _run(model, cm, search, 200)
    decided, bits, expected = search.freeze_bits()
    assert cm.of_bits(bits, "avg_bits") <= 2.0 + 1e-9
    assert abs(expected - 2.0) <= 0.1


@pytest.mark.parametrize("signal", ["projection_only", "size_greedy"])
def test_controls_that_do_not_search_keep_the_dbps_and_project_from_the_top(signal):
    model, cm, search = _searched(signal=signal)
    before = [q.dbp.detach().clone() for q in search.quantizers]
    _run(model, cm, search, 20)
    assert all(torch.equal(b, q.dbp.detach()) for b, q in zip(before, search.quantizers))
    decided, bits, _ = search.freeze_bits()
    assert all(decided[n] == 8 for n in search.names)
    assert cm.of_bits(bits, "avg_bits") <= 2.0 + 1e-9


@pytest.mark.parametrize("signal", ["size_greedy", "random"])
def test_seeded_controls_depend_on_their_seed(signal):
    plans = []
    for seed in (0, 1, 2):
        model, cm, search = _searched(widths=(64, 64, 64, 64, 64, 64), signal=signal, seed=seed)
        _run(model, cm, search, 2)
        plans.append(search.freeze_bits()[1])
    assert len({tuple(sorted(p.items())) for p in plans}) > 1


def test_random_control_is_size_neutral_and_not_size_greedy():
    """The random control's plans lie within 1 % under the target, differ from seed to seed, and some put a large
    layer above a small one, which the size-greedy control never does (it drops the largest layers first)."""
    plans = {}
    for signal in ("random", "size_greedy"):
        plans[signal] = []
        for seed in range(10):
            model, cm, search = _searched(widths=(32, 32, 32, 96, 96, 96), signal=signal, seed=seed)
            before = [q.dbp.detach().clone() for q in search.quantizers]
            _run(model, cm, search, 2)
            assert all(torch.equal(b, q.dbp.detach()) for b, q in zip(before, search.quantizers))
            decided, bits, _ = search.freeze_bits()
            assert cm.of_bits(bits, "avg_bits") <= 2.0 + 1e-9
            if signal == "random":
                assert decided == bits and cm.of_bits(bits, "avg_bits") >= 0.99 * 2.0
            plans[signal].append([bits[n] for n in search.names])  # layers of 1024, 1024, 3072, 9216, 9216 weights
    assert len({tuple(p) for p in plans["random"]}) >= 8

    def large_above_small(p):
        return max(p[3:]) > min(p[:2])

    assert not any(large_above_small(p) for p in plans["size_greedy"])
    assert any(large_above_small(p) for p in plans["random"])


def test_controller_state_round_trips():
    model, cm, search = _searched()
    _run(model, cm, search, 30)
    state = search.state_dict()
    # two-sided while settling: its sign at the end follows a float tie (whether E = 2.0000002 or 2.0 let a level
    # drop fire at the last descent step; both end at 2.0 expected bits), so only its bounds are checked
    assert abs(float(state["optimizer"]["controller"]["multiplier"])) <= search.optimizer.max_multiplier
    opt2 = BitSearch(cm, sq.Budget("avg_bits", 2.0))
    opt2.start(30, 1, state)
    assert torch.equal(opt2.optimizer.multiplier, search.optimizer.multiplier)
    assert opt2.steps_done == 30


def test_log_step_adam_keeps_steps_positive_under_a_constant_push():
    """The first implementation's absolute Adam drove a step negative under a constant gradient; on log s the
    step shrinks geometrically and never reaches 0."""
    s = nn.Parameter(torch.tensor([0.01, 1.0]))
    opt = LogStepAdam([s], lr=0.05)
    for _ in range(500):
        s.grad = torch.tensor([1.0, 1.0])
        opt.step()
    assert (s > 0).all() and s[0] < 0.01 and s[1] < 1.0


def test_log_step_adam_descends_a_quadratic():
    s = nn.Parameter(torch.tensor([2.0]))
    opt = LogStepAdam([s], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        ((s - 0.3) ** 2).sum().backward()
        opt.step()
    assert float(s) == pytest.approx(0.3, rel=0.05)


# ----------------------------------------------------------------------------- the quantizer's own state
def test_searched_state_loads_into_a_frozen_subset_quantizer():
    w = torch.randn(16, 8)
    src = sq.SDQWeightQuantizer((2, 4, 8), weight=w)
    with torch.no_grad():
        src.steps.mul_(torch.tensor([1.0, 1.5, 2.0]))
    src.freeze(4)
    dst = sq.SDQWeightQuantizer((4,), weight=w)
    dst.load_state_dict(src.state_dict())
    assert dst.frozen and dst.bits == 4
    assert torch.equal(dst(w), src(w))


def test_state_dict_names_the_candidates_and_refuses_a_mismatch():
    w = torch.randn(16, 8)
    src = sq.SDQWeightQuantizer((2, 4, 8), weight=w)
    state = src.state_dict()
    assert sq.SDQWeightQuantizer.decode_extra_state(state["_extra_state"])["candidates"] == (2, 4, 8)
    dst = sq.SDQWeightQuantizer((1, 2), weight=w)
    with pytest.raises(RuntimeError, match="lack"):
        dst.load_state_dict(state)


def test_legacy_state_without_candidates_is_read_as_1_to_8():
    w = torch.randn(16, 8)
    src = sq.SDQWeightQuantizer(tuple(range(1, 9)), weight=w)
    src.freeze(3)
    state = {k: v for k, v in src.state_dict().items() if k != "_extra_state"}
    dst = sq.SDQWeightQuantizer((3,), weight=w)
    dst.load_state_dict(state, strict=False)
    assert torch.equal(dst(w), src(w))


def test_level_and_draws_live_on_the_device_and_do_not_recompile():
    """A level change is a buffer write, not a Python attribute: the same traced graph serves every level."""
    w = torch.randn(32)
    q = sq.SDQWeightQuantizer(tuple(range(1, 9)), "progressive", "gumbel", weight=w).train()
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm.forward

    f = torch.compile(q, backend=backend, fullgraph=True)
    outs = []
    for lvl in (7, 5, 2, 0):
        q.set_level(lvl, reinit_dbp=0.5)
        outs.append(f(w).detach())
    assert counts["n"] == 1
    q2 = sq.SDQWeightQuantizer(tuple(range(1, 9)), "progressive", "gumbel", weight=w).train()
    for lvl, out in zip((7, 5, 2, 0), outs):
        q2.set_level(lvl, reinit_dbp=0.5)
        q2.set_draw_step(int(q.draw_step) - 4 + (7, 5, 2, 0).index(lvl))
        assert torch.equal(q2(w).detach(), out)


def test_layers_rise_a_level_when_the_cost_is_below_the_schedule():
    """Started low (every layer at 2 bits) under a 4-bit budget, the schedule climbs and the controller raises
    levels (a DBP pushed past 1 moves its layer up, continuously) until the expected cost meets it."""
    model, cm, search = _searched(target=4.0, signal="budget_only")
    for q in search.quantizers:
        q.set_level(1, reinit_dbp=1.0)
    traj = _run(model, cm, search, 200)
    assert traj[0] == pytest.approx(2.0)
    assert abs(float(cm.expected("avg_bits").detach()) - 4.0) <= 0.2
    assert all(q.current_level >= 2 for q in search.quantizers)


def _layers(specs):
    """Quantizers from ``(candidates, reading)`` pairs, each DBP at 0.5 and each level at its own candidate."""
    from sdq_lightning.quantizers import SDQWeightQuantizer

    torch.manual_seed(0)
    qs = []
    for i, (cands, reading) in enumerate(specs):
        q = SDQWeightQuantizer(cands, reading=reading, weight=torch.randn(8, 4), layer_id=i, init_dbp=0.5)
        if reading == "progressive":
            q.set_level(len(cands) - 1 - i % 2, reinit_dbp=0.5)
        qs.append(q)
    return qs


MIXED = [((1, 2, 3, 4, 5, 6, 7, 8), "progressive"), ((2, 4, 8), "progressive"), ((2, 3, 4, 8), "cascade"),
         ((1, 2, 4, 8), "progressive"), ((4, 8), "progressive")]


def _live_entries(q):
    idx = torch.arange(len(q.candidates))
    return (idx == q.level) & (q.level > 0) if q.reading == "progressive" else idx > 0


@pytest.mark.parametrize("specs", [MIXED, MIXED[:1]], ids=["mixed", "one_layer"])
def test_dual_step_is_the_closed_form_move_onto_the_schedule(specs):
    """One ``dual`` step against the formula of the module docstring, computed here per layer: the task force
    ``(g / u) / rms`` and the budget force ``(b / u) / mean|b / u|`` on the live entries only, the multiplier that puts
    the linearised cost on the schedule's next point. Layers of different candidate counts and readings (and a single
    layer, a stack of one) share the step; entries that are not live do not move."""
    from sdq_lightning.quantizers.optim import DBPOptimizer

    qs = _layers(specs)
    units = [0.5, 1.0, 1.5, 0.8, 1.2][:len(qs)]
    opt = DBPOptimizer(qs, units, lr=0.01, drop_threshold=None)
    gen = torch.Generator().manual_seed(1)
    before = [q.dbp.detach().clone() for q in qs]
    grads = [torch.randn(len(q.candidates), generator=gen) for q in qs]
    budget = [torch.rand(len(q.candidates), generator=gen) + 0.1 for q in qs]
    for q, g in zip(qs, grads):
        q.dbp.grad = g.clone()
    opt.prepare(budget, torch.tensor(3.0), 3.0, 2.99)
    opt.step()
    live = [_live_entries(q) for q in qs]
    n_live = sum(int(m.sum()) for m in live)
    task = [g * m / u for g, m, u in zip(grads, live, units)]
    rms = (sum(float((t * t).sum()) for t in task) / n_live) ** 0.5
    force = [b * m / u for b, m, u in zip(budget, live, units)]
    norm = sum(float(f.abs().sum()) for f in force) / n_live
    d_task = sum(float((b * t).sum()) for b, t in zip(budget, task)) / rms
    d_lam = sum(float((b * f).sum()) for b, f in zip(budget, force)) / norm
    lam = (3.0 - 2.99 - 0.01 * d_task) / (0.01 * d_lam)
    assert float(opt.multiplier) == pytest.approx(lam, rel=1e-4)
    moved = 0.0
    for q, p0, t, f, b, m in zip(qs, before, task, force, budget, live):
        want = p0 - 0.01 * (t / rms + lam * f / norm)
        torch.testing.assert_close(q.dbp.detach(), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(q.dbp.detach()[~m], p0[~m])  # only the live entries move
        moved += float((b * (q.dbp.detach() - p0)).sum())
    assert 3.0 + moved == pytest.approx(2.99, abs=1e-5)  # the linearised cost lands on the schedule


def test_penalty_step_is_sgd_on_the_live_dbps():
    """``budget_control="penalty"``: ``beta <- clip(beta - lr (dL/dbeta + dR/dbeta), 0, 1)`` on the live entries, bit
    for bit, over layers of different candidate counts and readings; no level rises, the multiplier stays 0."""
    from sdq_lightning.quantizers.optim import DBPOptimizer

    qs = _layers(MIXED)
    opt = DBPOptimizer(qs, [1.0] * len(qs), lr=0.3, control="penalty", drop_threshold=0.05)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        before = [q.dbp.detach().clone() for q in qs]
        levels = [int(q.level) for q in qs]
        grads = [torch.randn(len(q.candidates), generator=gen) for q in qs]
        budget = [torch.randn(len(q.candidates), generator=gen) for q in qs]
        for q, g in zip(qs, grads):
            q.dbp.grad = g.clone()
        opt.prepare(budget, torch.tensor(1.0), 2.0, 2.0)  # under the schedule: a rise would be allowed under dual
        opt.step()
        for q, p0, g, b, lvl in zip(qs, before, grads, budget, levels):
            want = (p0 - 0.3 * (g + b) * _live_entries(q)).clamp(0.0, 1.0)
            assert int(q.level) == lvl and torch.equal(q.dbp.detach(), want)
    assert float(opt.multiplier) == 0.0


def test_levels_change_only_for_progressive_layers_within_their_candidates():
    """Level drops over 300 steps on layers of different candidate counts: every progressive layer's level stays
    within its own candidates and moves by at most one per step; a cascade layer keeps its level and its first DBP;
    the DBPs keep their shapes (the padding of the stacked step never leaks)."""
    from sdq_lightning.quantizers.optim import DBPOptimizer

    qs = _layers(MIXED)
    opt = DBPOptimizer(qs, [1.0] * len(qs), lr=0.05, drop_threshold=0.05)
    gen = torch.Generator().manual_seed(3)
    seen = {i: {int(q.level)} for i, q in enumerate(qs)}
    first_cascade = float(qs[2].dbp.detach()[0])
    for t in range(300):
        last = [int(q.level) for q in qs]
        for q in qs:
            q.dbp.grad = torch.randn(len(q.candidates), generator=gen) * 0.1
        budget = [torch.rand(len(q.candidates), generator=gen) for q in qs]
        opt.prepare(budget, torch.tensor(6.0 - t / 60.0), 4.0, 3.99)  # crosses the schedule: drops, then rises
        opt.step()
        for i, (q, lv) in enumerate(zip(qs, last)):
            assert q.dbp.shape == (len(q.candidates),) and 0 <= int(q.level) < len(q.candidates)
            assert abs(int(q.level) - lv) <= 1
            seen[i].add(int(q.level))
    assert int(qs[2].level) == 3 and float(qs[2].dbp.detach()[0]) == first_cascade and len(seen[2]) == 1
    assert all(len(seen[i]) >= 2 for i in (0, 1, 3, 4))  # every progressive layer dropped


def test_hardening_does_not_undershoot_the_budget():
    """A task force that keeps asking for fewer bits, plus the hardening force (DBPs below 0.5 pushed to 0): the
    search must still end AT the budget, not under it. The first controller kept the multiplier >= 0 while
    hardening, and on a CIFAR-10 seed the expected bits fell from 2.0 to 1.69 before the freeze (RESULTS section 14).
    With sequential settling a large layer's rounding may leave a one-step dip (the layers still moving are at their
    bound and rise at the next step): at most 2 % of the holding steps, and the last 5 % none."""
    model, cm, search = _searched()

    def fewer_bits(model, t):
        for q in search.quantizers:
            q.dbp.grad = torch.full_like(q.dbp, 1.0)

    traj = _run(model, cm, search, 400, task_fn=fewer_bits)
    reach = int(0.75 * 400)
    assert abs(traj[reach] - 2.0) <= 0.1, traj[reach]
    under = [t for t in traj[reach:] if t < 2.0 * (1 - 0.02)]
    assert len(under) <= 0.02 * len(traj[reach:]), (under, traj[-1])
    assert min(traj[-20:]) >= 2.0 * (1 - 0.02), traj[-20:]


def _noisy_task(search, seed=0, noise=3.0):
    """A synthetic task signal on the live DBPs: a fixed per-layer slope (more bits lower the loss) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    slope = -torch.rand(len(search.quantizers), generator=gen)

    def task(model, t):
        for i, q in enumerate(search.quantizers):
            grad = torch.zeros_like(q.dbp)
            grad[int(q.level)] = slope[i] + noise * float(slope.abs().mean()) * torch.randn((), generator=gen)
            q.dbp.grad = grad
    return task


WIDTHS9 = (32, 96, 64, 160, 48, 128, 32, 96, 64, 16)


@pytest.mark.parametrize("seed", [0, 1])
def test_settling_leaves_the_freeze_one_layer_to_decide(seed):
    """Sequential settling (the default): at the end every searched layer but at most one has its live DBP at 0 or 1
    (or sits at its lowest candidate), a settled DBP never moves again, the expected cost is at the target, and the
    projection changes at most one layer by one level."""
    model, cm, search = _searched(widths=WIDTHS9)
    task = _noisy_task(search, seed)
    settled_at = {}

    def watch(model, t):
        task(model, t)
        for n, q in zip(search.names, search.quantizers):
            st = search.optimizer.state[q.dbp]
            if float(st["settled"]) > 0.5:
                settled_at.setdefault(n, (int(q.level), q.dbp.detach().clone()))
                assert int(q.level) == settled_at[n][0] and torch.equal(q.dbp.detach(), settled_at[n][1]), (n, t)

    _run(model, cm, search, 400, task_fn=watch)
    assert len(settled_at) >= 3  # settling happened (the other layers reached their lowest candidate)
    fractional = [n for n, q in zip(search.names, search.quantizers)
                  if int(q.level) > 0 and 0.0 < float(q.dbp.detach()[int(q.level)]) < 1.0]
    assert len(fractional) <= 1, fractional
    decided, bits, expected = search.freeze_bits()
    assert abs(expected - 2.0) <= 0.02 * 2.0
    moved = {n: abs(search.quantizers[i].candidates.index(bits[n]) - search.quantizers[i].candidates.index(decided[n]))
             for i, n in enumerate(search.names)}
    assert sum(v > 0 for v in moved.values()) <= 1 and max(moved.values()) <= 1, moved
    assert cm.of_bits(bits, "avg_bits") <= 2.0 + 1e-9


def test_without_settling_the_dbps_stay_live():
    """The control of the test above: ``settle=False`` keeps every live DBP moving (no layer is ever marked settled)."""
    model, cm, search = _searched(widths=WIDTHS9, settle=False)
    _run(model, cm, search, 400, task_fn=_noisy_task(search, 0))
    assert all(float(search.optimizer.state[q.dbp]["settled"]) == 0.0 for q in search.quantizers)


def test_settled_flags_resume_and_legacy_states_load():
    model, cm, search = _searched(widths=WIDTHS9)
    _run(model, cm, search, 400, task_fn=_noisy_task(search, 0))
    state = search.state_dict()
    flags = [float(search.optimizer.state[q.dbp]["settled"]) for q in search.quantizers]
    assert sum(flags) >= 3
    again = BitSearch(cm, sq.Budget("avg_bits", 2.0))
    again.start(400, 1, state)
    assert [float(again.optimizer.state[q.dbp]["settled"]) for q in search.quantizers] == flags
    for per_param in state["optimizer"]["state"].values():  # a checkpoint from before settling existed
        per_param.pop("settled")
    legacy = BitSearch(cm, sq.Budget("avg_bits", 2.0))
    legacy.start(400, 1, state)
    assert all(float(legacy.optimizer.state[q.dbp]["settled"]) == 0.0 for q in search.quantizers)


@pytest.mark.parametrize("settle", [True, False], ids=["settle", "no_settle"])
def test_graphed_dbp_step_equals_the_eager_step(settle):
    """Under CUDA graphs the DBP step replays as one graph (``BitSearch.use_graphs``): the schedule enters as device
    scalars, the task gradients as a stacked input. With the CPU stand-in capture (``capture_eagerly``: static
    inputs, static outputs) the replayed search equals the eager one bit for bit over 300 steps with level changes,
    hardening and settling, and the capture's warm-up steps leave no trace."""
    from sdq_lightning.modules.graphs import capture_eagerly

    runs = []
    for graphed in (False, True):
        model, cm, search = _searched(widths=WIDTHS9, settle=settle)
        if graphed:
            search.use_graphs(True, capture_fn=capture_eagerly)
        trajectory = _run(model, cm, search, 300, task_fn=_noisy_task(search, 0))
        opt = search.optimizer
        runs.append((trajectory, torch.stack([q.dbp.detach() for q in search.quantizers]),
                     [int(q.level) for q in search.quantizers], float(opt.multiplier), int(opt.step_count),
                     [float(opt.state[q.dbp]["settled"]) for q in search.quantizers], search.flush_trace()))
    (traj_e, dbp_e, lv_e, lam_e, n_e, set_e, trace_e), (traj_g, dbp_g, lv_g, lam_g, n_g, set_g, trace_g) = runs
    assert search.graph.captures == 1 and search.graph.replays == 300 and search.graph.failed is None
    assert n_g == n_e == 300  # the warm-up passes of the capture stepped for real and were undone
    assert traj_g == traj_e and torch.equal(dbp_g, dbp_e) and lv_g == lv_e and lam_g == lam_e and set_g == set_e
    assert trace_g == trace_e
    assert len(set(lv_e)) > 1 and any(v > 0 for v in set_e) == settle  # levels moved; settling only when asked
