"""DBP gradients (ste, gumbel) and bitwidth sampling (frequencies, reproducibility)."""

from __future__ import annotations

import math

import pytest
import torch

from sdq_lightning import SDQWeightQuantizer

CANDS = (1, 2, 3, 4, 5, 6, 7, 8)


def _quantizer(estimator="ste", reading="progressive", cands=CANDS, seed=0, layer_id=0, numel=64):
    w = torch.randn(numel)
    q = SDQWeightQuantizer(cands, reading, estimator, weight=w, seed=seed, layer_id=layer_id).train()
    return q, w


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("level", [1, 3, 7])
def test_ste_dbp_gradient_is_the_expectation(level):
    q, w = _quantizer("ste")
    q.set_level(level, reinit_dbp=0.6)
    g = torch.randn_like(w)
    (q(w) * g).sum().backward()
    with torch.no_grad():
        expected = (g * (q.quantize_at(w, level) - q.quantize_at(w, level - 1))).sum()
    assert q.dbp.grad[level].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    others = torch.ones(len(CANDS), dtype=torch.bool)
    others[level] = False
    assert torch.all(q.dbp.grad[others] == 0)


def test_ste_forward_is_one_of_the_two_quantizers():
    q, w = _quantizer("ste")
    q.set_level(4, reinit_dbp=0.5)
    for step in range(20):
        q.set_draw_step(step)
        out = q(w).detach()
        i = q.candidates.index(q.last_bits)
        assert i in (3, 4) and torch.equal(out, q.quantize_at(w, i).detach())


def _gumbel_grad(tau: float, beta: float = 0.4, level: int = 3, step: int = 11):
    torch.manual_seed(123)  # the same weight for every temperature
    q, w = _quantizer("gumbel")
    q.set_level(level, reinit_dbp=beta)
    q.set_temperature(tau)
    q.set_draw_step(step)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    (q(w) * g).sum().backward()
    u = float(q._uniforms(1)[0])  # the draw the forward used (draw_step was advanced by it)
    with torch.no_grad():
        diff = (g * (q.quantize_at(w, level) - q.quantize_at(w, level - 1))).sum().item()
    return q.dbp.grad[level].item(), diff, u


@pytest.mark.parametrize("tau", [2.0, 1.0, 0.5, 0.1])
def test_gumbel_dbp_gradient_is_finite_nonzero_and_follows_the_relaxation(tau):
    beta = 0.4
    grad, diff, u = _gumbel_grad(tau, beta)
    assert math.isfinite(grad) and grad != 0
    # b = eps + (1 - 2 eps) beta; soft = sigmoid((logit(b) + logit(u)) / tau);
    # d soft / d beta = soft (1 - soft) (1 - 2 eps) / (tau b (1 - b))
    eps = 0.01
    b = eps + (1 - 2 * eps) * beta
    z = (math.log(b / (1 - b)) + math.log(u / (1 - u))) / tau
    soft = 1 / (1 + math.exp(-z))
    expected = diff * soft * (1 - soft) * (1 - 2 * eps) / (tau * b * (1 - b))
    assert grad == pytest.approx(expected, rel=1e-4)


def test_gumbel_temperature_changes_the_gradient():
    """Same weight, same noise draw: the temperature alone changes the DBP gradient."""
    grads = {tau: _gumbel_grad(tau)[0] for tau in (4.0, 1.0, 0.25)}
    assert len({round(g, 12) for g in grads.values()}) == 3
    # high temperature: the soft sample tends to 1/2, so the gradient tends to diff / (4 tau beta (1 - beta))
    grad, diff, _ = _gumbel_grad(100.0)
    b = 0.01 + 0.98 * 0.4
    assert grad == pytest.approx(diff * 0.98 / (4 * 100.0 * b * (1 - b)), rel=0.01)


