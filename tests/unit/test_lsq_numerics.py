"""LSQ fake quantization against PyTorch's reference ``torch._fake_quantize_learnable_per_tensor_affine``.

Signature in torch 2.14: ``(input, scale, zero_point, quant_min, quant_max, grad_factor)``; scale and zero_point are
1-element float tensors.

Agreement, and where it is not bitwise:
* forward: bitwise equal, including exact rounding ties x = (k + 1/2) s (both compute ``x * float32(1/s)`` and round
  half to even);
* input gradient: ours is the chain ``g * s * (1/s)``, torch's is ``g`` itself, so they agree to 1-2 ulp
  (rtol 1e-6, atol 0);
* step gradient: the same per-element terms summed in a different order, rtol 1e-4;
* the half-bins just outside the range, ``Qn - 1/2 <= x/s < Qn`` and ``Qp < x/s < Qp + 1/2``, differ BY DEFINITION:
  torch masks on ``round(x/s)`` (so there it passes the input gradient and uses ``round(x/s) - x/s`` for the step),
  while ours follows the LSQ paper (Esser et al. 2020, eq. 3), which masks on ``x/s`` itself (no input gradient,
  step gradient ``Qn`` / ``Qp``). Those elements are compared against the paper's formula instead.
"""

from __future__ import annotations

import pytest
import torch

from sdq_lightning.quantizers import int_range, lsq_grad_factor, lsq_quantize


def _torch_lsq(x, s, qn, qp, g):
    return torch._fake_quantize_learnable_per_tensor_affine(x, s, torch.zeros(1), qn, qp, g)


def _pair(x, s0, qn, qp, g, grad):
    xa, sa = x.clone().requires_grad_(), s0.clone().requires_grad_()
    xb, sb = x.clone().requires_grad_(), s0.clone().requires_grad_()
    ya, yb = lsq_quantize(xa, sa, qn, qp, g), _torch_lsq(xb, sb, qn, qp, g)
    ya.backward(grad)
    yb.backward(grad)
    return ya.detach(), yb.detach(), xa.grad, xb.grad, sa.grad, sb.grad


def _half_bins(x, s, qn, qp):
    v = x * (1.0 / s)
    return ((v >= qn - 0.5) & (v < qn)) | ((v > qp) & (v < qp + 0.5))


