"""Cost model and BitPlan against hand-computed numbers on a three-layer net; projection; files; apply."""

from __future__ import annotations

import timm
import pytest
import torch

import sdq_lightning as sq
from _nets import tiny_net

NAMES = ("0", "2", "5")  # conv 1->4 (36 w, 576 MACs), conv 4->8 (288 w, 4608 MACs), linear 128->10 (1280 w, 1280 MACs)
PARAMS = {"0": 36, "2": 288, "5": 1280}
MACS = {"0": 576, "2": 4608, "5": 1280}
OTHER = 8 + 10  # the two biases


def _searched(cands=(2, 4, 8), act=4):
    model = tiny_net()
    x = torch.randn(1, 1, 4, 4)
    prof = sq.profile_model(model, x)
    sq.quantize_model(model, sq.QuantSpec(weight_bits=cands, activation_bits=act, first_last="search"))
    return model, prof


def test_profile_of_the_tiny_net():
    model, prof = _searched()
    assert list(prof) == list(NAMES)
    assert {n: p.params for n, p in prof.items()} == PARAMS
    assert {n: p.macs for n, p in prof.items()} == MACS


def test_costs_against_hand_computation():
    model, prof = _searched()
    plan = sq.BitPlan.from_model(model, profile=prof).with_bits({"0": 8, "2": 4, "5": 2})
    assert plan.other_params == OTHER
    assert plan.average_bits == pytest.approx((36 * 8 + 288 * 4 + 1280 * 2) / 1604)
    assert plan.size_bytes == pytest.approx((36 * 8 + 288 * 4 + 1280 * 2) / 8 + OTHER * 4)  # 500 + 72
    assert plan.bitops == pytest.approx(576 * 8 * 4 + 4608 * 4 * 4 + 1280 * 2 * 4)  # 102400
    cm = sq.CostModel(model, prof)
    for metric in sq.budget.METRICS:
        assert cm.of_bits(dict(plan), metric) == pytest.approx(plan.cost(metric))


def test_fp_layers_count_at_32_bits():
    model, prof = _searched()
    plan = sq.BitPlan.from_model(model, profile=prof).with_bits({"0": 8, "2": 4, "5": 2})
    fp = sq.BitPlan(dict(plan.layers), plan.other_params, {}).with_bits({"0": None})
    assert fp.average_bits == pytest.approx((36 * 32 + 288 * 4 + 1280 * 2) / 1604)


def test_expected_cost_is_differentiable_and_matches_at_the_top():
    model, prof = _searched()
    cm = sq.CostModel(model, prof)
    e = cm.expected("avg_bits")
    assert e.item() == pytest.approx(8.0)  # every layer starts at its top candidate with beta = 1
    e.backward()
    for q in sq.quant_layers(model).values():
        assert q.weight_quant.dbp.grad is not None


@pytest.mark.parametrize(("metric", "target"), [("avg_bits", 3.0), ("avg_bits", 2.5), ("size", 700.0),
                                                 ("bitops", 150000.0)])
def test_project_to_budget_fills_up_to_the_target(metric, target):
    model, prof = _searched()
    cm = sq.CostModel(model, prof)
    bits = sq.project_to_budget(cm, cm.current_bits(), sq.Budget(metric, target))
    cost = cm.of_bits(bits, metric)
    assert cost <= target
    cands = (2, 4, 8)
    for n in cm.searchable():  # no single one-level raise still fits
        i = cands.index(bits[n])
        if i + 1 < len(cands):
            assert cm.of_bits({**bits, n: cands[i + 1]}, metric) > target, (n, bits)


def test_project_to_budget_from_below_raises_layers():
    model, prof = _searched()
    cm = sq.CostModel(model, prof)
    bits = sq.project_to_budget(cm, {"0": 2, "2": 2, "5": 2}, sq.Budget("avg_bits", 5.0))
    assert cm.of_bits(bits, "avg_bits") <= 5.0 and bits != {"0": 2, "2": 2, "5": 2}


