"""core/freeze.py: the phase boundary on its own (decide, project, freeze, record)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sdq_lightning as sq
from sdq_lightning.core.freeze import UNDECIDED_BELOW, freeze_message, freeze_searched
from sdq_lightning.core.search import BitSearch


def _searched(target: float):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.Flatten(), nn.Linear(8 * 2 * 2, 4))
    x = torch.randn(2, 3, 8, 8)
    prof = sq.profile_model(net, x[:1])
    sq.quantize_model(net, sq.QuantSpec(weight_bits=(2, 4, 8), activation_bits=None))
    search = BitSearch(sq.CostModel(net, prof), sq.Budget("avg_bits", target))
    search.start(10, 1)
    return net, search


def _set_live(q, level: int, beta: float) -> None:
    q.set_level(level, reinit_dbp=beta)


def test_a_decided_search_within_budget_is_frozen_as_decided():
    net, search = _searched(target=6.5)  # the two inner convs are searched; the first conv and classifier stay at 8
    assert len(search.quantizers) == 2
    for q, (level, beta) in zip(search.quantizers, [(1, 1.0), (2, 1.0)]):
        _set_live(q, level, beta)  # decisions 4 and 8 bits: 6.46 average bits, and 4 -> 8 would cost 8.0
    result = freeze_searched(search, net)
    assert [q.bits for q in search.quantizers] == [4, 8]
    assert all(q.frozen for q in search.quantizers)
    rec = result.record
    assert rec["projection_changed_layers"] == 0 and result.changed == {}
    assert rec["undecided_layers"] == 0 and rec["projection_max_levels"] == 0
    assert rec["decided_bits"] == result.bits


def test_an_over_budget_decision_is_projected_and_undecided_layers_are_counted():
    net, search = _searched(target=4.0)
    for q in search.quantizers:
        _set_live(q, 2, 0.5)  # half way between 4 and 8 bits: undecided, rounds up to 8
    result = freeze_searched(search, net)
    rec = result.record
    n = len(search.quantizers)
    assert rec["undecided_layers"] == n  # top probability 0.5 < UNDECIDED_BELOW
    assert UNDECIDED_BELOW == 0.9
    assert all(d == 8 for d in result.decided.values() if d is not None)
    cm = search.cost_model
    plan_bits = {name: q.bits for name, q in zip(search.names, search.quantizers)}
    assert cm.of_bits({**cm.current_bits(), **plan_bits}, "avg_bits") <= 4.0 + 1e-9
    assert rec["projection_changed_layers"] == len(result.changed) > 0
    assert all(result.decided[k] == d and result.bits[k] == b for k, (d, b) in result.changed.items())
    assert 5.0 < rec["expected_avg_bits"] < 8.0  # every layer at E = 6 bits, the fixed ones at 8

    class _Plan:
        average_bits = 2.9

        def cost(self, metric):
            return 2.9

    msg = freeze_message(3, _Plan(), sq.Budget("avg_bits", 4.0), result)
    assert msg.startswith("[SDQ] froze the plan at epoch 3: avg bits 2.9000 (target avg_bits <= 4)")
    assert (f"({n} layers undecided: top probability < 0.9; the budget rounding moved 0); projection changed "
            f"{len(result.changed)} layers") in msg


def _three_searched(target: float, rounding: str):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                        nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 2 * 2, 4))
    x = torch.randn(2, 3, 10, 10)
    prof = sq.profile_model(net, x[:1])
    sq.quantize_model(net, sq.QuantSpec(weight_bits=(2, 4, 8), activation_bits=None))
    search = BitSearch(sq.CostModel(net, prof), sq.Budget("avg_bits", target), rounding=rounding)
    search.start(10, 1)
    return net, search


def test_budget_rounding_decides_a_fractional_search_by_its_dbps():
    """Three equal searched layers between 4 and 8 bits (live DBPs 0.6, 0.7, 0.55): argmax rounds all three up, far
    over a budget that has room for one; the budget rounding takes the most confident one up, the others down,
    and the projection has nothing left to change."""
    plans = {}
    for rounding in ("argmax", "budget"):
        net, search = _three_searched(target=6.0, rounding=rounding)
        assert len(search.quantizers) == 3
        for q, beta in zip(search.quantizers, (0.6, 0.7, 0.55)):
            q.set_level(2, reinit_dbp=beta)
        argmax_cost = search.cost_model.of_bits(search.cost_model.current_bits(), "avg_bits")
        result = freeze_searched(search, net)
        plans[rounding] = (result, argmax_cost)
    (arg, arg_cost), (bud, _) = plans["argmax"], plans["budget"]
    assert arg_cost > 6.0  # the per-layer argmax (all three at 8) is over the budget; one layer at 8 fits (5.78)
    _, search = _three_searched(target=6.0, rounding="budget")
    assert [bud.decided[n] for n in search.names] == [4, 8, 4]  # the 0.7 layer goes up
    assert bud.record["rounding_changed_layers"] == 2 and arg.record["rounding_changed_layers"] == 0
    assert bud.record["projection_changed_layers"] == 0 < arg.record["projection_changed_layers"]
    with pytest.raises(ValueError, match=r"rounding must be one of \('budget', 'argmax'\), got 'nearest'"):
        BitSearch(search.cost_model, sq.Budget("avg_bits", 6.0), rounding="nearest")


def test_budget_rounding_keeps_settled_layers():
    """Settled layers (live DBP exactly 1) keep their argmax under the budget rounding; only the fractional layer is
    decided by the budget. Two settled layers at 8 bits already exceed a budget with room for one: before, the
    rounding lowered one of them (their order was arbitrary); now they stay, the fractional 0.9 layer goes down, and
    the projection makes the correction."""
    net, search = _three_searched(target=6.0, rounding="budget")
    for q, beta in zip(search.quantizers, (1.0, 1.0, 0.9)):
        q.set_level(2, reinit_dbp=beta)
    result = freeze_searched(search, net)
    assert [result.decided[n] for n in search.names] == [8, 8, 4]
    assert result.record["rounding_changed_layers"] == 1  # only the fractional layer moved from its argmax (8)
    assert result.record["projection_changed_layers"] >= 1
