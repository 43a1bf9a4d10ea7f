"""Pure quantization functions: straight-through rounding, LSQ gradient scaling, uniform and binary quantizers.

Everything here is stateless and works on plain tensors; the modules in :mod:`sdq_lightning.quantizers` hold the
state (step sizes, bitwidths, DBPs). The LSQ arithmetic is defined here and nowhere else: the quotient
(:func:`lsq_quotient`), the codes (:func:`lsq_codes`, :func:`binary_codes`), the fake-quantized value
(:func:`dequantize`, :func:`fake_quant`) and the per-element gradients (:func:`lsq_grads`, :func:`binary_grads`,
:func:`fake_quant_grads`). The fused activation kernels, the batched weight pass, EBR, the SDQ quantizer's integer
codes and the integer-only network call these.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "binary_codes",
    "binary_grads",
    "binary_quantize",
    "counter_uniform",
    "counter_uniform_many",
    "dequantize",
    "fake_quant",
    "fake_quant_grads",
    "fake_quantize_dynamic",
    "stream_key",
    "grad_scale",
    "int_range",
    "lsq_codes",
    "lsq_grad_factor",
    "lsq_grads",
    "lsq_quantize",
    "lsq_quotient",
    "quantize_weight",
    "round_ste",
    "weight_step_init",
    "weight_step_mse",
    "MSE_STEP_MAX_BITS",
    "STEP_INITS",
]

MIN_BITS = 1
MAX_BITS = 8


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(Qn, Qp)`` of a ``bits``-bit uniform quantizer.

    Signed: ``[-2^(b-1), 2^(b-1) - 1]``; unsigned: ``[0, 2^b - 1]``. For ``bits == 1`` and signed, the binary grid
    ``{-1, +1}`` is returned as ``(-1, 1)`` (see :func:`binary_quantize`).
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if signed:
        if bits == 1:
            return -1, 1
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (half to even), identity gradient."""
    return (torch.round(x) - x).detach() + x


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass (bit-exact), gradient multiplied by ``scale`` in the backward pass."""
    y = x * scale
    return x.detach() + (y - y.detach())  # (x - y) + y would round away from x in the last bit


def lsq_grad_factor(numel: int, qp: int) -> float:
    """LSQ step-size gradient scale ``g = 1 / sqrt(numel * Qp)`` (Esser et al., 2020)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qp, 1))


def lsq_quotient(x: Tensor, step: Tensor) -> Tensor:
    """``x / s`` as every LSQ path computes it: ``x * (1/s)``. PyTorch's fake-quantize kernels multiply by the
    float32 reciprocal too, and the two forms differ at exact rounding ties (e.g. ``x = 2.5 s``), so this keeps the
    integer codes identical to torch's (and to the ONNX export's)."""
    return x * (1.0 / step)


def lsq_codes(v: Tensor, qn, qp) -> Tensor:
    """LSQ integer codes of the quotient ``v`` (:func:`lsq_quotient`): ``clamp(round(v), Qn, Qp)``, rounding half to
    even. ``qn``, ``qp``: numbers, or tensors broadcastable to ``v``."""
    return torch.clamp(torch.round(v), qn, qp)


def binary_codes(v: Tensor) -> Tensor:
    """1-bit codes of the quotient ``v``: ``+1`` where ``v >= 0`` (zero included), else ``-1``, in ``v``'s dtype."""
    return torch.where(v >= 0, 1.0, -1.0).to(v.dtype)


def dequantize(v: Tensor, r: Tensor | None, step: Tensor, binary) -> Tensor:
    """The fake-quantized value ``codes * s`` from the quotient ``v`` and its LSQ codes ``r``: the codes are ``r``, or
    :func:`binary_codes` where ``binary`` (``False``/``None``, ``True`` (``r`` may then be None) or a bool tensor
    broadcastable to ``v``, chosen per element)."""
    if binary is True:
        return binary_codes(v) * step
    if binary is not False and binary is not None:
        r = torch.where(binary, binary_codes(v), r)
    return r * step


