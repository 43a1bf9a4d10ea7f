"""task_estimate="paired": the search measures L(b_hi) - L(b_lo) of one layer per step by a second forward of the
same batch with that layer's draw flipped. What must hold: the measurement is the loss difference computed
directly, the probe leaves the model as it found it, and a run with probes trains the same network as one without
(apart from the DBP moves the measurements cause)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers.data import Loaders
from helpers.user_module import UserNet
from torch import nn

import sdq_lightning as sq
from sdq_lightning.core.search import BitSearch


def _searched_net(estimate: str = "paired", **search_kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    prof = sq.profile_model(model, torch.randn(1, 16))
    sq.quantize_model(model, sq.QuantSpec(weight_bits=(1, 2, 3, 4), activation_bits=None, first_last="search"))
    model.train()
    cm = sq.CostModel(model, prof)
    search = BitSearch(cm, sq.Budget("avg_bits", 2.0), task_estimate=estimate, **search_kwargs)
    search.start(steps_per_epoch=10, search_epochs=1)
    return model, search


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def test_a_probe_records_the_directly_computed_loss_difference():
    model, search = _searched_net()
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    q0 = search.quantizers[0]
    with torch.no_grad():
        q0.dbp[q0.level] = 0.5  # a fractional live DBP: the step's draw may take either width
    search.begin_step(3, 1.0)
    main = _loss(model, x, y)
    dbps = [q.dbp.detach().clone() for q in search.quantizers]
    search.probe(main, lambda: _loss(model, x, y))
    # the first probe takes the first layer (every level unmeasured); its sensitivity is L(lo) - L(hi)
    level = int(q0.level)
    sens = search.optimizer.state[q0.dbp]["sens"]
    direct = {}
    with torch.no_grad():
        for value in (1.0, 0.0):
            q0.dbp[level] = value
            search.begin_step(3, 1.0)
            direct[value] = float(_loss(model, x, y))
        q0.dbp.copy_(dbps[0])
    assert direct[0.0] != direct[1.0]
    assert float(sens[level]) == pytest.approx(direct[0.0] - direct[1.0], rel=1e-5, abs=1e-7)
    assert int(search.optimizer.state[q0.dbp]["probes"][level]) == 1
    # the DBPs are put back; no other layer was measured
    for q, before in zip(search.quantizers, dbps):
        assert torch.equal(q.dbp.detach(), before)
    assert all(float(search.optimizer.state[q.dbp]["probes"].sum()) == 0 for q in search.quantizers[1:])


def test_an_isolated_probe_measures_with_every_other_layer_at_its_top_width():
    model, search = _searched_net("paired_isolated")
    model.eval()
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    qs = search.quantizers
    for q in qs:
        q.set_level(1)  # every layer at 2 bits (its live DBP 1): the search's context is not the oracle's
    q0 = qs[0]
    dbps = [q.dbp.detach().clone() for q in qs]
    search.begin_step(3, 1.0)
    search.probe(None, lambda: _loss(model, x, y))
    sens = float(search.optimizer.state[q0.dbp]["sens"][1])
    assert [int(q.level) for q in qs] == [1] * len(qs)  # levels and DBPs put back
    assert all(torch.equal(q.dbp.detach(), d) for q, d in zip(qs, dbps))

    def drop_2_to_1(others_level: int) -> float:
        out = {}
        with torch.no_grad():
            for q in qs[1:]:
                q.set_level(others_level, reinit_dbp=1.0)
            for value in (1.0, 0.0):
                q0.dbp[1] = value
                out[value] = float(_loss(model, x, y))
            for q, d in zip(qs, dbps):
                q.set_level(1, reinit_dbp=None)
                q.dbp.copy_(d)
        return out[0.0] - out[1.0]

    isolated, in_context = drop_2_to_1(3), drop_2_to_1(1)
    assert abs(isolated - in_context) > 1e-6  # the two contexts differ on this net (by far more than the tolerance)
    assert sens == pytest.approx(isolated, rel=1e-5, abs=1e-7)


def test_probes_go_round_the_layers_and_drive_the_task_gradient():
    model, search = _searched_net()
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    n = len(search.quantizers)
    for t in range(n):
        search.begin_step(t, 1.0)
        search.probe(_loss(model, x, y), lambda: _loss(model, x, y))
        search.optimizer.step_count.add_(1)
    counts = [int(search.optimizer.state[q.dbp]["probes"].sum()) for q in search.quantizers]
    assert counts == [1] * n  # each layer once before any twice
    grads = search.optimizer.measured_grads()
    for q, g in zip(search.quantizers, grads):
        sens = search.optimizer.state[q.dbp]["sens"]
        assert float(g[q.level]) == pytest.approx(-float(sens[q.level]))


def test_one_call_probes_distinct_layers_as_single_probes_would():
    """``probe(..., count=k)`` measures the k layers that k single-probe calls of the same step would (oldest first,
    ties to the lower index), each once, with the same recorded values, and records nothing more when fewer layers
    are left to measure than slots."""
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    model_a, one_call = _searched_net()
    model_b, singles = _searched_net()
    n = len(one_call.quantizers)
    assert n >= 2
    for model, search, calls in ((model_a, one_call, [n + 2]), (model_b, singles, [1] * n)):
        search.begin_step(5, 1.0)
        main = _loss(model, x, y)
        for count in calls:
            search.probe(main, lambda model=model: _loss(model, x, y), count)
    for qa, qb in zip(one_call.quantizers, singles.quantizers):
        sa, sb = one_call.optimizer.state[qa.dbp], singles.optimizer.state[qb.dbp]
        assert int(sa["probes"].sum()) == 1  # n + 2 slots, n layers: each once, no repeats
        assert torch.equal(sa["probes"], sb["probes"]) and torch.equal(sa["sens"], sb["sens"])


@pytest.mark.parametrize("lookahead", [0, 2], ids=["live", "lookahead"])
def test_a_distributed_step_averages_all_its_probes_in_one_all_reduce(monkeypatch, tmp_path, lookahead):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (calls.append(t.shape), real(t, *a, **k))[1])
    try:
        model, search = _searched_net(lookahead_levels=lookahead)
        x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
        search.begin_step(1, 1.0)
        search.probe(_loss(model, x, y), lambda: _loss(model, x, y), 3)
        assert search.lookahead_done == (3 if lookahead else 0)
    finally:
        dist.destroy_process_group()
    assert calls == [torch.Size([3])]
    assert sum(int(search.optimizer.state[q.dbp]["probes"].sum()) for q in search.quantizers) == 3


def test_lookahead_measures_the_lowest_levels_first_in_the_current_context():
    """``lookahead_levels=2``: before any live probe, every layer's 2->1 and 3->2 drops are measured (the probed layer
    at the two widths of that level, every other layer at its current decision), ``lookahead_repeats`` times each;
    levels and DBPs are put back; afterwards the live probes skip the levels measured ahead."""
    model, search = _searched_net(lookahead_levels=2, lookahead_repeats=2)
    model.eval()
    qs = search.quantizers
    n = len(qs)
    assert search.lookahead_plan()[:n + 1] == [(i, 1) for i in range(n)] + [(0, 2)]
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    levels = [int(q.level) for q in qs]
    dbps = [q.dbp.detach().clone() for q in qs]
    assert levels == [3] * n  # the search starts every layer at its top level (4 bits)
    # the first lookahead probe: layer 0's 2->1 drop with the others at their current decision (4 bits)
    direct = {}
    with torch.no_grad():
        qs[0].set_level(1, reinit_dbp=1.0)
        for value in (1.0, 0.0):
            qs[0].dbp[1] = value
            direct[value] = float(_loss(model, x, y))
        qs[0].set_level(3, reinit_dbp=None)
        qs[0].dbp.copy_(dbps[0])
    calls = 0
    while search.lookahead_pending:
        search.begin_step(calls, 1.0)
        search.probe(None, lambda: _loss(model, x, y), 3)
        calls += 1
    assert calls == -(-4 * n // 3)  # 2 levels x 2 repeats x n layers, 3 a call
    assert [int(q.level) for q in qs] == levels
    assert all(torch.equal(q.dbp.detach(), d) for q, d in zip(qs, dbps))
    for q in qs:
        assert search.optimizer.state[q.dbp]["probes"].tolist() == [0, 2, 2, 0]
    # the same batch twice: the mean of two equal measurements is the measurement
    assert float(search.optimizer.state[qs[0].dbp]["sens"][1]) == pytest.approx(direct[0.0] - direct[1.0], rel=1e-5,
                                                                                  abs=1e-7)
    assert direct[0.0] != direct[1.0]
    # live probes now: layers at level 3 are measured at their live level
    search.begin_step(calls, 1.0)
    search.probe(_loss(model, x, y), lambda: _loss(model, x, y), 1)
    assert int(search.optimizer.state[qs[0].dbp]["probes"][3]) == 1
    # a layer whose live level was measured ahead is not probed again
    for q in qs:
        q.set_level(2, reinit_dbp=None)
    search.begin_step(calls + 1, 1.0)
    search.probe(_loss(model, x, y), lambda: _loss(model, x, y), n)
    for q in qs:
        assert int(search.optimizer.state[q.dbp]["probes"][2]) == 2
    state = search.state_dict()
    assert state["lookahead_done"] == 4 * n
    fresh = _searched_net(lookahead_levels=2, lookahead_repeats=2)[1]
    fresh.start(10, 1, pending_state=state)
    assert not fresh.lookahead_pending


def test_lookahead_needs_a_measured_estimate():
    with pytest.raises(ValueError, match="lookahead_levels needs a paired task_estimate"):
        sq.SDQ(search={"task_estimate": "pathwise", "lookahead_levels": 2})
    with pytest.raises(ValueError, match="lookahead_repeats must be an integer >= 1"):
        sq.SDQ(search={"lookahead_levels": 2, "lookahead_repeats": 0})
    with pytest.raises(ValueError, match="lookahead_levels must be an integer >= 0"):
        sq.SDQ(search={"lookahead_levels": -1})


def test_paired_needs_the_progressive_reading():
    with pytest.raises(ValueError, match="task_estimate='paired' needs reading='progressive'"):
        sq.SDQ(search={"reading": "cascade", "task_estimate": "paired"})
    with pytest.raises(ValueError, match="task_estimate='paired_train' needs reading='progressive'"):
        sq.SDQ(search={"reading": "cascade", "task_estimate": "paired_train"})
    with pytest.raises(ValueError, match="probes_per_step must be an integer >= 1"):
        sq.SDQ(search={"task_estimate": "paired", "probes_per_step": 0})
    with pytest.raises(ValueError, match="task_estimate='paired' needs reading='progressive'"):
        sq.SDQ(search={"reading": "cascade", "task_estimate": "paired"})
    with pytest.raises(ValueError, match="task_estimate must be one of"):
        sq.SDQ(search={"task_estimate": "exact"})


class _Snapshot(pl.Callback):
    """The module's state at the last search batch, before the SDQ callback (after this one) freezes the plan."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 7:
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _fit(task_estimate: str, probes_per_step: int = 1, **search):
    pl.seed_everything(0)
    snap = _Snapshot()
    module = UserNet(body="cnn_bn", width=8)
    cb = sq.SDQ(weight_bits=(1, 2, 4, 8), activation_bits=4, budget={"metric": "avg_bits", "target": 3.0},
                search_epochs=1, search={"search_signal": "budget_only", "task_estimate": task_estimate,
                                         "probes_per_step": probes_per_step, **search},
                ebr={"weight": 0.0}, runtime={"kernels": "eager"})
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=8,
                         accelerator="cpu", callbacks=[snap, cb])
    trainer.fit(module, Loaders().train(batch_size=64))
    return snap.state, cb


