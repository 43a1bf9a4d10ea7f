"""onnxruntime's integer arithmetic (CPU, x86-64), emulated exactly on torch tensors.

Every function returns the values onnxruntime's kernels write, bit for bit, for the kernels the integer-only graph
uses (``docs/integer-only.md`` names the MLAS routines each one follows):

* ``QuantizeLinear``: ``saturate(round_half_even(fp32(x / s)) + zp)``;
* ``QLinearConv`` / ``QGemm``: the int32 sum of ``(x - zx) * w`` plus the int32 bias, converted to fp32, times the
  fp32 multiplier ``fp32(fp32(s_x * s_w[c]) / s_y)`` (``QGemm`` with a float output: ``fp32(s_a * s_w[c])``),
  rounded half to even, plus ``zp``, saturated;
* ``QLinearAdd`` (the AVX2 kernel): fp32 ratios ``s_a / s_c`` and ``s_b / s_c``, the fixed part
  ``fp32(zc - fp32(ra * za + rb * zb))``, then two fused multiply-adds ``fma(A, ra, fma(B, rb, fixed))``, rounded
  half to even, saturated;
* ``QLinearGlobalAveragePool``: the int32 sum minus ``zx * HW``, times ``fp32(s_x / fp32(s_y * fp32(HW)))``, as
  ``QLinearConv``'s requantization.

Precision: integer sums are exact (float64, or float32 where the bound ``max|x| * max_c sum|w_c| < 2^24`` proves
every partial sum exact, checked per call); each fp32 operation is one IEEE fp32 operation on the CPU (torch's fp32
``*`` and ``/`` are correctly rounded), and each fused multiply-add is rounded once, through float64 with
round-to-odd (exact for fp32 results). No autocast: callers pass float32/float64 tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["EXACT_F32", "add_bias", "add_f32", "conv_multiplier", "conv_sum", "exact_in_f32", "fma_f32", "gap_codes",
           "gemm_logits", "linear_sum", "qlinear_add", "qlinear_add_table", "quantize_input", "requantize"]

EXACT_F32 = 2**24  # float32 holds every integer of magnitude up to 2^24 exactly


def _round_to_odd(s: Tensor, err: Tensor) -> Tensor:
    """``s`` (float64, the rounded sum) moved to the odd neighbour on the side of its error ``err`` where it was
    inexact: rounding the result to fp32 then rounds the exact value correctly (float64 has 29 more bits)."""
    inexact = err != 0
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    return torch.where(inexact & even, torch.nextafter(s, toward), s)


def add_f32(a: Tensor, b: Tensor) -> Tensor:
    """``fp32(a + b)`` of the exact sum of two float64 tensors, rounded once (TwoSum, then round to odd)."""
    s = a + b
    a1 = s - b
    b1 = s - a1
    err = (a - a1) + (b - b1)
    return _round_to_odd(s, err).float()


def fma_f32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``fp32(a * b + c)`` rounded once, as an fp32 fused multiply-add: ``a`` holds small integers (the codes, at most
    9 bits) and ``b``, ``c`` fp32 values, so ``a * b`` is exact in float64."""
    return add_f32(a.double() * b.double(), c.double())


def quantize_input(x: Tensor, scale: Tensor, lo: int, hi: int) -> Tensor:
    """``QuantizeLinear`` then ``Clip``, centred (zero point subtracted): ``clamp(round(fp32(x / s)), lo, hi)``."""
    return torch.clamp(torch.round(x.float() / scale.float()), lo, hi)


def exact_in_f32(x_max: float, w: Tensor) -> bool:
    """Whether a float32 convolution/matmul of codes with ``|x| <= x_max`` by the codes ``w`` is exact: no partial
    sum can exceed 2^24 in magnitude (each is then an exact integer, in any summation order). Never off the CPU
    (GPU kernels may round their inputs, e.g. to TF32)."""
    if w.device.type != "cpu":
        return False
    return x_max * float(w.detach().abs().flatten(1).sum(1).max()) < EXACT_F32


def _sum_dtype(x_max: float, w: Tensor) -> torch.dtype:
    return torch.float32 if exact_in_f32(x_max, w) else torch.float64


def conv_sum(xq: Tensor, wq: Tensor, x_max: float, stride, padding, dilation, groups: int) -> Tensor:
    """The exact int32 accumulator of ``QLinearConv`` (centred input codes, zero padding = the zero point): float32
    where that is exact (:func:`exact_in_f32`), else float64."""
    dt = _sum_dtype(x_max, wq)
    return F.conv2d(xq.detach().to(dt), wq.detach().to(dt), None, stride, padding, dilation, groups)