@pytest.mark.parametrize("estimator", ["gumbel", "ste"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_progressive_task_gradient_at_every_dbp_value(estimator, beta, tau):
    """The start state beta = 1 (every layer, every level drop) carries task gradient, like beta = 0.5: the old
    clamp at 1 - 1e-6 gave exactly zero there. Summed over draws so that a low temperature cannot hide it."""
    q, w = _quantizer(estimator, numel=256)
    q.set_level(4, reinit_dbp=beta)
    q.set_temperature(tau)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    grads = []
    for step in range(64):
        q.dbp.grad = None
        q.set_draw_step(step)
        (q(w) * g).sum().backward()
        grads.append(q.dbp.grad[4].item())
    assert all(math.isfinite(x) for x in grads)
    nonzero = sum(x != 0 for x in grads)
    assert nonzero >= (64 if estimator == "ste" or tau == 1.0 else 1), (nonzero, grads[:5])
    with torch.no_grad():
        diff = (g * (q.quantize_at(w, 4) - q.quantize_at(w, 3))).sum().item()
    assert diff != 0 and sum(grads) * diff > 0  # the mean gradient has the sign of the expectation's


@pytest.mark.parametrize("estimator", ["gumbel", "ste"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_cascade_task_gradient_at_every_dbp_value(estimator, beta):
    q, w = _quantizer(estimator, "cascade", cands=(2, 4, 8), numel=256)
    with torch.no_grad():
        q.dbp.fill_(beta)
    total = torch.zeros(3)
    for step in range(64):
        q.dbp.grad = None
        q.set_draw_step(step)
        q(w).square().sum().backward()
        assert torch.isfinite(q.dbp.grad).all()
        total += q.dbp.grad.abs()
    assert (total[1:] > 0).all(), (estimator, beta, total)


def test_cascade_gradient_reaches_every_live_dbp():
    for est in ("ste", "gumbel"):
        q, w = _quantizer(est, "cascade", cands=(2, 4, 8))
        with torch.no_grad():
            q.dbp.copy_(torch.tensor([0.5, 0.5, 0.5]))
        q(w).square().sum().backward()
        assert torch.isfinite(q.dbp.grad).all() and (q.dbp.grad[1:] != 0).all(), est


# ------------------------------------------------------------------ sampling
N_DRAWS = 4000


def _bound(p: float, n: int = N_DRAWS) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)  # 5 binomial sigmas: a false alarm about once in 1.7 million runs


def _draw_bits(q, w, n=N_DRAWS):
    out = []
    with torch.no_grad():
        for i in range(n):
            q.set_draw_step(i)
            q(w)
            out.append(q.last_bits)
    return out


@pytest.mark.parametrize("estimator", ["ste", "gumbel"])
@pytest.mark.parametrize("beta", [0.15, 0.5, 0.8])
def test_progressive_frequencies_match_beta(estimator, beta):
    q, w = _quantizer(estimator, numel=4)
    q.set_level(5, reinit_dbp=beta)  # 6 bits vs 5 bits
    bits = _draw_bits(q, w)
    assert set(bits) <= {5, 6}
    freq = bits.count(6) / len(bits)
    assert abs(freq - beta) <= _bound(beta), (freq, beta)


@pytest.mark.parametrize("estimator", ["ste", pytest.param("gumbel", marks=pytest.mark.slow)])  # 5 s a case
def test_cascade_frequencies_match_probabilities(estimator):
    q, w = _quantizer(estimator, "cascade", cands=(1, 2, 4, 8), numel=4)
    with torch.no_grad():
        q.dbp.copy_(torch.tensor([1.0, 0.5, 0.3, 0.6]))
    probs = q.probabilities().detach()
    assert torch.allclose(probs, torch.tensor([0.14, 0.14, 0.12, 0.6]))
    bits = _draw_bits(q, w)
    for b, p in zip(q.candidates, probs.tolist()):
        freq = bits.count(b) / len(bits)
        assert abs(freq - p) <= _bound(p), (b, freq, p)


@pytest.mark.parametrize("reading", ["progressive", "cascade"])
def test_same_seed_layer_step_gives_the_same_draw(reading):
    def seq(seed, layer_id):
        q, w = _quantizer("gumbel", reading, seed=seed, layer_id=layer_id, numel=4)
        q.set_level(6, reinit_dbp=0.5)
        with torch.no_grad():
            q.dbp.fill_(0.5)
        return _draw_bits(q, w, 200)

    a = seq(3, 17)
    assert a == seq(3, 17)  # what every data-parallel rank computes
    assert a != seq(3, 18) and a != seq(4, 17)  # other layers / seeds draw independently


def test_draw_depends_only_on_the_draw_step():
    q, w = _quantizer("ste", numel=4)
    q.set_level(3, reinit_dbp=0.5)
    ref = _draw_bits(q, w, 50)
    # interleave unrelated forwards; setting the step again reproduces the draws
    with torch.no_grad():
        for _ in range(7):
            q(w)
    assert _draw_bits(q, w, 50) == ref


def test_eval_mode_is_deterministic_and_draw_free():
    q, w = _quantizer("gumbel", numel=4)
    q.set_level(4, reinit_dbp=0.7)
    q.eval()
    step = int(q.draw_step)
    with torch.no_grad():
        outs = {q(w).sum().item() for _ in range(5)}
    assert len(outs) == 1 and q.last_bits == 5 and int(q.draw_step) == step
