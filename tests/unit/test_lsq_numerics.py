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
    """``step_init="mse"``: each width's step is the grid step of least squared quantization error (checked against
    a brute-force search over a finer grid at 2 and 4 bits: no step there does better than 1 % of the chosen step's
    error; at 8 bits the error is jagged in the step and the grid coarser than its teeth), per tensor or per output
    channel; ``"lsq"`` keeps LSQ's rule, which at 2-8 bits is a worse step."""
    from sdq_lightning.quantizers import SDQWeightQuantizer
    from sdq_lightning.quantizers.functional import quantize_weight, weight_step_init

    torch.manual_seed(0)
    w = torch.randn(4, 8, 3, 3)
    mse = SDQWeightQuantizer((1, 2, 4, 8), weight=w, per_channel=per_channel, step_init="mse")
    lsq = SDQWeightQuantizer((1, 2, 4, 8), weight=w, per_channel=per_channel)
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
    """``layers.step_init="mse"`` (callback) -> ``QuantSpec.step_init`` -> each layer's quantizer starts every width
    at the least-squares step of its own weight; the default keeps LSQ's rule."""
    from torch import nn

    import sdq_lightning as sq
    from sdq_lightning.quantizers.functional import weight_step_init, weight_step_mse

    assert sq.SDQ(layers={"step_init": "mse"}).spec.step_init == "mse"
    assert sq.SDQ().spec.step_init == "lsq"
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