@pytest.mark.parametrize("signed", [True, False], ids=["signed-weights", "unsigned-acts"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_lsq_matches_torch_reference(bits, signed):
    qn, qp = int_range(bits, signed)
    gen = torch.Generator().manual_seed(bits)
    for trial in range(25):
        x = torch.randn(2048, generator=gen) * 3
        if not signed:
            x = x.abs()
        s0 = (torch.rand(1, generator=gen) * 0.5 + 0.02)
        g = lsq_grad_factor(x.numel(), qp)
        edge = _half_bins(x, s0, qn, qp)
        grad = torch.randn(2048, generator=gen) * (~edge)  # the definitional half-bins are checked separately
        ya, yb, gxa, gxb, gsa, gsb = _pair(x, s0, qn, qp, g, grad)
        assert torch.equal(ya, yb), f"forward differs at {int((ya != yb).sum())} elements"
        torch.testing.assert_close(gxa, gxb, rtol=1e-6, atol=0)
        torch.testing.assert_close(gsa, gsb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_matches_torch_at_exact_rounding_ties(signed):
    qn, qp = int_range(4, signed)
    gen = torch.Generator().manual_seed(1)
    k = torch.arange(qn, qp).float()
    for _ in range(500):
        s = torch.rand(1, generator=gen) * 0.5 + 0.01
        x = (k + 0.5) * s  # x/s lands on (or within an ulp of) a tie
        assert torch.equal(lsq_quantize(x, s, qn, qp), _torch_lsq(x, s, qn, qp, 1.0))


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_half_bins_follow_the_lsq_paper(signed):
    """Where torch's mask (on round(x/s)) and the paper's (on x/s) disagree, ours is the paper's."""
    qn, qp = int_range(3, signed)
    s = torch.tensor([0.5])
    v = torch.tensor([qn - 0.4, qn - 0.1, qp + 0.1, qp + 0.4])
    x = (v * s).requires_grad_()
    st = s.clone().requires_grad_()
    y = lsq_quantize(x, st, qn, qp, 1.0)
    assert torch.equal(y.detach(), torch.tensor([qn, qn, qp, qp]) * s)  # forward: same as torch
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(4))  # outside [Qn, Qp]: no input gradient
    assert st.grad.item() == pytest.approx(2 * qn + 2 * qp)  # outside: dQ/ds = Qn or Qp
    xt, stt = (v * s).requires_grad_(), s.clone().requires_grad_()
    _torch_lsq(xt, stt, qn, qp, 1.0).sum().backward()
    assert torch.equal(xt.grad, torch.ones(4))  # torch: round(x/s) is inside, so it passes the gradient


def test_lsq_per_channel_step_broadcasts():
    w = torch.randn(4, 3, 3, 3)
    s = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(4, 1, 1, 1)
    qn, qp = int_range(4, True)
    y = lsq_quantize(w, s, qn, qp)
    for c in range(4):
        assert torch.equal(y[c], _torch_lsq(w[c], s[c].reshape(1), qn, qp, 1.0))


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_mse_step_init_is_the_least_squares_step_on_its_grid(per_channel):
    """``step_init="mse_all"``: each width's step is the grid step of least squared quantization error (checked against
    a brute-force search over a finer grid at 2 and 4 bits: no step there does better than 1 % of the chosen step's
    error; at 8 bits the error is jagged in the step and the grid coarser than its teeth), per tensor or per output
    channel; ``"lsq"`` keeps LSQ's rule, which at 2-8 bits is a worse step; ``"mse"`` is the least-squares step up to 4
    bits and LSQ's rule above."""
    from sdq_lightning.quantizers import SDQWeightQuantizer
    from sdq_lightning.quantizers.functional import quantize_weight, weight_step_init

    torch.manual_seed(0)
    w = torch.randn(4, 8, 3, 3)
    mse = SDQWeightQuantizer((1, 2, 4, 8), weight=w, per_channel=per_channel, step_init="mse_all")
    lsq = SDQWeightQuantizer((1, 2, 4, 8), weight=w, per_channel=per_channel)
    # "mse": the least-squares step up to MSE_STEP_MAX_BITS (4), LSQ's rule above (8 bits here)
    low = SDQWeightQuantizer((1, 2, 4, 8), weight=w, per_channel=per_channel, step_init="mse")
    assert torch.equal(low.steps[:3], mse.steps[:3]) and torch.equal(low.steps[3], lsq.steps[3])
    assert not torch.allclose(mse.steps[3], lsq.steps[3], rtol=0.05)
    for b in (2, 4):  # a layer at a fixed width (uniform, a given plan) keeps LSQ's rule under "mse", not "mse_all"
        fixed = SDQWeightQuantizer((b,), weight=w, per_channel=per_channel, step_init="mse")
        assert torch.equal(fixed.steps[0], weight_step_init(w, b, per_channel))
        fixed_all = SDQWeightQuantizer((b,), weight=w, per_channel=per_channel, step_init="mse_all")
        assert not torch.allclose(fixed_all.steps[0], fixed.steps[0], rtol=0.05)
    rows = w.flatten(1) if per_channel else w.reshape(1, -1)
    for i, b in enumerate((1, 2, 4, 8)):
        for r, row in enumerate(rows):
            s_mse = mse.steps[i].reshape(-1)[r]
            s_lsq = lsq.steps[i].reshape(-1)[r]
            assert float(s_lsq) == pytest.approx(float(weight_step_init(row, b)), rel=1e-6)

            def err(s, row=row, b=b):
                return float(((quantize_weight(row, s, b) - row) ** 2).sum())

            if b == 1:
                assert float(s_mse) == pytest.approx(float(s_lsq), rel=1e-6)  # mean|w|: least squares for binary
                continue
            if b <= 4:
                fine = torch.logspace(-2, 0.5, 800) * weight_step_init(row, b)
                assert err(s_mse) <= min(err(s) for s in fine) * 1.01
            assert err(s_mse) < err(s_lsq)
    with pytest.raises(ValueError, match="step_init must be one of"):
        SDQWeightQuantizer((2, 4), weight=w, step_init="minmax")


def test_the_step_init_option_reaches_every_searched_quantizer():
    """``layers.step_init`` (callback) -> ``QuantSpec.step_init`` -> each layer's quantizer starts every width at the
    least-squares step of its own weight (``"mse"``, the callback's default, up to 4 bits) or at LSQ's rule."""
    from torch import nn

    import sdq_lightning as sq
    from sdq_lightning.quantizers.functional import weight_step_init, weight_step_mse

    assert sq.SDQ(layers={"step_init": "lsq"}).spec.step_init == "lsq"
    assert sq.SDQ().spec.step_init == "mse"  # the default (docs/method.md: the least-squares step up to 4 bits)
    with pytest.raises(ValueError, match="step_init must be one of"):
        sq.SDQ(layers={"step_init": "max"})
    for init, rule in (("mse", weight_step_mse), ("lsq", weight_step_init)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        weights = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
        sq.quantize_model(model, sq.QuantSpec(weight_bits=(1, 2, 4), activation_bits=None, first_last="search",
                                              step_init=init))
        quantizers = [m.weight_quant for m in model.modules() if hasattr(m, "weight_quant")]
        assert len(quantizers) == 3
        for q, w in zip(quantizers, weights):
            expected = torch.stack([rule(w, b) for b in (1, 2, 4)])
            assert torch.allclose(q.steps.detach(), expected, rtol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_step_follow_keeps_the_widths_not_drawn_on_the_weight_scale(per_channel):
    """``step_follow``: :meth:`follow_weight_` scales the steps of the widths below the live pair by the change of
    ``mean|w|`` (per channel with ``per_channel``); under LSQ's rule, which is linear in ``mean|w|``, they stay
    exactly the rule on the current weight. The live pair's steps (which the step optimizer trains) stay; nothing
    moves without the option, when frozen, or under the cascade reading; after a state-dict load the first call only
    records the scale."""
    from sdq_lightning.quantizers import SDQWeightQuantizer
    from sdq_lightning.quantizers.functional import weight_step_init

    torch.manual_seed(0)
    w = torch.randn(4, 8, 3, 3)
    grown = w * torch.tensor([3.0, 0.5, 2.0, 1.5]).view(-1, 1, 1, 1)  # the weight after training, per channel
    cands = (1, 2, 3, 4)

    def made(**kw):
        q = SDQWeightQuantizer(cands, weight=w, per_channel=per_channel, **kw)
        q.set_level(2)  # live pair 3/2 bits: the 1-bit width is not drawn
        with torch.no_grad():
            q.steps[1:].mul_(1.7)  # the live widths' steps moved away from the rule (trained)
        return q

    q = made(step_follow=True)
    live = q.steps[1:].detach().clone()
    q.follow_weight_(grown)
    assert torch.allclose(q.steps[0], weight_step_init(grown, 1, per_channel), rtol=1e-6)
    assert not torch.allclose(q.steps[0], weight_step_init(w, 1, per_channel), rtol=1e-2)
    assert torch.equal(q.steps[1:].detach(), live)
    q.follow_weight_(grown * 2)  # relative to the last call
    assert torch.allclose(q.steps[0], weight_step_init(grown * 2, 1, per_channel), rtol=1e-6)

    for off in (made(), made(step_follow=True, reading="cascade")):
        before = off.steps.detach().clone()
        off.follow_weight_(grown)
        assert torch.equal(off.steps.detach(), before)
    frozen = made(step_follow=True)
    frozen.freeze(3)
    before = frozen.steps.detach().clone()
    frozen.follow_weight_(grown)
    assert torch.equal(frozen.steps.detach(), before)

    loaded = made(step_follow=True)
    loaded.load_state_dict(q.state_dict())
    before = loaded.steps.detach().clone()
    loaded.follow_weight_(grown)  # the scale the loaded steps belong to is not known: recorded, not applied
    assert torch.equal(loaded.steps.detach(), before)
    loaded.follow_weight_(grown * 2)
    assert torch.allclose(loaded.steps[0], before[0] * 2, rtol=1e-6)