def test_infeasible_budget_raises():
    model, prof = _searched()
    cm = sq.CostModel(model, prof)
    with pytest.raises(ValueError, match=r"budget target 1\.5 \(avg_bits\) is below .* minimum is 2"):
        sq.project_to_budget(cm, cm.current_bits(), sq.Budget("avg_bits", 1.5))


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_plan_file_round_trip(tmp_path, suffix):
    model, prof = _searched()
    plan = sq.BitPlan.from_model(model, profile=prof, candidates=[2, 4, 8]).with_bits({"0": 8, "2": 4, "5": 2})
    path = plan.save(tmp_path / f"plan{suffix}")
    loaded = sq.BitPlan.load(path)
    assert loaded.layers == plan.layers and dict(loaded) == {"0": 8, "2": 4, "5": 2}
    assert loaded.other_params == plan.other_params
    assert loaded.metadata["candidates"] == [2, 4, 8]
    assert loaded.costs() == pytest.approx(plan.costs())


def test_plan_applies_to_a_float_model():
    model, prof = _searched()
    plan = sq.BitPlan.from_model(model, profile=prof).with_bits({"0": 8, "2": 4, "5": 2})
    fresh = tiny_net()
    plan.apply(fresh)
    q = sq.quant_layers(fresh)
    assert {n: m.weight_quant.bits for n, m in q.items()} == {"0": 8, "2": 4, "5": 2}
    assert all(m.weight_quant.frozen for m in q.values())
    assert {n: m.act_quant.bits for n, m in q.items()} == {"0": 4, "2": 4, "5": 4}
    again = sq.BitPlan.from_model(fresh, torch.randn(1, 1, 4, 4))
    assert again.costs() == pytest.approx(plan.costs())


def test_plan_applies_to_a_searching_model():
    model, prof = _searched()
    plan = sq.BitPlan.from_model(model, profile=prof).with_bits({"0": 4, "2": 2, "5": 8})
    plan.apply(model)
    q = sq.quant_layers(model)
    assert {n: m.weight_quant.bits for n, m in q.items()} == {"0": 4, "2": 2, "5": 8}
    assert all(m.weight_quant.frozen for m in q.values())


def test_resnet20_plan_at_two_bits_meets_the_budget():
    model = timm.create_model("resnet20", num_classes=10)
    prof = sq.profile_model(model, torch.randn(1, 3, 32, 32))
    sq.quantize_model(model, sq.QuantSpec(weight_bits=tuple(range(1, 9)), activation_bits=4))
    cm = sq.CostModel(model, prof)
    bits = sq.project_to_budget(cm, cm.current_bits(), sq.Budget("avg_bits", 2.0))
    plan = sq.BitPlan.from_model(model, profile=prof).with_bits(bits)
    plan.apply(model)
    assert 1.95 < plan.average_bits <= 2.0
    assert plan["conv1"] == 8 and plan["fc"] == 8


def test_projection_fill_can_be_limited_to_one_level_per_layer():
    model, prof = _searched(cands=(1, 2, 3, 4, 5, 6, 7, 8))
    cm = sq.CostModel(model, prof)
    low = {n: 1 for n in NAMES}
    free = sq.project_to_budget(cm, low, sq.Budget("avg_bits", 4.0))
    assert max(free[n] - 1 for n in NAMES) > 1  # the greedy fill raises some layer several levels
    capped = sq.project_to_budget(cm, low, sq.Budget("avg_bits", 4.0), max_raise_levels=1)
    assert cm.of_bits(capped, "avg_bits") <= 4.0
    assert capped != free  # the room is spread differently: every layer gets its first level before any a second
    # still filled: no single one-level raise fits under the target
    for n in NAMES:
        if capped[n] < 8:
            assert cm.of_bits({**capped, n: capped[n] + 1}, "avg_bits") > 4.0
