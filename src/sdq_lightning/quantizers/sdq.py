"""The SDQ stochastic mixed-bitwidth weight quantizer with Differentiable Bitwidth Parameters (DBPs).

One quantizer per layer holds a sorted candidate set ``B = (b_1 < ... < b_n)``, one LSQ step size per candidate and
one DBP ``beta_i`` per candidate. ``beta_i`` is the probability of using ``b_i`` rather than the adjacent lower
``b_{i-1}``.

Readings (see ``docs/method.md``):

* ``progressive`` (default): only the DBP of the layer's current level ``i`` is live. When it falls below the drop
  threshold the owner (the SDQ callback, or :func:`sdq_lightning.budget.drop_levels_`) moves the layer one level
  down and re-initialises the new live DBP. At the lowest candidate no DBP is live.
* ``cascade``: every DBP is live; ``P(b_n) = beta_n``, ``P(b_i) = beta_i prod_{j>i}(1 - beta_j)`` and
  ``P(b_1) = prod_{j>1}(1 - beta_j)``.

Estimators: ``gumbel`` (straight-through relaxed Bernoulli / Gumbel-softmax with temperature) and ``ste`` (hard sample
forward, expectation backward: ``dL/dbeta = sum(dL/dw_q * (Q_hi(w) - Q_lo(w)))``).

Sampling is one draw per layer per training step, reproducible from ``(seed, layer_id, draw step)``, so every
data-parallel rank draws the same bitwidth when the owner sets the draw step from the global step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sdq_lightning.quantizers.functional import (
    MAX_BITS,
    MIN_BITS,
    int_range,
    lsq_grad_factor,
    quantize_weight,
    weight_step_init,
)

__all__ = ["ESTIMATORS", "READINGS", "SDQWeightQuantizer", "validate_candidates"]

READINGS = ("progressive", "cascade")
ESTIMATORS = ("gumbel", "ste")
_EPS = 1e-6


def validate_candidates(candidates: Sequence[int], name: str = "candidates") -> tuple[int, ...]:
    """Check a candidate bit set: non-empty, integers in 1..8, strictly increasing. Returns it as a tuple."""
    try:
        cands = tuple(candidates)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of integers in [{MIN_BITS}, {MAX_BITS}], got {candidates!r}")
    if not cands:
        raise ValueError(f"{name} must be a non-empty sequence of integers in [{MIN_BITS}, {MAX_BITS}], got ()")
    for b in cands:
        if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(f"{name} must hold integers in [{MIN_BITS}, {MAX_BITS}], got {b!r} in {cands}")
    if len(set(cands)) != len(cands):
        raise ValueError(f"{name} must not contain duplicates, got {cands}")
    if list(cands) != sorted(cands):
        raise ValueError(f"{name} must be sorted in increasing order, got {cands}")
    return cands


def _mix_seed(*parts: int) -> int:
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def _ste_clamp01(x: Tensor) -> Tensor:
    """Clamp to [0, 1] in the forward pass, identity gradient (so a DBP pushed outside can come back)."""
    return x + (x.clamp(0.0, 1.0) - x).detach()


class SDQWeightQuantizer(nn.Module):
    """Stochastic mixed-bitwidth weight quantizer (see module docstring).

    Args:
        candidates: sorted candidate bitwidths in 1..8. A single candidate makes a fixed-bitwidth LSQ quantizer.
        reading: ``"progressive"`` or ``"cascade"``.
        estimator: ``"gumbel"`` or ``"ste"``.
        weight: the layer weight, used to initialise one step per candidate (and the channel count if
            ``per_channel``). Without it steps start at 1 and must be initialised with :meth:`reset_steps`.
        per_channel: one step per output channel and candidate.
        seed: global sampling seed.
        layer_id: per-layer sampling stream (the surgery passes a hash of the layer name).
        init_dbp: initial value of every DBP.
    """

    def __init__(
        self,
        candidates: Sequence[int] = tuple(range(1, 9)),
        reading: str = "progressive",
        estimator: str = "gumbel",
        weight: Tensor | None = None,
        per_channel: bool = False,
        seed: int = 0,
        layer_id: int = 0,
        init_dbp: float = 1.0,
    ) -> None:
        super().__init__()
        self.candidates = validate_candidates(candidates)
        if reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not 0.0 <= init_dbp <= 1.0:
            raise ValueError(f"init_dbp must be in [0, 1], got {init_dbp!r}")
        self.reading = reading
        self.estimator = estimator
        self.per_channel = bool(per_channel)
        self.seed = int(seed)
        self.layer_id = int(layer_id)
        n = len(self.candidates)
        if per_channel and weight is None:
            raise ValueError("per_channel=True needs the layer weight to know the channel count")
        shape = (n, weight.shape[0]) if per_channel else (n,)
        self.steps = nn.Parameter(torch.ones(shape))
        self.dbp = nn.Parameter(torch.full((n,), float(init_dbp)))
        self.register_buffer("level", torch.tensor(n - 1, dtype=torch.long))
        self.register_buffer("frozen_index", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("draw_step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("temperature", torch.tensor(1.0))
        self._level = n - 1
        self._frozen_index = -1
        self.last_bits: int | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync())
        if n == 1:  # a fixed bitwidth: no DBP to learn
            self.dbp.requires_grad_(False)
            self.freeze(self.candidates[0])
        if weight is not None:
            self.reset_steps(weight)

    # ----------------------------------------------------------------- state
    def _sync(self) -> None:
        self._level = int(self.level)
        self._frozen_index = int(self.frozen_index)

    def extra_repr(self) -> str:
        state = f"frozen={self.bits}" if self.frozen else f"level={self.candidates[self._level]}"
        return f"candidates={self.candidates}, reading={self.reading}, estimator={self.estimator}, {state}"

    @property
    def frozen(self) -> bool:
        return self._frozen_index >= 0

    @property
    def bits(self) -> int:
        """The bitwidth used now: the frozen one, else the current decision (see :meth:`decide`)."""
        return self.candidates[self._frozen_index] if self.frozen else self.decide()

    @property
    def current_level(self) -> int:
        return self._level

    def set_level(self, index: int, reinit_dbp: float | None = 1.0) -> None:
        """Move the progressive level to candidate ``index``; optionally re-initialise its DBP."""
        if not 0 <= index < len(self.candidates):
            raise ValueError(f"level must be in [0, {len(self.candidates) - 1}], got {index}")
        self.level.fill_(index)
        self._level = index
        if reinit_dbp is not None:
            with torch.no_grad():
                self.dbp[index] = reinit_dbp

    def set_temperature(self, tau: float) -> None:
        if not tau > 0:
            raise ValueError(f"temperature must be > 0, got {tau!r}")
        self.temperature.fill_(float(tau))

    def set_draw_step(self, step: int) -> None:
        """Set the draw counter (the callback sets it to the trainer's global step before every batch)."""
        self.draw_step.fill_(int(step))

    @torch.no_grad()
    def clamp_dbp_(self) -> None:
        """Project the DBPs back into [0, 1] (call after each optimizer step)."""
        self.dbp.clamp_(0.0, 1.0)

    @torch.no_grad()
    def reset_steps(self, weight: Tensor) -> None:
        """Initialise the step of every candidate from ``weight`` (copied into the existing parameter)."""
        for i, b in enumerate(self.candidates):
            self.steps[i].copy_(weight_step_init(weight, b, self.per_channel).to(self.steps.dtype))

    def index_of(self, bits: int) -> int:
        if bits not in self.candidates:
            raise ValueError(f"bits must be one of the candidates {self.candidates}, got {bits!r}")
        return self.candidates.index(bits)

    def freeze(self, bits: int | None = None) -> int:
        """Fix the bitwidth (default: the current decision). Returns the frozen bitwidth."""
        b = self.decide() if bits is None else bits
        i = self.index_of(b)
        self.frozen_index.fill_(i)
        self._frozen_index = i
        return b

    def unfreeze(self) -> None:
        if len(self.candidates) == 1:
            return
        self.frozen_index.fill_(-1)
        self._frozen_index = -1

    # ----------------------------------------------------------- probabilities
    def _live_beta(self) -> Tensor:
        return _ste_clamp01(self.dbp[self._level])

    def probabilities(self) -> Tensor:
        """Probability of each candidate under the current DBPs (differentiable; one-hot when frozen)."""
        n = len(self.candidates)
        if self.frozen:
            return torch.nn.functional.one_hot(torch.tensor(self._frozen_index), n).to(self.dbp.dtype)
        if self.reading == "progressive":
            p = torch.zeros(n, dtype=self.dbp.dtype, device=self.dbp.device)
            if self._level == 0:
                return p + torch.nn.functional.one_hot(torch.tensor(0, device=p.device), n).to(p.dtype)
            beta = self._live_beta()
            onehot_hi = torch.nn.functional.one_hot(torch.tensor(self._level, device=p.device), n).to(p.dtype)
            onehot_lo = torch.nn.functional.one_hot(torch.tensor(self._level - 1, device=p.device), n).to(p.dtype)
            return beta * onehot_hi + (1 - beta) * onehot_lo
        beta = _ste_clamp01(self.dbp)
        probs = []
        remain = torch.ones((), dtype=beta.dtype, device=beta.device)
        for i in range(n - 1, 0, -1):
            probs.append(remain * beta[i])
            remain = remain * (1 - beta[i])
        probs.append(remain)
        return torch.stack(probs[::-1])

    def expected_bits(self) -> Tensor:
        """Differentiable expected bitwidth under the DBPs (a constant when frozen or at the lowest level)."""
        if self.frozen:
            return torch.tensor(float(self.candidates[self._frozen_index]), dtype=self.dbp.dtype)
        if self.reading == "progressive":
            if self._level == 0:
                return torch.tensor(float(self.candidates[0]), dtype=self.dbp.dtype)
            hi, lo = self.candidates[self._level], self.candidates[self._level - 1]
            return lo + (hi - lo) * self._live_beta()
        c = torch.tensor(self.candidates, dtype=self.dbp.dtype, device=self.dbp.device)
        return (self.probabilities() * c).sum()

    def decide(self) -> int:
        """Deterministic decision used at the phase boundary (progressive: b_i if beta_i >= 0.5 else b_{i-1};
        cascade: the most probable candidate)."""
        if self.frozen:
            return self.candidates[self._frozen_index]
        if self.reading == "progressive":
            if self._level == 0 or float(self.dbp[self._level].detach()) >= 0.5:
                return self.candidates[self._level]
            return self.candidates[self._level - 1]
        return self.candidates[int(self.probabilities().detach().argmax())]

    # ------------------------------------------------------------- quantizers
    def _step(self, i: int, w: Tensor) -> Tensor:
        s = self.steps[i]
        if self.per_channel:
            s = s.view(-1, *([1] * (w.dim() - 1)))
        return s.to(w.dtype)

    def quantize_at(self, w: Tensor, index: int) -> Tensor:
        """Deterministic ``Q_{b_index}(w)`` with that candidate's step."""
        b = self.candidates[index]
        qp = int_range(b, signed=True)[1]
        numel = w.numel() // (w.shape[0] if self.per_channel else 1)
        return quantize_weight(w, self._step(index, w), b, lsq_grad_factor(numel, qp))

    @torch.no_grad()
    def integer_weight(self, w: Tensor) -> tuple[Tensor, Tensor, int]:
        """Integer codes, step and bits of the frozen quantizer: ``Q(w) == codes * step``."""
        if not self.frozen:
            raise ValueError("integer_weight needs a frozen quantizer; call freeze(bits) first")
        i, b = self._frozen_index, self.candidates[self._frozen_index]
        s = self._step(i, w)
        if b == 1:
            codes = torch.where(w / s >= 0, 1, -1)
        else:
            qn, qp = int_range(b, signed=True)
            codes = torch.clamp(w * (1.0 / s), qn, qp).round()  # the arithmetic of lsq_quantize
        return codes.to(torch.int8), s.detach().clone(), b

    # ----------------------------------------------------------------- sampling
    def _uniforms(self, k: int) -> Tensor:
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.layer_id, int(self.draw_step)))
        return torch.rand(k, generator=gen, dtype=torch.float64).clamp(_EPS, 1 - _EPS)

    def _sample_mask(self, probs_or_beta: Tensor, hard: Tensor, u: Tensor) -> Tensor:
        """Straight-through mask: forward = hard sample, backward = soft (gumbel) or expectation (ste)."""
        if self.estimator == "ste":
            soft = probs_or_beta
        else:
            tau = float(self.temperature)
            if probs_or_beta.dim() == 0:
                beta = probs_or_beta.clamp(_EPS, 1 - _EPS)
                noise = float(math.log(u[0]) - math.log1p(-float(u[0])))
                soft = torch.sigmoid((torch.log(beta) - torch.log1p(-beta) + noise) / tau)
            else:
                gumbel = -torch.log(-torch.log(u.to(probs_or_beta.dtype)))
                soft = torch.softmax((torch.log(probs_or_beta.clamp_min(_EPS)) + gumbel) / tau, dim=0)
        return hard + soft - soft.detach()

    def _touch_dbp(self, out: Tensor) -> Tensor:
        """Keep a DBP that takes no part in this forward in the graph (zero gradient), so DDP without
        ``find_unused_parameters`` sees every parameter used."""
        if self.training and self.dbp.requires_grad and torch.is_grad_enabled():
            return out + 0.0 * self.dbp.sum().to(out.dtype)
        return out

    def forward(self, w: Tensor) -> Tensor:
        if self.frozen:
            self.last_bits = self.candidates[self._frozen_index]
            return self._touch_dbp(self.quantize_at(w, self._frozen_index))
        if self.training:
            self.draw_step.add_(1)
        if self.reading == "progressive":
            return self._forward_progressive(w)
        return self._forward_cascade(w)

    def _forward_progressive(self, w: Tensor) -> Tensor:
        lvl = self._level
        if lvl == 0:
            self.last_bits = self.candidates[0]
            return self._touch_dbp(self.quantize_at(w, 0))
        beta = self._live_beta()
        if not self.training:  # evaluation uses the current deterministic decision
            i = lvl if float(beta) >= 0.5 else lvl - 1
            self.last_bits = self.candidates[i]
            return self.quantize_at(w, i)
        if self.estimator == "gumbel":
            u = self._uniforms(1)
            noise = math.log(float(u[0])) - math.log1p(-float(u[0]))
            b = float(beta.detach().clamp(_EPS, 1 - _EPS))
            take_hi = (math.log(b) - math.log1p(-b) + noise) > 0
        else:
            u = self._uniforms(1)
            take_hi = float(u[0]) < float(beta.detach())
        hard = torch.tensor(1.0 if take_hi else 0.0, dtype=beta.dtype, device=beta.device)
        mask = self._sample_mask(beta, hard, u).to(w.dtype)
        hi = self.quantize_at(w, lvl)
        lo = self.quantize_at(w, lvl - 1)
        self.last_bits = self.candidates[lvl if take_hi else lvl - 1]
        return lo + mask * (hi - lo)

    def _forward_cascade(self, w: Tensor) -> Tensor:
        probs = self.probabilities()
        if not self.training:
            i = int(probs.detach().argmax())
            self.last_bits = self.candidates[i]
            return self.quantize_at(w, i)
        n = len(self.candidates)
        u = self._uniforms(n)
        if self.estimator == "gumbel":
            gumbel = -torch.log(-torch.log(u))
            i = int((torch.log(probs.detach().double().clamp_min(_EPS)) + gumbel).argmax())
        else:
            cdf = torch.cumsum(probs.detach().double(), 0)
            i = min(int(torch.searchsorted(cdf, u[0:1] * cdf[-1])), n - 1)
        hard = torch.nn.functional.one_hot(torch.tensor(i), n).to(probs.dtype).to(probs.device)
        mask = self._sample_mask(probs, hard, u).to(w.dtype)
        self.last_bits = self.candidates[i]
        out = mask[i] * self.quantize_at(w, i)
        for j in range(n):  # the other candidates carry gradient to the DBPs only through the mask
            if j != i:
                out = out + mask[j] * self.quantize_at(w, j).detach()
        return out