def fake_quant(x: Tensor, step: Tensor, qn, qp, binary=False) -> Tensor:
    """``s * clamp(round(x / s), Qn, Qp)``, or ``s * sign(x / s)`` where ``binary`` (see :func:`dequantize`), on plain
    tensors (no gradient rule of its own: :func:`lsq_quantize` gives it LSQ's)."""
    v = lsq_quotient(x, step)
    return dequantize(v, None if binary is True else lsq_codes(v, qn, qp), step, binary)


def lsq_grads(grad: Tensor, v: Tensor, r: Tensor, qn, qp) -> tuple[Tensor, Tensor]:
    """Per element, LSQ's gradients (Esser et al. 2020) of ``x`` and of ``s`` (before the sum over the elements a
    step serves and before the gradient factor), from the gradient ``grad`` of the fake-quantized value and the
    quotient ``v`` and codes ``r``: inside ``Qn < v < Qp``, straight through and ``r - v``; outside (the boundary
    values included, as the gradient of ``clamp``), 0 and ``r`` (``Qn`` or ``Qp``)."""
    inside = (v > qn) & (v < qp)
    return grad * inside, grad * torch.where(inside, r - v, r)


def binary_grads(grad: Tensor, x: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """Per element, the 1-bit gradients of ``x`` and of ``s`` (as :func:`lsq_grads`): a hard-tanh straight-through
    on ``u = x / s``: where ``|u| <= 1``, ``grad`` and ``sign(u) - u``; outside, 0 and ``sign(u)``."""
    u = x / step
    near = u.abs() <= 1
    return grad * near, grad * (binary_codes(u) - u * near)


def fake_quant_grads(grad: Tensor, x: Tensor, step: Tensor, v: Tensor | None, r: Tensor | None, qn, qp,
                     binary) -> tuple[Tensor, Tensor]:
    """Per element, the gradients of ``x`` and ``s`` of :func:`fake_quant`: :func:`lsq_grads` from the quotient and
    codes ``(v, r)`` (None when ``binary is True``), :func:`binary_grads` where ``binary``."""
    if binary is not True:
        gx, gs = lsq_grads(grad, v, r, qn, qp)
        if binary is False or binary is None:
            return gx, gs
    bx, bs = binary_grads(grad, x, step)
    if binary is True:
        return bx, bs
    return torch.where(binary, bx, gx), torch.where(binary, bs, gs)


class _FakeQuant(torch.autograd.Function):
    """LSQ fake quantization (and its 1-bit form) as ONE autograd node: a handful of elementwise kernels forward and
    backward, where the composite of ``grad_scale``, ``clamp`` and a straight-through ``round`` recorded a dozen
    nodes (on a GPU each is a kernel launch, and the quantized step was bound by launches).

    ``qn``, ``qp``, ``grad_factor``: numbers or 0-dim tensors on the device; ``binary``: ``False``, ``True`` or a 0-dim
    bool tensor (chosen per call on the device, for the search's dynamic bitwidth). The inputs are saved and the
    codes recomputed in backward (weights are small; nothing else is kept)."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qn, qp, grad_factor, binary) -> Tensor:  # noqa: D102
        extra = (qn, qp, grad_factor, binary)  # device tensors among them are saved as tensors, numbers as-is
        ctx.tensor_at = [i for i, a in enumerate(extra) if isinstance(a, Tensor)]
        ctx.numbers = [None if isinstance(a, Tensor) else a for a in extra]
        ctx.save_for_backward(x, step, *[extra[i] for i in ctx.tensor_at])
        return fake_quant(x, step, qn, qp, binary)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        x, step, *saved = ctx.saved_tensors
        extra = list(ctx.numbers)
        for i, t in zip(ctx.tensor_at, saved):
            extra[i] = t
        qn, qp, g, binary = extra
        v = r = None
        if binary is not True:
            v = lsq_quotient(x, step)
            r = lsq_codes(v, qn, qp)
        gx, gs = fake_quant_grads(grad, x, step, v, r, qn, qp, binary)
        gs = gs.sum_to_size(step.shape) * g
        return gx, gs.to(step.dtype), None, None, None, None


def lsq_quantize(x: Tensor, step: Tensor, qn, qp, grad_factor=1.0) -> Tensor:
    """LSQ fake quantization ``s * clamp(round(x / s), Qn, Qp)``.

    Gradients: straight-through for ``x`` inside the range (zero outside); for ``s`` the LSQ gradient
    ``round(x/s) - x/s`` inside, ``Qn`` / ``Qp`` outside, multiplied by ``grad_factor``. ``step`` may be a scalar or
    broadcastable to ``x`` (per-channel); ``qn``, ``qp`` and ``grad_factor`` numbers or 0-dim device tensors.
    """
    return _FakeQuant.apply(x, step, qn, qp, grad_factor, False)


def binary_quantize(x: Tensor, step: Tensor, grad_factor=1.0) -> Tensor:
    """1-bit weights: ``s * sign(x)`` with levels ``{-s, +s}`` (never the degenerate ``{-1, 0}`` grid); gradient of
    ``x`` straight through where ``|x/s| <= 1``, of ``s``: ``sign(x/s) - x/s`` there and ``sign(x/s)`` outside."""
    return _FakeQuant.apply(x, step, -1, 1, grad_factor, True)


def fake_quantize_dynamic(x: Tensor, step: Tensor, qn: Tensor, qp: Tensor, grad_factor: Tensor,
                          binary: Tensor) -> Tensor:
    """:func:`lsq_quantize` or, where the 0-dim bool ``binary`` is set, :func:`binary_quantize`: range, grad factor
    and choice are device tensors (no host read, one autograd node)."""
    return _FakeQuant.apply(x, step, qn, qp, grad_factor, binary)


def quantize_weight(w: Tensor, step: Tensor, bits: int, grad_factor: float = 1.0) -> Tensor:
    """Signed symmetric weight quantizer at ``bits`` bits (binary for 1 bit)."""
    if bits == 1:
        return binary_quantize(w, step, grad_factor)
    qn, qp = int_range(bits, signed=True)
    return lsq_quantize(w, step, qn, qp, grad_factor)


def weight_step_init(w: Tensor, bits: int, per_channel: bool = False) -> Tensor:
    """Initial step: ``mean|w|`` for 1 bit, ``2 mean|w| / sqrt(Qp)`` otherwise (LSQ); per output channel if asked."""
    absw = w.detach().abs()
    mean = absw.flatten(1).mean(1) if per_channel else absw.mean()
    if bits == 1:
        step = mean
    else:
        step = 2.0 * mean / math.sqrt(2 ** (bits - 1) - 1)
    return step.clamp_min(1e-8)


STEP_INITS = ("lsq", "mse", "mse_all")
# step_init="mse": the widths that start at the least-squares step, in a searched layer. The widths a low-bit plan
# is decided at (the lookahead's 2->1, 3->2 and 4->3 drops); wider ones, and layers at a fixed width (nothing to
# measure), keep LSQ's rule, whose range clips no weight. At 5-8 bits the least-squares step clips the largest
# weights, whose gradient the straight-through estimator then cuts: from scratch, while the weights grow, that cost
# 2.45-3.40 points on every seed (docs/RESULTS.md section 30).
MSE_STEP_MAX_BITS = 4
STEP_GRID = torch.linspace(0.2, 2.5, 116)  # multiples of the LSQ initial step searched for the MSE step


@torch.no_grad()
def weight_step_mse(w: Tensor, bits: int, per_channel: bool = False) -> Tensor:
    """The step of least ``||Q_b(w) - w||^2`` among the :data:`STEP_GRID` multiples (0.2-2.5) of
    :func:`weight_step_init`, per tensor or per output channel; 1 bit: ``mean|w|`` (least squares for binary codes).
    The oracle's step (``sdq-plan``); at 7-8 bits the least-squares step can lie under the grid (0.2x LSQ's), and
    there the grid's lowest step is taken."""
    s0 = weight_step_init(w, bits, per_channel)
    if bits == 1:
        return s0
    rows = w.detach().flatten(1) if per_channel else w.detach().reshape(1, -1)
    out = []
    for r, base in zip(rows, s0.reshape(-1)):
        flat = r.reshape(1, -1)
        steps = (base * STEP_GRID.to(w.device, w.dtype)).reshape(-1, 1)
        chunk = max(1, (1 << 22) // flat.shape[1])  # steps per pass: about 4M elements at a time
        errors = torch.cat([((quantize_weight(flat, steps[i:i + chunk], bits) - flat) ** 2).sum(1)
                            for i in range(0, len(steps), chunk)])
        out.append(steps[int(errors.argmin()), 0])
    return torch.stack(out) if per_channel else out[0]


# ----------------------------------------------------------------------------- device-side counter-based draws
_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values in [0, 2^32): products wrap mod 2^64 and
    only the low 32 bits are kept, so the result is the same on every device and backend."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def stream_key(*parts: int) -> int:
    """A 32-bit stream key from integers (seed, layer id, ...), computed on the host once."""
    h = 0x9E3779B9
    for p in parts:
        h = _mix32_int(h ^ _mix32_int(int(p) & _M32) ^ ((int(p) >> 32) & _M32))
    return h


def counter_uniform(key: int, counter: Tensor, k: int) -> Tensor:
    """``k`` uniforms in (0, 1) (float32), a pure function of ``(key, counter)``; see :func:`_counter_uniform`.

    Under ``torch.compile`` the hash runs as one opaque custom op (``sdq::counter_uniform``), so that inductor does
    not fuse its 64-bit integer arithmetic into the network's batch-norm and activation-quantization kernels (which
    slows the searched step down markedly on the CPU). Eager (and CUDA-graph capture) call the function directly: no
    dispatcher on the hot path."""
    if torch.compiler.is_compiling():
        return torch.ops.sdq.counter_uniform(counter, key, k)
    return _counter_uniform(key, counter, k)


@torch.library.custom_op("sdq::counter_uniform", mutates_args=())
def _counter_uniform_op(counter: Tensor, key: int, k: int) -> Tensor:
    return _counter_uniform(key, counter, k)


@_counter_uniform_op.register_fake
def _(counter: Tensor, key: int, k: int) -> Tensor:
    return counter.new_empty((k,), dtype=torch.float32)


def counter_uniform_many(keys: Tensor, counters: Tensor) -> Tensor:
    """One uniform per stream: ``counter_uniform(keys[i], counters[i], 1)[0]`` for every ``i`` in one vectorised pass
    (int64 tensors of the same shape on the device; the same values, bit for bit). Under ``torch.compile`` an opaque
    custom op, as :func:`counter_uniform`."""
    if torch.compiler.is_compiling():
        return torch.ops.sdq.counter_uniform_many(keys, counters)
    return _counter_uniform_many(keys, counters)


def _counter_uniform_many(keys: Tensor, counters: Tensor) -> Tensor:
    return _hash_uniform(keys, counters, 0)


@torch.library.custom_op("sdq::counter_uniform_many", mutates_args=())
def _counter_uniform_many_op(keys: Tensor, counters: Tensor) -> Tensor:
    return _counter_uniform_many(keys, counters)


@_counter_uniform_many_op.register_fake
def _(keys: Tensor, counters: Tensor) -> Tensor:
    return keys.new_empty(keys.shape, dtype=torch.float32)


def _counter_uniform(key: int, counter: Tensor, k: int) -> Tensor:
    """``k`` uniforms in (0, 1) (float32) that are a pure function of ``(key, counter)``: a counter-based generator.

    ``counter`` is a 0-d int64 tensor on the device where the draws are needed (for example the global training
    step), so drawing never reads a value back to the host and a compiled graph does not depend on its value. The
    same key and counter give the same draws on every data-parallel rank and every run.
    """
    return _hash_uniform(key, counter, torch.arange(k, device=counter.device, dtype=torch.int64))


def _hash_uniform(key: int | Tensor, counter: Tensor, index: int | Tensor) -> Tensor:
    """The generator itself: key(s), counter(s) and draw index(es) -> uniforms (broadcast; int64 arithmetic)."""
    h = _mix32(counter.to(torch.int64) ^ key)
    h = _mix32(h * 0x9E3779B1 + index + 1)
    h = _mix32(h ^ (key >> 7))
    # 24 high bits -> a float32 in (0, 1) exactly: (h + 0.5) / 2^24
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
