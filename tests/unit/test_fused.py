"""The memory-lean fused LSQ-input conv/linear equals the composite (quantize, then layer) reference."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from sdq_lightning.modules.fused import lsq_act_quantize, quant_conv2d, quant_linear
from sdq_lightning.quantizers import lsq_quantize
from sdq_lightning.quantizers.functional import grad_scale, round_ste


def _grads(fn, tensors, gy):
    for t in tensors:
        t.grad = None
    y = fn()
    (y.float() * gy).sum().backward()
    return [y.detach()] + [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("groups,signed", [(1, True), (1, False), (2, True), (8, False)],
                         ids=["dense-signed", "dense-unsigned", "grouped", "depthwise"])
def test_quant_conv_matches_composite(groups, signed, autocast):
    torch.manual_seed(0)
    qn, qp = (-8, 7) if signed else (0, 15)
    x = torch.randn(4, 8, 9, 9)
    x = (x if signed else x.relu()).requires_grad_()
    s = torch.tensor(0.17, requires_grad=True)
    w = torch.randn(16, 8 // groups, 3, 3, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    gy = torch.randn(4, 16, 5, 5)

    def ref():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return F.conv2d(lsq_quantize(x, s, qn, qp, 0.01), w, b, 2, 1, 1, groups)

    def fused():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return quant_conv2d(x, s, w, b, qn, qp, 0.01, (2, 2), (1, 1), (1, 1), groups)

    r, f = _grads(ref, [x, s, w, b], gy), _grads(fused, [x, s, w, b], gy)
    assert torch.equal(r[0], f[0]), "forward values must be bit-identical"
    assert torch.equal(r[3], f[3]) and torch.equal(r[4], f[4])  # weight and bias gradients
    torch.testing.assert_close(f[1], r[1], rtol=1e-5, atol=1e-5)  # grad x: s*(1/s) vs 1 in the last bit
    torch.testing.assert_close(f[2], r[2], rtol=1e-4, atol=1e-5)  # grad step: summation order


def test_quant_linear_and_act_match_composite():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 64, requires_grad=True)
    s = torch.tensor(0.05, requires_grad=True)
    w = torch.randn(10, 64, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    gy = torch.randn(6, 3, 10)
    r = _grads(lambda: F.linear(lsq_quantize(x, s, -128, 127, 0.1), w, b), [x, s, w, b], gy)
    f = _grads(lambda: quant_linear(x, s, w, b, -128, 127, 0.1), [x, s, w, b], gy)
    assert torch.equal(r[0], f[0])
    for a, c in zip(r[1:], f[1:]):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
    gy2 = torch.randn(6, 3, 64)
    r = _grads(lambda: lsq_quantize(x, s, -8, 7, 0.1), [x, s], gy2)
    f = _grads(lambda: lsq_act_quantize(x, s, -8, 7, 0.1), [x, s], gy2)
    assert torch.equal(r[0], f[0])
    torch.testing.assert_close(f[1], r[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f[2], r[2], rtol=1e-4, atol=1e-6)


def test_fused_saves_less_for_backward():
    """The fused conv keeps x, s and w for backward; the composite keeps LSQ intermediates and x_q as well."""
    x = torch.randn(8, 16, 16, 16, requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, requires_grad=True)

    def saved_bytes(fn):
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    def composite_lsq(x, s):  # LSQ written as autograd primitives (what lsq_quantize was before its own node)
        sg = grad_scale(s, 0.01)
        return round_ste(torch.clamp(x * (1.0 / sg), -8, 7)) * sg

    composite = saved_bytes(lambda: F.conv2d(composite_lsq(x, s), w, None, 1, 1))
    one_node = saved_bytes(lambda: F.conv2d(lsq_quantize(x, s, -8, 7, 0.01), w, None, 1, 1))
    fused = saved_bytes(lambda: quant_conv2d(x, s, w, None, -8, 7, 0.01, (1, 1), (1, 1), (1, 1), 1))
    assert fused <= x.numel() * 4 + w.numel() * 4 + 64
    assert composite >= 2 * fused
    assert one_node > fused  # lsq_quantize keeps x and s, the conv then keeps x_q: still more than the fused conv


@pytest.fixture
def compiled_kernels():
    from sdq_lightning.modules import fused

    before = fused.get_kernels()
    fused.set_kernels("compile")
    yield fused
    fused.set_kernels(before)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_compiled_kernels_match_eager(compiled_kernels, autocast):
    """torch.compile'd LSQ kernels: forward and input/weight gradients bit-identical, step gradient to rounding."""
    fused = compiled_kernels
    torch.manual_seed(0)
    cases = []
    for shape, (qn, qp) in (((4, 8, 9, 9), (0, 15)), ((2, 8, 5, 7), (-8, 7)), ((4, 8, 6, 6), (-2, 1))):
        x = torch.randn(shape)
        x = (x.relu() if qn == 0 else x).requires_grad_()
        cases.append((x, torch.tensor(0.13, requires_grad=True), torch.randn(16, 8, 3, 3, requires_grad=True), qn, qp))
    for x, s, w, qn, qp in cases:
        gy = torch.randn(x.shape[0], 16, x.shape[2], x.shape[3])

        def conv():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return quant_conv2d(x, s, w, None, qn, qp, 0.01, (1, 1), (1, 1), (1, 1), 1)

        fused.set_kernels("eager")
        e = _grads(conv, [x, s, w], gy)
        fused.set_kernels("compile")
        c = _grads(conv, [x, s, w], gy)
        assert fused.get_kernels() == "compile", "compilation fell back to eager"
        assert torch.equal(e[0], c[0]) and torch.equal(e[1], c[1]) and torch.equal(e[3], c[3])
        torch.testing.assert_close(c[2], e[2], rtol=1e-5, atol=1e-6)
        ga = torch.randn(x.shape)
        fused.set_kernels("eager")
        ea = _grads(lambda: lsq_act_quantize(x, s, qn, qp, 0.01), [x, s], ga)
        fused.set_kernels("compile")
        ca = _grads(lambda: lsq_act_quantize(x, s, qn, qp, 0.01), [x, s], ga)
        assert torch.equal(ea[0], ca[0]) and torch.equal(ea[1], ca[1])
        torch.testing.assert_close(ca[2], ea[2], rtol=1e-5, atol=1e-6)


def test_compile_failure_falls_back_to_eager(compiled_kernels, monkeypatch):
    fused = compiled_kernels

    def broken(fn, **_):
        def call(*args):
            raise RuntimeError("no C++ compiler here")
        return call

    fused._compiled.clear()
    monkeypatch.setattr(torch, "compile", broken)
    x, s = torch.randn(2, 3), torch.tensor(0.1)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler here"):
        y = lsq_act_quantize(x, s, -8, 7, 1.0)
    assert fused.get_kernels() == "eager"
    assert torch.equal(y, lsq_quantize(x, s, -8, 7, 1.0))


def test_unknown_kernels_is_a_value_error():
    from sdq_lightning.modules.fused import set_kernels

    with pytest.raises(ValueError, match=r"kernels must be one of \('eager', 'compile'\), got 'triton'"):
        set_kernels("triton")
