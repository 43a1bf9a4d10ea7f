"""Pure quantization functions: straight-through rounding, LSQ gradient scaling, uniform and binary quantizers.

Everything here is stateless and works on plain tensors; the modules in :mod:`sdq_lightning.quantizers` hold the
state (step sizes, bitwidths, DBPs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "binary_quantize",
    "counter_uniform",
    "counter_uniform_many",
    "fake_quantize_dynamic",
    "stream_key",
    "grad_scale",
    "int_range",
    "lsq_grad_factor",
    "lsq_quantize",
    "quantize_weight",
    "round_ste",
    "weight_step_init",
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
        # x * (1/s), not x / s: PyTorch's fake-quantize kernels multiply by the float32 reciprocal, and the two
        # differ at exact rounding ties (e.g. x = 2.5 s), so this keeps the integer codes identical to torch's.
        multi = None if binary is True else torch.round(torch.clamp(x * (1.0 / step), qn, qp)) * step
        if binary is False:
            return multi
        sign = torch.where(x / step >= 0, 1.0, -1.0).to(x.dtype) * step
        return sign if binary is True else torch.where(binary, sign, multi)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        x, step, *saved = ctx.saved_tensors
        extra = list(ctx.numbers)
        for i, t in zip(ctx.tensor_at, saved):
            extra[i] = t
        qn, qp, g, binary = extra
        gx = gs = None
        if binary is not True:  # LSQ (Esser et al. 2020): masks on x/s; boundary values count as clipped (as in
            v = x * (1.0 / step)  # torch.clamp's gradient, which the composite form of this function used)
            inside = (v > qn) & (v < qp)
            gx = grad * inside
            gs = grad * (torch.round(torch.clamp(v, qn, qp)) - v * inside)
        if binary is not False:  # sign with a hard-tanh straight-through: |x/s| <= 1 passes
            u = x / step
            near = u.abs() <= 1
            bx = grad * near
            bs = grad * (torch.where(u >= 0, 1.0, -1.0).to(u.dtype) - u * near)
            gx = bx if binary is True else torch.where(binary, bx, gx)
            gs = bs if binary is True else torch.where(binary, bs, gs)
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
