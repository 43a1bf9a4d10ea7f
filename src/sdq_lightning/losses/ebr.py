"""Entropy-aware Bin Regularization (EBR), reconstructed on Bin Regularization (Han et al., ICCV 2021).

For a frozen layer with step ``s`` and integer levels ``i``, bins ``W_i = {w : code(w) = i}`` (membership is
stop-gradient). Per layer, averaged over non-empty bins and measured in units of the step (so layers of any scale
weigh alike; the step itself is not trained by this term)::

    L_BR = mean_i [ (mean(W_i)/s - i)^2 + Var(W_i)/s^2 ] = mean_i mean_{w in W_i} (w/s - i)^2

"Entropy-aware" is not recoverable exactly from the paper; options (see docs/method.md):

* ``weighting``: per-layer factor ``1`` (default), ``1/b`` or ``1/2^b`` by the layer's bitwidth;
* ``entropy_weight`` > 0 adds ``entropy_weight * (1 - H(occupancy) / log(levels))`` to each layer's factor, so layers
  whose weights crowd into few bins are regularised harder (default 0: off).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from sdq_lightning.modules.batched import CHUNK, segment_index, segment_sum
from sdq_lightning.quantizers.functional import binary_codes, int_range, lsq_codes, lsq_quotient
from sdq_lightning.quantizers.sdq import structure_key

__all__ = ["EBR_WEIGHTINGS", "EntropyBinRegularizer", "bin_regularization"]

EBR_WEIGHTINGS = ("uniform", "inv_bits", "inv_pow2")


def bin_regularization(w: Tensor, step: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Bin regularization of one weight tensor; returns ``(loss, occupancy)`` (occupancy as bin fractions).

    Per bin, ``(mean(W_i) - c_i)^2 + Var(W_i)`` equals the mean squared distance of the bin's weights to its centre
    ``c_i``, so the loss is ``sum_j (x_j - c_j)^2 / (K n_j)`` with ``n_j`` the size of ``x_j``'s bin and ``K`` the
    number of non-empty bins. Bin sizes come from an integer ``bincount`` (stop-gradient), which keeps the result
    bitwise reproducible (no floating-point scatter).
    """
    per_channel = step.dim() > 0 and step.numel() > 1
    x2 = w.flatten(1) if per_channel else w.reshape(1, -1)
    x = lsq_quotient(x2, step.detach().reshape(-1, 1).to(w.dtype))
    if bits == 1:
        codes = binary_codes(x.detach())
        idx, nbins = (codes > 0).long(), 2
    else:
        qn, qp = int_range(bits, signed=True)
        codes = lsq_codes(x.detach(), qn, qp)
        idx, nbins = (codes - qn).long(), qp - qn + 1
    flat = (idx + torch.arange(x.shape[0], device=x.device).unsqueeze(1) * nbins).flatten()
    # index_add_ with a known size, not bincount: bincount sizes its output from the data (a host read on CUDA)
    counts = torch.zeros(x.shape[0] * nbins, dtype=torch.long, device=x.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    nonempty = (counts > 0).sum()
    weight = 1.0 / (counts[flat].to(x.dtype) * nonempty)
    loss = (weight * (x.flatten() - codes.flatten()) ** 2).sum()
    occupancy = counts.view(x.shape[0], nbins).sum(0).to(x.dtype) / x.numel()
    return loss, occupancy


class EntropyBinRegularizer(nn.Module):
    """EBR over a set of frozen quantized layers; ``forward(layers)`` returns a scalar tensor."""

    def __init__(self, weighting: str = "uniform", entropy_weight: float = 0.0) -> None:
        super().__init__()
        if weighting not in EBR_WEIGHTINGS:
            raise ValueError(f"EBR weighting must be one of {EBR_WEIGHTINGS}, got {weighting!r}")
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight!r}")
        self.weighting = weighting
        self.entropy_weight = float(entropy_weight)
        self.batched_max_weights = CHUNK  # the one-pass form up to this many weights in all (see forward)
        self._batched: tuple | None = None  # (key, _BatchedBins) for the current frozen layers

    def layer_factor(self, bits: int, occupancy: Tensor) -> float:
        f = {"uniform": 1.0, "inv_bits": 1.0 / bits, "inv_pow2": 1.0 / 2**bits}[self.weighting]
        if self.entropy_weight > 0:
            p = occupancy[occupancy > 0]
            h = float(-(p * p.log()).sum()) / math.log(max(occupancy.numel(), 2))
            f += self.entropy_weight * (1.0 - h)
        return f

    @staticmethod
    def _frozen(layers: Iterable[nn.Module]) -> list[nn.Module]:
        return [m for m in layers if m.weight_quant is not None and m.weight_quant.frozen]

    def forward(self, layers: Iterable[nn.Module]) -> Tensor:
        layers = self._frozen(layers)
        if not layers:
            return torch.zeros(())
        if self._fits_one_pass(layers):
            key = structure_key(layers)
            cache = self._batched
            if cache is None or cache[0] != key:
                with torch.inference_mode(False), torch.no_grad():
                    cache = self._batched = (key, _BatchedBins(layers))
            return cache[1].loss(self)
        return self.per_layer(layers)

    def one_pass(self, layers: Iterable[nn.Module]) -> bool:
        """Whether ``forward`` computes these (frozen) layers in one pass, which never reads the device from the host.

        One pass when every weight fits one chunk of the batched weights (small models, where launches are what
        count); above, its autograd graph would keep several weight-sized tensors, and per-layer kernels are large
        enough for launches not to matter."""
        layers = self._frozen(layers)
        return bool(layers) and self._fits_one_pass(layers)

    def _fits_one_pass(self, frozen: list[nn.Module]) -> bool:
        return sum(m.weight.numel() for m in frozen) <= self.batched_max_weights and \
            len({(m.weight.device, m.weight.dtype) for m in frozen}) == 1

    def per_layer(self, layers: Iterable[nn.Module]) -> Tensor:
        """The regulariser layer by layer (:func:`bin_regularization` each): the reference of the batched form."""
        terms = []
        for layer in layers:
            wq = layer.weight_quant
            if wq is None or not wq.frozen:
                continue
            bits, step = wq.bits, wq.frozen_step
            loss, occ = bin_regularization(layer.weight, step, bits)
            terms.append(self.layer_factor(bits, occ) * loss)
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).mean()