@pytest.mark.parametrize("estimate", ["paired", pytest.param("paired_train", marks=pytest.mark.slow),
                                      pytest.param("paired_isolated", marks=pytest.mark.slow),
                                      pytest.param("paired+lookahead", marks=pytest.mark.slow)])
def test_probing_leaves_the_training_run_unchanged(estimate):
    """Budget only: the task force is not used, so a run with probes must train exactly the network a run without
    them trains (weights, BatchNorm statistics): a probe that left a buffer, a draw counter or a DBP changed would
    show here. The measurements themselves are there."""
    a, _ = _fit("pathwise")
    ahead = estimate.endswith("+lookahead")
    lookahead = {"lookahead_levels": 1, "lookahead_repeats": 1} if ahead else {"lookahead_levels": 0}
    b, cb = _fit(estimate.split("+")[0], probes_per_step=3, **lookahead)
    keys = [k for k in a if k.endswith(("weight", "bias", "running_mean", "running_var"))
            and "quant" not in k and "dbp" not in k]
    assert len(keys) >= 6
    for k in keys:
        assert torch.equal(a[k], b[k]), k
    probes = sum(float(cb.search.optimizer.state[q.dbp]["probes"].sum()) for q in cb.search.quantizers)
    n = len(cb.search.quantizers)
    if ahead:  # n lookahead probes (the 2->1 drop once each) in the first steps, live probes after
        assert cb.search.lookahead_done == n
        assert sum(float(cb.search.optimizer.state[q.dbp]["probes"][1]) for q in cb.search.quantizers) >= n
        assert probes > n
    else:
        assert probes == 8 * min(3, n)  # distinct layers per step, at most probes_per_step


