"""Memory-lean autograd functions: LSQ activation quantization fused with the conv / linear that consumes it.

Forward: ``x_q = clamp(round(x * (1/s)), Qn, Qp) * s`` then the conv (or linear) on ``x_q``. Only ``x``, ``s`` and the
(fake-quantized) weight are saved; ``x_q`` is recomputed in backward, so a quantized layer keeps what the float layer
keeps (its input) instead of the input, three LSQ intermediates and ``x_q``. The arithmetic is that of
:mod:`sdq_lightning.quantizers.functional` (``lsq_codes``, ``fake_quant``, ``lsq_grads``, called here), so values are
bit-identical to :func:`sdq_lightning.quantizers.lsq_quantize` followed by the layer; the LSQ gradients are those of
the paper (inside ``Qn < x/s < Qp``: straight-through for ``x`` and ``round(x/s) - x/s`` for ``s``; outside: 0 and
``Qn`` / ``Qp``), the step gradient scaled by ``grad_factor``. These autograd functions are not ``lsq_quantize``'s
node because they save the layer's input in place of ``x_q``, compute the codes in float32 for low-precision inputs,
and run the elementwise pieces through the selected kernels (below).

Under autocast the quantized input, weight and bias are cast to the autocast dtype for the conv/linear, as autocast
would do, and the backward uses the same casts.

Kernels: the LSQ arithmetic is about 15 elementwise passes over the activation in eager PyTorch, which costs more than
the convolution itself on a CPU. ``set_kernels("compile")`` runs the two elementwise pieces (forward values; input and
step gradients) through ``torch.compile`` (one fused loop each, compiled once per process for any shape and
bitwidth, about 6 s on 2 CPU cores). Forward values and input gradients are bit-identical to eager; the step gradient
is a sum and may differ in the last bits from eager's summation order (it is deterministic run to run). If
compilation fails (no C++ compiler, unsupported platform) a warning is issued and eager kernels are used. The default
is ``"eager"``, or the ``SDQ_KERNELS`` environment variable.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor
from torch.nn import functional as F

from sdq_lightning.quantizers.functional import dequantize, fake_quant, lsq_codes, lsq_grads, lsq_quotient

__all__ = ["KERNELS", "get_kernels", "lsq_act_quantize", "quant_conv2d", "quant_linear", "set_kernels"]

KERNELS = ("eager", "compile")


def _check_kernels(mode: object, what: str) -> str:
    if mode not in KERNELS:
        raise ValueError(f"{what} must be one of {KERNELS}, got {mode!r}")
    return str(mode)


def _env_kernels() -> str:
    """The process default from ``SDQ_KERNELS``: ``eager``, ``compile``, or ``auto`` (what the app's config
    defaults to; the callback resolves it per device, and the process default stays ``eager``)."""
    value = os.environ.get("SDQ_KERNELS", "eager")
    if value == "auto":
        return "eager"
    if value not in KERNELS:
        raise ValueError(f"SDQ_KERNELS must be one of {(*KERNELS, 'auto')}, got {value!r}")
    return value


_mode = _env_kernels()
_compiled: dict[str, object] = {}


def set_kernels(mode: str) -> None:
    """Select the LSQ elementwise kernels for this process: ``"eager"`` or ``"compile"`` (see the module doc)."""
    global _mode
    _mode = _check_kernels(mode, "kernels")


def get_kernels() -> str:
    """The kernels in use: ``"eager"`` or ``"compile"``."""
    return _mode


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _codes(x: Tensor, step: Tensor, qn: int, qp: int) -> tuple[Tensor, Tensor]:
    """``(x/s, codes)`` in float32 whatever the input dtype (bf16 codes would round wrongly)."""
    v = lsq_quotient(x.float(), step.float())
    return v, lsq_codes(v, qn, qp)


def _fq_eager(x: Tensor, step: Tensor, qn: int, qp: int) -> Tensor:
    """Fake-quantized ``x`` in float32."""
    return fake_quant(x.float(), step.float(), qn, qp)


def _grads_from_codes(gxq: Tensor, v: Tensor, r: Tensor, qn: int, qp: int) -> tuple[Tensor, Tensor]:
    """LSQ gradients of ``x`` and (before the grad factor) of ``step``, in float32, from the gradient of ``x_q``."""
    gx, gs = lsq_grads(gxq.float(), v, r, qn, qp)
    return gx, gs.sum()


def _grads_eager(gxq: Tensor, x: Tensor, step: Tensor, qn: int, qp: int) -> tuple[Tensor, Tensor]:
    return _grads_from_codes(gxq, *_codes(x, step, qn, qp), qn, qp)


def _backward_xq(x: Tensor, step: Tensor, qn: int, qp: int) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """``x_q`` recomputed for a backward, with the eager codes ``(v, r)`` to reuse for the gradients (None when the
    kernels are compiled: the compiled gradient kernel recomputes them inside its one loop)."""
    if _mode == "eager":
        v, r = _codes(x, step, qn, qp)
        return dequantize(v, r, step.float(), False), (v, r)
    return _kernel("fq")(x, step, qn, qp), None


def _lsq_grads(gxq: Tensor, x: Tensor, step: Tensor, qn: int, qp: int, g: float,
               codes: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    # the grad factor stays outside the compiled kernel: a float argument would recompile it for every layer
    gx, gs = _grads_from_codes(gxq, *codes, qn, qp) if codes is not None else _kernel("grads")(gxq, x, step, qn, qp)
    return gx, (gs * g).to(step.dtype)


_EAGER = {"fq": _fq_eager, "grads": _grads_eager}


def _kernel(name: str):
    """The eager function, or its compiled twin under ``set_kernels("compile")`` (falls back to eager on failure)."""
    if _mode == "eager":
        return _EAGER[name]
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = _guarded(name, torch.compile(_EAGER[name], dynamic=True))
    return fn


def _guarded(name: str, compiled):
    def call(*args):
        global _mode
        try:
            return compiled(*args)
        except Exception as err:  # noqa: BLE001 - any backend failure: eager is always correct
            warnings.warn(f"sdq_lightning: torch.compile of the LSQ kernels failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); using eager kernels", stacklevel=2)
            _mode = "eager"
            _compiled.clear()
            return _EAGER[name](*args)
    return call


def _operands(x: Tensor, step: Tensor, w: Tensor, bias: Tensor | None, qn: int, qp: int):
    """``x_q``, weight and bias as the layer consumes them (cast to the autocast dtype when autocast is on)."""
    dtype = _autocast_dtype(x.device.type)
    xq = _kernel("fq")(x, step, qn, qp)
    if dtype is None:
        return xq, w, bias, None
    return xq.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype), dtype


class _LSQAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, step)
        ctx.q = (qn, qp, g)
        return _kernel("fq")(x, step, qn, qp).to(x.dtype)

    @staticmethod
    def backward(ctx, gy: Tensor):  # noqa: D102
        x, step = ctx.saved_tensors
        qn, qp, g = ctx.q
        gx, gs = _lsq_grads(gy, x, step, qn, qp, g)
        return gx.to(x.dtype), gs, None, None, None


def lsq_act_quantize(x: Tensor, step: Tensor, qn: int, qp: int, grad_factor: float) -> Tensor:
    """LSQ fake quantization as one autograd node that saves only ``x`` and ``step``."""
    return _LSQAct.apply(x, step, qn, qp, grad_factor)


class _QuantConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, w: Tensor, bias: Tensor | None, qn: int, qp: int, g: float,
                conv: tuple) -> Tensor:  # noqa: D102
        stride, padding, dilation, groups = conv
        xq, wc, bc, dtype = _operands(x, step, w, bias, qn, qp)
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(xq, wc, bc, stride, padding, dilation, groups)
        ctx.save_for_backward(x, step, w)
        ctx.meta = (qn, qp, g, conv, dtype, None if bias is None else bias.shape, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # noqa: D102
        x, step, w = ctx.saved_tensors
        qn, qp, g, (stride, padding, dilation, groups), dtype, bshape, bdtype = ctx.meta
        xq, codes = _backward_xq(x, step, qn, qp)
        wc = w
        if dtype is not None:
            xq, wc, gy = xq.to(dtype), w.to(dtype), gy.to(dtype)
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        mask = [need_x, ctx.needs_input_grad[2], bshape is not None and ctx.needs_input_grad[3]]
        gxq, gw, gb = torch.ops.aten.convolution_backward(
            gy, xq, wc, list(bshape) if bshape is not None else None, list(stride), list(padding), list(dilation),
            False, [0] * len(stride), groups, mask)
        gx = gs = None
        if need_x:
            gx, gs = _lsq_grads(gxq, x, step, qn, qp, g, codes)
            gx = gx.to(x.dtype)
        gw = gw.to(w.dtype) if gw is not None else None
        gb = gb.to(bdtype) if gb is not None else None
        return gx, gs, gw, gb, None, None, None, None


def quant_conv2d(x: Tensor, step: Tensor, w: Tensor, bias: Tensor | None, qn: int, qp: int, grad_factor: float,
                 stride: tuple, padding: tuple, dilation: tuple, groups: int) -> Tensor:
    """``conv2d(lsq(x), w, bias)`` saving only ``x``, ``step`` and ``w`` (zero padding, integer padding only)."""
    return _QuantConv.apply(x, step, w, bias, qn, qp, grad_factor, (tuple(stride), tuple(padding), tuple(dilation),
                                                                     groups))


class _QuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, w: Tensor, bias: Tensor | None, qn: int, qp: int,
                g: float) -> Tensor:  # noqa: D102
        xq, wc, bc, dtype = _operands(x, step, w, bias, qn, qp)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xq, wc, bc)
        ctx.save_for_backward(x, step, w)
        ctx.meta = (qn, qp, g, dtype, bias is not None, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # noqa: D102
        x, step, w = ctx.saved_tensors
        qn, qp, g, dtype, has_bias, bdtype = ctx.meta
        xq, codes = _backward_xq(x, step, qn, qp)
        wc = w
        if dtype is not None:
            xq, wc, gy = xq.to(dtype), w.to(dtype), gy.to(dtype)
        gx = gs = gw = gb = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gx, gs = _lsq_grads(gy @ wc, x, step, qn, qp, g, codes)
            gx = gx.to(x.dtype)
        gy2, xq2 = gy.reshape(-1, gy.shape[-1]), xq.reshape(-1, xq.shape[-1])
        if ctx.needs_input_grad[2]:
            gw = (gy2.t() @ xq2).to(w.dtype)
        if has_bias and ctx.needs_input_grad[3]:
            gb = gy2.sum(0).to(bdtype)
        return gx, gs, gw, gb, None, None, None


def quant_linear(x: Tensor, step: Tensor, w: Tensor, bias: Tensor | None, qn: int, qp: int,
                 grad_factor: float) -> Tensor:
    """``linear(lsq(x), w, bias)`` saving only ``x``, ``step`` and ``w``."""
    return _QuantLinear.apply(x, step, w, bias, qn, qp, grad_factor)
