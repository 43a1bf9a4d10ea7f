"""Every quantized layer's weight in one batched pass per forward, instead of one quantizer call per layer.

On a GPU a small quantized network's training step is bound by kernel launches, and under CUDA graphs by the number
of (tiny) kernels the graph holds: a weight quantizer run per layer issues many kernels per layer in the forward
pass and as many again in the backward (``benchmarks/count_ops.py`` counts them), many times the float network's
whole step. Weights do not depend on the input, so all layers can be quantized at once: :class:`BatchedWeights`
concatenates the weights into one flat vector and quantizes it with one set of elementwise kernels, each segment of
the vector (a layer, or an output channel with ``per_channel``) with its own step size and integer range, then hands
each layer a view of the result, so the kernel count does not grow with the number of layers.

Same numbers as the per-layer quantizers (``tests/unit/test_batched.py``): the same draws (the counter-based
generator of :mod:`sdq_lightning.quantizers.functional`, vectorised over the layers' keys), the same forward values
bit for bit, and gradients equal up to the order of the sums (a layer's step and DBP gradients are segment sums).
The draw counters, the last-used index and the levels stay each quantizer's own buffers; the state dict does not
change.

Which layers: searched layers with the progressive reading and a vectorisable estimator (``gumbel``, ``ste``, or one
registered with ``vectorized=True``), grouped by candidate count, estimator and ``mix_eps``; and every frozen layer
(one group). Cascade layers, other estimators and layers with no weight quantizer run their own forward as before.
The grouping follows the quantizers' frozen state (a Python value) and is rebuilt at the freeze; nothing is read from
the device in a forward.

Install with :func:`batch_weights` (the SDQ callback does, ``SDQ(runtime={"batched": True})``, the default): it
replaces the network's ``forward`` on the instance, like :class:`~sdq_lightning.modules.graphs.GraphedNetwork`,
which captures it. Under ``torch.compile`` the batching steps aside and the per-layer quantizers run (the compiler
fuses them itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sdq_lightning.modules.layers import is_quant_layer
from sdq_lightning.quantizers.functional import (
    counter_uniform_many,
    dequantize,
    fake_quant,
    fake_quant_grads,
    lsq_codes,
    lsq_quotient,
)
from sdq_lightning.quantizers.sdq import SDQWeightQuantizer, distributed, progressive_choice, structure_key

__all__ = ["BatchedWeights", "batch_weights", "segment_index", "segment_quantize", "segment_sum"]


# ----------------------------------------------------------------------------- the flat kernel
def _expand(seg: Tensor, s: Tensor, table: Tensor,
            has_binary: bool | str) -> tuple[Tensor, Tensor, Tensor, Tensor | bool | None]:
    """Per element: step, Qn, Qp and (when a segment may be 1-bit) the 1-bit flag of its segment (``Qn == -1``: the
    1-bit grid is the only one with ``Qn = -1``). Three contiguous gathers; a ``[N, 4]`` row gather cost more."""
    se = s.index_select(0, seg)
    qn = table[:, 0].contiguous().index_select(0, seg)
    qp = table[:, 1].contiguous().index_select(0, seg)
    if has_binary == "all":  # every segment 1-bit (a frozen group): no per-element choice at all
        return se, qn, qp, True
    return se, qn, qp, (qn == -1) if has_binary else None


def _codes(w: Tensor, s: Tensor, qn: Tensor, qp: Tensor) -> tuple[Tensor, Tensor]:
    """The quotient and codes of every element, kept for both the value and the gradient in backward."""
    v = lsq_quotient(w, s)
    return v, lsq_codes(v, qn, qp)


CHUNK = 1 << 20
"""Elements per chunk of the flat pass. Its temporaries (a couple of dozen per element in backward) are bounded by
the chunk, not by the model, so a large model's peak memory stays near that of the per-layer quantizers
(``benchmarks/mem_batched.py`` measures it). A small model (a ResNet20's 270k weights) is one chunk, so its kernel
count does not change."""


def _chunks(n: int):
    return [slice(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)] or [slice(0, 0)]


def _accumulate(acc: Tensor, seg: Tensor, values: Tensor) -> None:
    """Per-segment sums into a float64 accumulator (an element-by-element float32 accumulation over a layer's tens of
    thousands of weights drifted 1e-4 from the per-layer quantizer's sum; float64 is below float32 rounding)."""
    acc.index_add_(0, seg, values.double())


def segment_sum(values: Tensor, index: Tensor, n: int) -> Tensor:
    """``n`` sums of ``values`` by ``index``, accumulated in float64 (see :func:`_accumulate`), in ``values.dtype``."""
    acc = torch.zeros(n, dtype=torch.float64, device=values.device)
    _accumulate(acc, index, values)
    return acc.to(values.dtype)


def segment_index(layers: list[nn.Module]) -> tuple[Tensor, Tensor]:
    """For the concatenated (flattened) weights of ``layers``: each element's segment (a layer, or an output channel
    of a ``per_channel`` quantizer's layer) and each segment's layer index. Host arithmetic, on the weights' device."""
    dev = layers[0].weight.device
    elems, layer_of_seg, base = [], [], 0
    for li, m in enumerate(layers):
        n_seg = m.weight.shape[0] if m.weight_quant.per_channel else 1
        elems.append(torch.arange(base, base + n_seg, device=dev).repeat_interleave(m.weight.numel() // n_seg))
        layer_of_seg += [li] * n_seg
        base += n_seg
    return torch.cat(elems), torch.tensor(layer_of_seg, dtype=torch.long, device=dev)


def _forward_chunk(w, seg, s_hi, t_hi, s_lo, t_lo, mask, hard, has_binary) -> Tensor:
    hi = fake_quant(w, *_expand(seg, s_hi, t_hi, has_binary))
    if s_lo is None:
        return hi
    lo = fake_quant(w, *_expand(seg, s_lo, t_lo, has_binary))
    me = mask.index_select(0, seg)
    if hard:
        return torch.where(me > 0.5, hi, lo)
    return lo + me * (hi - lo)


def _backward_chunk(grad, w, seg, s_hi, t_hi, s_lo, t_lo, mask, hard, has_binary, acc_hi, acc_lo,
                    acc_mask) -> Tensor:
    """The weight gradient of one chunk; the step (and mask) gradients accumulate per segment."""
    se_hi, qn_hi, qp_hi, b_hi = _expand(seg, s_hi, t_hi, has_binary)
    v_hi, r_hi = _codes(w, se_hi, qn_hi, qp_hi) if b_hi is not True else (None, None)
    if s_lo is None:
        gw, gs = fake_quant_grads(grad, w, se_hi, v_hi, r_hi, qn_hi, qp_hi, b_hi)
        _accumulate(acc_hi, seg, gs)
        return gw
    se_lo, qn_lo, qp_lo, b_lo = _expand(seg, s_lo, t_lo, has_binary)
    v_lo, r_lo = _codes(w, se_lo, qn_lo, qp_lo)
    me = mask.index_select(0, seg)
    if hard:
        take = me > 0.5
        g_hi, g_lo = torch.where(take, grad, 0.0), torch.where(take, 0.0, grad)
    else:
        g_hi = grad * me
        g_lo = grad - g_hi
        if acc_mask is not None:
            diff = dequantize(v_hi, r_hi, se_hi, b_hi) - dequantize(v_lo, r_lo, se_lo, b_lo)
            _accumulate(acc_mask, seg, grad * diff)
    gw_hi, gs_hi = fake_quant_grads(g_hi, w, se_hi, v_hi, r_hi, qn_hi, qp_hi, b_hi)
    _accumulate(acc_hi, seg, gs_hi)
    del gs_hi
    gw_lo, gs_lo = fake_quant_grads(g_lo, w, se_lo, v_lo, r_lo, qn_lo, qp_lo, b_lo)
    _accumulate(acc_lo, seg, gs_lo)
    return gw_hi.add_(gw_lo)


class _SegmentQuant(torch.autograd.Function):
    """Fake quantization of a flat weight vector, each segment with its own step and range (``table[:, 0:3]`` =
    Qn, Qp, 1-bit flag; ``table[:, 3]`` = the LSQ gradient factor). With a second quantizer (``s_lo``, ``t_lo``)
    and a per-segment ``mask``: ``lo + mask * (hi - lo)`` (``hard=False``, the training mix, gradient to the mask)
    or ``where(mask > 0.5, hi, lo)`` (``hard=True``). Saves only its inputs; the codes are recomputed in backward.
    Chunks of :data:`CHUNK` elements bound the temporaries (one chunk: no extra kernel). Per element, the arithmetic is
    :func:`~sdq_lightning.quantizers.functional.fake_quant` and its ``fake_quant_grads``; this node adds the mix, the
    per-segment sums and factors, and computes both quantizers' codes once for the value and the gradients."""

    @staticmethod
    def forward(ctx, w, seg, s_hi, t_hi, s_lo, t_lo, mask, hard, has_binary):  # noqa: D102
        ctx.save_for_backward(w, seg, s_hi, t_hi, s_lo, t_lo, mask)
        ctx.flags = (bool(hard), has_binary)
        parts = _chunks(w.shape[0])
        if len(parts) == 1:
            return _forward_chunk(w, seg, s_hi, t_hi, s_lo, t_lo, mask, hard, has_binary)
        out = torch.empty_like(w)
        for sl in parts:
            out[sl] = _forward_chunk(w[sl], seg[sl], s_hi, t_hi, s_lo, t_lo, mask, hard, has_binary)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        w, seg, s_hi, t_hi, s_lo, t_lo, mask = ctx.saved_tensors
        hard, has_binary = ctx.flags
        mixed = s_lo is not None
        n_seg, dev = s_hi.shape[0], w.device
        acc = [torch.zeros(n_seg, dtype=torch.float64, device=dev) for _ in range(2 if mixed else 1)]
        acc_mask = torch.zeros(n_seg, dtype=torch.float64, device=dev) \
            if mixed and not hard and ctx.needs_input_grad[6] else None
        parts = _chunks(w.shape[0])
        args = (s_hi, t_hi, s_lo, t_lo, mask, hard, has_binary, acc[0], acc[-1] if mixed else None, acc_mask)
        if len(parts) == 1:
            gw = _backward_chunk(grad, w, seg, *args)
        else:
            gw = torch.empty_like(w)
            for sl in parts:
                gw[sl] = _backward_chunk(grad[sl], w[sl], seg[sl], *args)
        gs_hi = acc[0].to(s_hi.dtype) * t_hi[:, 3]
        if not mixed:
            return gw, None, gs_hi, None, None, None, None, None, None
        gs_lo = acc[1].to(s_lo.dtype) * t_lo[:, 3]
        gmask = None if acc_mask is None else acc_mask.to(mask.dtype)
        return gw, None, gs_hi, None, gs_lo, None, gmask, None, None


def segment_quantize(w: Tensor, seg: Tensor, s_hi: Tensor, t_hi: Tensor, s_lo: Tensor | None = None,
                     t_lo: Tensor | None = None, mask: Tensor | None = None, hard: bool = False,
                     has_binary: bool | str = True) -> Tensor:
    """Segment-wise LSQ fake quantization of the flat ``w`` (see :class:`_SegmentQuant`): ``seg`` gives each
    element's segment, ``s_*`` ``[segments]`` the steps, ``t_*`` ``[segments, 4]`` (Qn, Qp, 1-bit flag, LSQ
    gradient factor); with ``s_lo``/``t_lo``/``mask`` the mix of two quantizers. ``has_binary=False`` skips the 1-bit
    branch (no segment is 1-bit), ``"all"`` the multi-bit one (every segment is)."""
    return _SegmentQuant.apply(w, seg, s_hi, t_hi, s_lo, t_lo, mask, hard, has_binary)


# ----------------------------------------------------------------------------- groups of layers
class _Group:
    """Layers quantized together: constant index tensors built once (host arithmetic), on the weights' device."""

    def __init__(self, layers: list[nn.Module], frozen: bool) -> None:
        self.layers = layers
        self.quantizers: list[SDQWeightQuantizer] = [m.weight_quant for m in layers]
        self.frozen = frozen
        w0 = layers[0].weight
        dev = w0.device
        self.sizes = [m.weight.numel() for m in layers]
        self.shapes = [m.weight.shape for m in layers]
        for m, q in zip(layers, self.quantizers):
            q.ensure_table(m.weight)
        self.seg, self.seg_layer = segment_index(layers)
        tables = [q.lsq_table for q in self.quantizers]
        # [layers, candidates, 4] rows (Qn, Qp, grad factor, 1-bit) reordered to (Qn, Qp, 1-bit, grad factor)
        if frozen:
            rows = [t[q.frozen_at] for t, q in zip(tables, self.quantizers)]
            one_bit = [q.bits == 1 for q in self.quantizers]
            self.has_binary = "all" if all(one_bit) else any(one_bit)
            t = torch.stack(rows)[:, [0, 1, 3, 2]].to(dev)
            self.table = t.index_select(0, self.seg_layer).to(w0.dtype)  # [segments, 4], constant
            return
        self.has_binary = any(q.candidates[0] == 1 for q in self.quantizers)
        self.table = torch.stack(tables)[:, :, [0, 1, 3, 2]].to(device=dev, dtype=w0.dtype)  # [L, n, 4]
        self.keys = torch.tensor([q.stream for q in self.quantizers], dtype=torch.long, device=dev)
        self.n = len(self.quantizers[0].candidates)
        self.estimator = self.quantizers[0].estimator_impl
        self.mix_eps = self.quantizers[0].mix_eps
        self.arange = torch.arange(len(layers), device=dev)

    def _flat(self) -> Tensor:
        return torch.cat([m.weight.reshape(-1) for m in self.layers])

    def _split(self, out: Tensor) -> list[Tensor]:
        return [o.view(shape) for o, shape in zip(out.split(self.sizes), self.shapes)]

    def run_frozen(self, training: bool) -> list[Tensor]:
        qs = self.quantizers
        steps = torch.cat([q.frozen_step.reshape(-1) for q in qs])
        w = self._flat()
        out = segment_quantize(w, self.seg, steps.to(w.dtype), self.table, has_binary=self.has_binary)
        if training and torch.is_grad_enabled() and distributed():
            # keep the frozen DBPs in the graph (zero gradient), as each quantizer's forward does
            dbps = [q.dbp.sum() for q in qs if q.dbp.requires_grad]
            if dbps:
                out = out + 0.0 * torch.stack(dbps).sum().to(out.dtype)
        return self._split(out)

    def run_search(self, training: bool) -> list[Tensor]:
        qs = self.quantizers
        if training:
            torch._foreach_add_([q.draw_step for q in qs], 1)
        levels = torch.stack([q.level for q in qs])                         # [L]
        lo_i = (levels - 1).clamp_min(0)
        dbp = torch.stack([q.dbp for q in qs])                              # [L, n], differentiable
        steps = torch.cat([q.steps.view(self.n, -1) for q in qs], dim=1)    # [n, segments], differentiable
        w = self._flat()
        hi_seg, lo_seg = levels.index_select(0, self.seg_layer), lo_i.index_select(0, self.seg_layer)
        s_hi = steps.gather(0, hi_seg.view(1, -1)).view(-1).to(w.dtype)
        s_lo = steps.gather(0, lo_seg.view(1, -1)).view(-1).to(w.dtype)
        t_hi = self.table[self.arange, levels].index_select(0, self.seg_layer)
        t_lo = self.table[self.arange, lo_i].index_select(0, self.seg_layer)
        live = dbp.gather(1, levels.view(-1, 1)).view(-1)
        if not training:  # evaluation: the current deterministic decision
            take, index = progressive_choice(live, levels, lo_i)
            torch._foreach_copy_([q.last_index for q in qs], index.unbind(0))
            mask = take.to(w.dtype).index_select(0, self.seg_layer)
            out = segment_quantize(w, self.seg, s_hi, t_hi, s_lo, t_lo, mask, hard=True, has_binary=self.has_binary)
            return self._split(out)
        u = counter_uniform_many(self.keys, torch.stack([q.draw_step for q in qs]))
        mask, index = progressive_choice(live, levels, lo_i, self.estimator, self.mix_eps, u,
                                         torch.stack([q.temperature for q in qs]))
        torch._foreach_copy_([q.last_index for q in qs], index.unbind(0))
        out = segment_quantize(w, self.seg, s_hi, t_hi, s_lo, t_lo, mask.to(w.dtype).index_select(0, self.seg_layer),
                               hard=False, has_binary=self.has_binary)
        return self._split(out)


# ----------------------------------------------------------------------------- the network wrapper
class BatchedWeights:
    """Installed as ``net.forward`` (on the instance): quantizes the weights of every batchable layer in one pass,
    then runs the network's own forward, whose layers take their precomputed weight (see the module docstring).

    Args:
        net: the network holding :class:`~sdq_lightning.modules.QuantConv2d` / ``QuantLinear`` layers.
        enabled: off = the network's own forward, unchanged (``enabled`` may be switched at any time).
    """

    def __init__(self, net: nn.Module, enabled: bool = True) -> None:
        if "forward" in vars(net):
            raise ValueError(f"{type(net).__name__}.forward is already replaced on the instance (another wrapper); "
                             f"BatchedWeights needs the class's own forward")
        self.net, self.enabled = net, bool(enabled)
        self.layers: list[nn.Module] = []
        self._key: tuple | None = None
        self._groups: list[_Group] = []
        self.builds = 0  # how many times the groups were built (once, then at each freeze)
        self.refresh()
        net.forward = self

    def refresh(self) -> None:
        """List the network's quantized layers again (after a surgery that replaced some) and drop the groups."""
        self.layers = [m for m in self.net.modules() if is_quant_layer(m)]
        self._key, self._groups = None, []

    def _state_key(self) -> tuple:
        first = self.layers[0].weight if self.layers else None
        return (None if first is None else (first.device, first.dtype)), structure_key(self.layers)

    def groups(self) -> list[_Group]:
        """The batched groups for the quantizers' current state (rebuilt when a layer froze or was replaced)."""
        key = self._state_key()
        if key != self._key:
            # built as normal tensors even when the first call is an evaluation under inference mode: training
            # saves them for backward later, which inference tensors cannot be
            with torch.inference_mode(False), torch.no_grad():
                self._groups = self._build()
            self._key = key
            self.builds += 1
        return self._groups

    def _build(self) -> list[_Group]:
        if not self.layers:
            return []
        dtype = self.layers[0].weight.dtype
        frozen, search = [], {}
        for m in self.layers:
            q = m.weight_quant
            if q is None or m.weight.dtype != dtype:
                continue
            if q.frozen:
                frozen.append(m)
            elif q.vectorizable:
                search.setdefault((len(q.candidates), q.estimator, q.mix_eps), []).append(m)
        out = [_Group(ms, frozen=False) for ms in search.values()]
        # frozen layers in two groups, multi-bit and 1-bit: neither then computes the other's branch for every weight
        for ms in ([m for m in frozen if m.weight_quant.bits > 1], [m for m in frozen if m.weight_quant.bits == 1]):
            if ms:
                out.append(_Group(ms, frozen=True))
        return out

    def prepare(self) -> list[nn.Module]:
        """Compute the batched weights and hand each layer its own (taken by its next forward). Returns the layers
        that received one."""
        training = self.net.training
        given = []
        for g in self.groups():
            outs = g.run_frozen(training) if g.frozen else g.run_search(training)
            for m, wq in zip(g.layers, outs):
                m._batched_weight = wq
            given += g.layers
        return given

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or torch.compiler.is_compiling():
            return type(self.net).forward(self.net, *args, **kwargs)
        given = self.prepare()
        try:
            return type(self.net).forward(self.net, *args, **kwargs)
        finally:
            for m in given:  # a layer the forward did not reach must not keep a stale weight
                m._batched_weight = None

    def __getstate__(self) -> dict:
        # a pickled network (torch.save of the whole module) carries the switch, not the cached index tensors
        state = dict(self.__dict__)
        state["_key"], state["_groups"] = None, []
        return state

    def remove(self) -> None:
        """Give the network its own forward back."""
        if vars(self.net).get("forward") is self:
            del self.net.forward


def batch_weights(net: nn.Module, enabled: bool = True) -> BatchedWeights:
    """Install :class:`BatchedWeights` on ``net``, or refresh and return the one already there."""
    current = vars(net).get("forward")
    if isinstance(current, BatchedWeights):  # (the SDQ callback calls this at every setup: fit, validate, test)
        current.enabled = bool(enabled)
        current.refresh()
        return current
    return BatchedWeights(net, enabled)