class _Regression(UserNet):
    """A module whose batches carry float targets (MSE on the logits): the default probe loss does not apply."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)


def test_the_default_falls_back_to_pathwise_with_a_warning_where_the_probe_loss_does_not_fit():
    pl.seed_everything(0)
    module = _Regression(body="cnn_bn", width=8)
    loader = torch.utils.data.DataLoader(
        [(x, torch.nn.functional.one_hot(y, 10).float()) for x, y in Loaders().train_set], batch_size=64)
    cb = sq.SDQ(weight_bits=(1, 2, 4, 8), activation_bits=4, budget={"metric": "avg_bits", "target": 3.0},
                search_epochs=1, ebr={"weight": 0.0}, runtime={"kernels": "eager"})
    assert cb.task_estimate == "paired"  # the default under the progressive reading
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=4,
                         accelerator="cpu", callbacks=[cb])
    with pytest.warns(UserWarning, match="falls back to 'pathwise'"):
        trainer.fit(module, loader)
    assert cb.search.task_estimate == "pathwise" and not cb.search.optimizer.measured
    assert cb.search.lookahead_levels == 0 and not cb.search.lookahead_pending  # the default lookahead went too
    resumed = sq.SDQ(weight_bits=(2, 4, 8))  # a resumed run measures as the checkpointed one did
    assert resumed.task_estimate == "paired"
    resumed.load_state_dict(cb.state_dict())
    assert resumed.task_estimate == "pathwise"
    assert sq.SDQ(search={"reading": "cascade"}).task_estimate == "pathwise"


def test_the_default_lookahead_is_three_levels_with_a_paired_estimate_and_none_with_pathwise():
    """``search.lookahead_levels=None`` (the default): the 2->1, 3->2 and 4->3 drops measured ahead with a paired
    estimate, nothing with ``pathwise`` (where an explicit lookahead is an error)."""
    from sdq_lightning.options import SearchOptions

    assert SearchOptions().resolved_lookahead_levels == 3
    assert SearchOptions(lookahead_levels=0).resolved_lookahead_levels == 0
    assert SearchOptions(task_estimate="paired_isolated").resolved_lookahead_levels == 3
    assert SearchOptions(task_estimate="pathwise").resolved_lookahead_levels == 0
    assert SearchOptions(reading="cascade").resolved_lookahead_levels == 0
    # a paired search that fell back to pathwise (a resumed run, or batches the probe loss cannot read) runs none
    assert SearchOptions(lookahead_levels=2).lookahead_levels_for("pathwise") == 0
    assert SearchOptions(lookahead_levels=2).lookahead_levels_for("paired_train") == 2
    assert SearchOptions().lookahead_levels_for("paired") == 3
    with pytest.raises(ValueError, match="lookahead_levels needs a paired task_estimate"):
        SearchOptions(task_estimate="pathwise", lookahead_levels=3)
    with pytest.raises(ValueError, match="lookahead_levels must be an integer >= 0"):
        SearchOptions(lookahead_levels=-1)
