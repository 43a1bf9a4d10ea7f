"""sdq_lightning.planning without data sets: the exact planner against brute force, random plans uniform over the
band, the HAWQ trace against the exact Hessian trace, the oracle against a direct computation, the level table."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdq_lightning.budget import Budget
from sdq_lightning.planning import (
    PlanProblem,
    Sensitivity,
    exact_plan,
    finite_difference,
    hawq,
    level_table,
    quantize_alone,
    random_plan,
    size_greedy_plan,
    spearman,
    uniform_plan,
)

CANDS = (1, 2, 3, 4)


def _problem(widths=(8, 12, 16, 24, 6), cands=CANDS) -> PlanProblem:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    return PlanProblem.from_model(model, torch.randn(1, widths[0]), cands, first_last="search")


def _all_plans(problem: PlanProblem):
    for combo in itertools.product(*(problem.candidates[n] for n in problem.names)):
        yield dict(zip(problem.names, combo))


@pytest.mark.parametrize("metric,fraction", [("avg_bits", 0.45), ("size", 0.6), ("bitops", 0.3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_plan_is_the_brute_force_optimum(metric, fraction, seed) -> None:
    problem = _problem()
    lo = problem.cost({n: CANDS[0] for n in problem.names}, metric)
    hi = problem.cost({n: CANDS[-1] for n in problem.names}, metric)
    budget = Budget(metric, lo + fraction * (hi - lo))
    gen = torch.Generator().manual_seed(seed)
    sens = {n: {b: float(v) for b, v in zip(CANDS, torch.rand(len(CANDS), generator=gen).sort(descending=True)[0])}
            for n in problem.names}
    bits = exact_plan(problem, sens, budget)
    assert problem.cost(bits, metric) <= budget.target
    best = min(sum(sens[n][b] for n, b in p.items()) for p in _all_plans(problem)
               if problem.cost(p, metric) <= budget.target)
    assert sum(sens[n][b] for n, b in bits.items()) == pytest.approx(best, abs=1e-9)


def test_exact_plan_refuses_an_infeasible_budget_and_incomplete_sensitivities() -> None:
    problem = _problem()
    sens = {n: {b: 1.0 / b for b in CANDS} for n in problem.names}
    with pytest.raises(ValueError, match="budget|below|exceed|lowest"):
        exact_plan(problem, sens, Budget("avg_bits", 0.5))
    partial = dict(sens)
    partial.pop(problem.names[1])
    with pytest.raises(ValueError, match=problem.names[1].replace(".", r"\.")):
        exact_plan(problem, partial, Budget("avg_bits", 2.5))
    with pytest.raises(ValueError, match="lack the candidate bits"):
        exact_plan(problem, {n: {1: 0.0} for n in problem.names}, Budget("avg_bits", 2.5))


def test_random_plans_are_uniform_over_the_plans_in_the_band() -> None:
    from scipy.stats import chisquare

    problem = _problem()
    target = problem.cost({n: 2 for n in problem.names}, "avg_bits") + 0.05
    budget, band = Budget("avg_bits", target), 0.05
    in_band = [tuple(p.values()) for p in _all_plans(problem)
               if (1 - band) * target <= problem.cost(p, "avg_bits") <= target]
    assert 5 <= len(in_band) <= 60  # the test's own setting: a band with several plans, not all plans
    draws = [tuple(random_plan(problem, budget, seed=s, band=band, grid=4000).values())
             for s in range(40 * len(in_band))]
    assert set(draws) <= set(in_band)
    counts = [draws.count(p) for p in in_band]
    assert min(counts) > 0
    assert chisquare(counts).pvalue > 1e-4


def test_random_plan_is_seeded_and_refuses_an_empty_band() -> None:
    problem = _problem()
    budget = Budget("avg_bits", 2.2)
    assert random_plan(problem, budget, seed=3, band=0.1) == random_plan(problem, budget, seed=3, band=0.1)
    assert len({tuple(random_plan(problem, budget, seed=s, band=0.1).values()) for s in range(6)}) > 1
    lowest = problem.cost({n: 1 for n in problem.names}, "avg_bits")
    with pytest.raises(ValueError, match="within"):
        random_plan(problem, Budget("avg_bits", lowest * 1.001), band=0.0005)
    with pytest.raises(ValueError, match="band"):
        random_plan(problem, budget, band=1.5)


def test_size_greedy_drops_the_largest_layer_first_and_uniform_takes_the_highest_that_fits() -> None:
    problem = _problem()
    sizes = {n: problem.profile[n].params for n in problem.names}
    largest, smallest = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
    budget = Budget("avg_bits", 3.0)
    bits = size_greedy_plan(problem, budget)
    assert problem.cost(bits, "avg_bits") <= 3.0
    assert bits[largest] < bits[smallest]
    assert uniform_plan(problem, budget) == {n: 3 for n in problem.names}
    assert uniform_plan(problem, Budget("avg_bits", 2.99)) == {n: 2 for n in problem.names}
    with pytest.raises(ValueError, match="not a candidate"):
        uniform_plan(problem, budget, bits=7)


def test_level_table_integrates_the_measured_gains_and_fills_the_unmeasured() -> None:
    table = level_table((1, 2, 3, 4), [0.0, 0.5, 0.0, 0.2])  # level 3 never live: the mean of 0.5 and 0.2
    assert table == pytest.approx({1: 0.0, 2: -0.5, 3: -0.85, 4: -1.05})
    assert level_table((2, 4), [0.0, -0.3]) == {2: 0.0, 4: 0.0}  # a negative gain counts as none


def _net_and_batches(n_batches=4):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(n_batches)]
    return model, batches


def test_oracle_is_the_loss_increase_of_one_layer_alone_and_leaves_the_model_unchanged() -> None:
    model, batches = _net_and_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = finite_difference(model, batches, ["0", "2"], [1, 3])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        base = [float(F.cross_entropy(model(x), y)) for x, y in batches]
        w = model[2].weight.clone()
        model[2].weight.copy_(quantize_alone(w, 3))
        quant = [float(F.cross_entropy(model(x), y)) for x, y in batches]
        model[2].weight.copy_(w)
    expected = [q - f for q, f in zip(quant, base)]
    assert sens.per_batch["2"][3] == pytest.approx(expected, abs=1e-6)
    assert sens.values["2"][3] == pytest.approx(sum(expected) / 4, abs=1e-6)
    even, odd = sens.halves()
    assert (even.values["0"][1] + odd.values["0"][1]) / 2 == pytest.approx(sens.values["0"][1], abs=1e-6)
    assert even.values["0"][1] == pytest.approx((sens.per_batch["0"][1][0] + sens.per_batch["0"][1][2]) / 2)


def test_hawq_trace_matches_the_exact_hessian_trace() -> None:
    model, batches = _net_and_batches(n_batches=2)
    sens = hawq(model, batches, ["0", "2"], [2, 4], probes=300, seed=0)
    for idx in ("0", "2"):
        layer = model[int(idx)]
        w0 = layer.weight.detach().clone()

        def loss_of(flat, layer=layer, shape=w0.shape):
            total = 0.0
            for x, y in batches:
                out = torch.func.functional_call(model, {f"{idx}.weight": flat.view(shape)}, (x,))
                total = total + F.cross_entropy(out, y)
            return total / len(batches)

        exact = float(torch.autograd.functional.hessian(loss_of, w0.flatten()).diagonal().sum())
        estimate = sens.meta["trace"][idx]
        assert estimate == pytest.approx(exact, rel=0.12)  # Hutchinson at 300 probes: about 3 % sd here
        err = float(((quantize_alone(w0, 2) - w0) ** 2).sum())
        assert sens.values[idx][2] == pytest.approx(estimate / w0.numel() * err, rel=1e-6)


def test_sensitivity_file_round_trip_and_errors(tmp_path) -> None:
    sens = Sensitivity({"a": {1: 0.5, 2: 0.1}, "b": {1: 0.2, 2: 0.0}}, "oracle")
    back = Sensitivity.from_json(sens.to_json(tmp_path / "s.json"))
    assert back.values == sens.values
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": {"x": 1}}')
    with pytest.raises(ValueError, match="bits must be integers"):
        Sensitivity.from_json(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        Sensitivity.from_json(bad)
    with pytest.raises(FileNotFoundError):
        Sensitivity.from_json(tmp_path / "missing.json")


def test_spearman_and_increments() -> None:
    sens = Sensitivity({"a": {1: 3.0, 2: 1.0, 3: 0.0}, "b": {1: 1.0, 2: 0.5, 3: 0.0}}, "x")
    inc = sens.increments([(2, 1), (3, 2)])
    assert inc == {("a", 2, 1): 2.0, ("a", 3, 2): 1.0, ("b", 2, 1): 0.5, ("b", 3, 2): 0.5}
    assert spearman({1: 1.0, 2: 2.0, 3: 3.0}, {1: 3.0, 2: 2.0, 3: 1.0}) == pytest.approx(-1.0)
    assert math.isclose(spearman({1: 1.0, 2: 2.0, 3: 3.0, 4: 0.0}, {1: 1.0, 2: 2.0, 3: 3.0}), 1.0)
    with pytest.raises(ValueError, match="at least 3"):
        spearman({1: 1.0}, {1: 1.0})