class _BatchedBins:
    """EBR of every frozen layer in one pass over their concatenated weights (a fixed number of kernels instead of
    about 40 per layer and step; on a GPU those ran eager next to the graphed network). Bins are numbered across all
    segments (a layer, or each output channel of a per-channel layer); counts, occupancy and the per-layer sums are
    index additions over those numbers, the sums accumulated in float64. Equal to :meth:`EntropyBinRegularizer.
    per_layer` up to float rounding (``tests/unit/test_losses.py``), and the entropy factor stays on the device (the
    per-layer form reads it back to the host once per layer)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        w0 = layers[0].weight
        dev, dtype = w0.device, w0.dtype
        self.seg, self.layer_of_seg = segment_index(layers)
        self.n_layers = len(layers)
        self.layer_of_elem = self.layer_of_seg.index_select(0, self.seg)
        bits = [m.weight_quant.bits for m in layers]
        ranges = [int_range(b, signed=True) for b in bits]  # (-1, 1) at 1 bit: two bins, not three
        layer_nbins = [2 if b == 1 else qp - qn + 1 for b, (qn, qp) in zip(bits, ranges)]
        seg_layer = self.layer_of_seg.tolist()  # host lists, once
        seg_nbins = [layer_nbins[li] for li in seg_layer]
        bin_base = [0, *itertools.accumulate(seg_nbins)]
        self.n_bins = bin_base[-1]
        self.bin_base = torch.tensor(bin_base[:-1], dtype=torch.long, device=dev)
        self.qn = torch.tensor([ranges[li][0] for li in seg_layer], dtype=dtype, device=dev)
        self.qp = torch.tensor([ranges[li][1] for li in seg_layer], dtype=dtype, device=dev)
        self.binary = torch.tensor([bits[li] == 1 for li in seg_layer], device=dev)
        self.any_binary = 1 in bits
        # each segment's bin i -> its layer's bin i (the per-layer occupancy sums a per-channel layer's channels)
        layer_base = [0, *itertools.accumulate(layer_nbins)]
        self.n_layer_bins = layer_base[-1]
        to_layer = [layer_base[li] + i for li, n in zip(seg_layer, seg_nbins) for i in range(n)]
        self.bin_to_layer_bin = torch.tensor(to_layer, dtype=torch.long, device=dev)
        self.layer_of_layer_bin = torch.tensor([li for li, n in enumerate(layer_nbins) for _ in range(n)],
                                               dtype=torch.long, device=dev)
        self.bin_layer = self.layer_of_seg.repeat_interleave(torch.tensor(seg_nbins, device=dev))
        self.log_nbins = torch.tensor([math.log(max(n, 2)) for n in layer_nbins], dtype=dtype, device=dev)
        self.numel = torch.tensor([m.weight.numel() for m in layers], dtype=dtype, device=dev)
        self.bits = torch.tensor(bits, dtype=dtype, device=dev)

    def loss(self, reg: EntropyBinRegularizer) -> Tensor:
        layers = self.layers
        w = torch.cat([m.weight.reshape(-1) for m in layers])
        steps = torch.cat([m.weight_quant.frozen_step.reshape(-1) for m in layers])
        x = lsq_quotient(w, steps.detach().to(w.dtype).index_select(0, self.seg))
        qn, qp = self.qn.index_select(0, self.seg), self.qp.index_select(0, self.seg)
        codes = lsq_codes(x.detach(), qn, qp)
        local = codes - qn
        if self.any_binary:
            binary = self.binary.index_select(0, self.seg)
            sign = binary_codes(x.detach())
            codes = torch.where(binary, sign, codes)
            local = torch.where(binary, (sign > 0).to(x.dtype), local)
        flat = self.bin_base.index_select(0, self.seg) + local.long()
        counts = torch.zeros(self.n_bins, dtype=torch.long, device=w.device)
        counts.index_add_(0, flat, torch.ones_like(flat))  # a known size, no host read (bincount would size from data)
        nonempty = torch.zeros(self.n_layers, dtype=torch.long, device=w.device)
        nonempty.index_add_(0, self.bin_layer, (counts > 0).long())
        weight = 1.0 / (counts.index_select(0, flat).to(x.dtype) * nonempty.index_select(0, self.layer_of_elem))
        per_layer = segment_sum(weight * (x - codes) ** 2, self.layer_of_elem, self.n_layers)
        factor = {"uniform": torch.ones_like(self.bits), "inv_bits": 1.0 / self.bits,
                  "inv_pow2": 1.0 / torch.pow(2.0, self.bits)}[reg.weighting]
        if reg.entropy_weight > 0:
            occ = torch.zeros(self.n_layer_bins, dtype=x.dtype, device=w.device).index_add_(
                0, self.bin_to_layer_bin, counts.to(x.dtype))
            occ = occ / self.numel.index_select(0, self.layer_of_layer_bin)
            plogp = torch.where(occ > 0, occ * torch.log(occ.clamp_min(1e-30)), torch.zeros_like(occ))
            h = -segment_sum(plogp, self.layer_of_layer_bin, self.n_layers) / self.log_nbins
            factor = factor + reg.entropy_weight * (1.0 - h)
        return (factor.detach() * per_layer).mean()