def linear_sum(xq: Tensor, wq: Tensor, x_max: float) -> Tensor:
    """The exact int32 accumulator of ``QGemm`` (centred input codes): float32 where exact, else float64."""
    dt = _sum_dtype(x_max, wq)
    return F.linear(xq.detach().to(dt), wq.detach().to(dt))


def add_bias(acc: Tensor, bias: Tensor) -> Tensor:
    """``acc + bias`` (int32 accumulator and bias, as floats) where ``fp32()`` of the result is ``fp32(exact sum)``:
    one float32 addition when both are exact float32 integers (the sum is then rounded once, as ``int32 -> fp32``
    rounds), else float64 (exact up to 2^53)."""
    if acc.dtype == torch.float32 and (bias.numel() == 0 or float(bias.abs().max()) <= EXACT_F32):
        return acc + bias.float()
    return acc.double() + bias.double()


def requantize(acc: Tensor, mult: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    """``round_half_even(fp32(acc) * mult)`` clamped to ``[lo, hi]`` (centred codes): MLAS's requantization of an
    int32 accumulator (bias included) with the fp32 multiplier ``mult``."""
    return torch.clamp(torch.round(acc.float() * mult.float()), lo, hi)


def conv_multiplier(s_x: Tensor, s_w: Tensor, s_y: Tensor) -> Tensor:
    """``fp32(fp32(s_x * s_w[c]) / s_y)``: ``QLinearConv``'s output multiplier per channel."""
    return (s_x.float() * s_w.float()) / s_y.float()


def gemm_logits(acc: Tensor, s_a: Tensor, s_w: Tensor) -> Tensor:
    """``QGemm`` with a float output: ``fp32(acc + bias) * fp32(s_a * s_w[n])`` (alpha 1)."""
    return acc.float() * (s_a.float() * s_w.float())


def qlinear_add(a: Tensor, b: Tensor, s_a: Tensor, za: int, s_b: Tensor, zb: int, s_c: Tensor, zc: int,
                lo: int, hi: int) -> Tensor:
    """``QLinearAdd(A, B)`` on uint8 codes (``a``, ``b`` with their zero points added), then ``Clip`` to ``[lo, hi]``;
    returns the output codes with ``zc`` added."""
    ra = s_a.float() / s_c.float()
    rb = s_b.float() / s_c.float()
    zero = torch.zeros((), dtype=torch.float64, device=a.device)
    inner = add_f32(ra.double() * za, rb.double() * zb)
    fixed = add_f32(zero + zc, -inner.double())
    t = fma_f32(b, rb, fixed)
    y = fma_f32(a, ra, t)
    if bool((y.abs() >= 2**31).any()):
        raise ValueError("QLinearAdd result outside the int32 range: the scales of its inputs and output are "
                         "too far apart")
    return torch.clamp(torch.clamp(torch.round(y), 0, 255), lo, hi)


def gap_codes(a: Tensor, s_in: Tensor, z_in: int, s_out: Tensor, z_out: int, lo: int, hi: int) -> Tensor:
    """``QLinearGlobalAveragePool`` over the last two dimensions of uint8 codes ``a`` (zero point added), then
    ``Clip``; returns the output codes with ``z_out`` added (shape ``[N, C, 1, 1]``)."""
    n = a.shape[-2] * a.shape[-1]
    acc = a.double().sum((-2, -1), keepdim=True) - float(z_in * n)
    scale = s_in.float() / (s_out.float() * torch.tensor(float(n), dtype=torch.float32, device=a.device))
    return torch.clamp(torch.round(acc.float() * scale) + z_out, 0, 255).clamp(lo, hi)


def qlinear_add_table(s_a: Tensor, za: int, s_b: Tensor, zb: int, s_c: Tensor, zc: int, lo: int, hi: int) -> Tensor:
    """:func:`qlinear_add` of every pair of uint8 codes, as a flat table indexed by ``256 * a + b`` (float32)."""
    grid = torch.arange(256, dtype=torch.float64, device=s_a.device)
    a, b = grid.repeat_interleave(256), grid.repeat(256)
    return qlinear_add(a, b, s_a, za, s_b, zb, s_c, zc, lo, hi).float()
