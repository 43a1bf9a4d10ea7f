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

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from sdq_lightning.quantizers.functional import int_range

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
    x = x2 * (1.0 / step.detach().reshape(-1, 1).to(w.dtype))  # as the quantizer: codes agree at exact ties
    if bits == 1:
        codes = torch.where(x >= 0, 1.0, -1.0).to(x.dtype).detach()
        idx, nbins = (codes > 0).long(), 2
    else:
        qn, qp = int_range(bits, signed=True)
        codes = torch.clamp(torch.round(x), qn, qp).detach()
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

    def layer_factor(self, bits: int, occupancy: Tensor) -> float:
        f = {"uniform": 1.0, "inv_bits": 1.0 / bits, "inv_pow2": 1.0 / 2**bits}[self.weighting]
        if self.entropy_weight > 0:
            p = occupancy[occupancy > 0]
            h = float(-(p * p.log()).sum()) / math.log(max(occupancy.numel(), 2))
            f += self.entropy_weight * (1.0 - h)
        return f

    def forward(self, layers: Iterable[nn.Module]) -> Tensor:
        terms = []
        for layer in layers:
            wq = layer.weight_quant
            if wq is None or not wq.frozen:
                continue
            i, bits = wq._frozen_index, wq.bits
            step = wq.steps[i]
            loss, occ = bin_regularization(layer.weight, step, bits)
            terms.append(self.layer_factor(bits, occ) * loss)
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).mean()
