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

Device-side by construction (no host-device synchronisation in a training forward): the live level, the DBPs, the
draw counter and the temperature are device tensors; draws come from a counter-based generator
(:func:`~sdq_lightning.quantizers.functional.counter_uniform`); the choice between the two adjacent quantizers is
arithmetic (``lo + mask * (hi - lo)``), never a Python branch on a sampled value. Only the frozen bitwidth is a
Python value, set once at the phase boundary. ``torch.compile(fullgraph=True)`` traces a train-mode forward in one
graph, and level changes do not recompile it.

Gradient at every DBP value: ``gumbel`` samples the higher bitwidth with probability ``beta`` and relaxes
``logit(b) + (the same) logistic noise`` with ``b = eps + (1 - 2 eps) beta`` (``eps`` = ``mix_eps``, default 0.01)
for the backward pass, so the start state ``beta = 1`` carries a finite, non-zero task gradient (a clamp at
``1 - 1e-6`` gave exactly zero). ``ste`` (progressive) needs no mix; ``cascade`` relaxes the mixed product for both.

State: the candidate set, reading, estimator and frozen bitwidth travel in the state dict (``_extra_state``). A
searched state dict (one step and DBP per candidate) loads into a quantizer built for a subset of its candidates,
e.g. a frozen single-bitwidth model built from a plan: the matching rows are picked here, nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from sdq_lightning.quantizers.estimators import Estimator, estimator_index, estimator_name, get_estimator
from sdq_lightning.quantizers.functional import (
    MAX_BITS,
    MIN_BITS,
    MSE_STEP_MAX_BITS,
    STEP_INITS,
    binary_codes,
    counter_uniform,
    fake_quantize_dynamic,
    int_range,
    lsq_codes,
    lsq_grad_factor,
    lsq_quantize,
    lsq_quotient,
    quantize_weight,
    stream_key,
    weight_step_init,
    weight_step_mse,
)

__all__ = ["ESTIMATORS", "READINGS", "SDQWeightQuantizer", "distributed", "progressive_choice", "stackable",
           "stacked_expected_bits", "structure_key", "validate_candidates"]

READINGS = ("progressive", "cascade")
ESTIMATORS = ("gumbel", "ste")  # the built-in estimators; estimator_names() lists every registered one
_LEGACY_CANDIDATES = tuple(range(1, 9))  # state dicts written before the candidates were saved


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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
        mix_eps: the mix ``b = eps + (1 - 2 eps) beta`` (0 <= eps < 0.5) of the relaxation the DBP gradient goes
            through (``gumbel``; ``cascade`` for both estimators). Samples and the expected cost use ``beta``.
        step_init: how each candidate's step starts from the weight: ``"lsq"`` (``2 mean|w| / sqrt(Qp)``, LSQ's
            rule; ``mean|w|`` at 1 bit), ``"mse"`` (the step of least squared quantization error on a grid around
            it, :func:`~sdq_lightning.quantizers.functional.weight_step_mse`, at the widths up to
            :data:`~sdq_lightning.quantizers.functional.MSE_STEP_MAX_BITS` bits of a searched quantizer; LSQ's rule
            above and for a single candidate) or ``"mse_all"`` (the least-squares step at every width).
        step_follow: until a width is first drawn (progressive reading: the widths below the live pair), its step
            follows the weight's scale: :meth:`follow_weight_` (the callback calls it after every search step)
            multiplies it by the change of ``mean|w|`` (per channel with ``per_channel``). A width reached late in
            a search from scratch then starts at its ``step_init`` rule on the weights' current scale, not on the
            random initialisation's (which the weights outgrow several times over).
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
        mix_eps: float = 0.01,
        step_init: str = "lsq",
        step_follow: bool = False,
    ) -> None:
        super().__init__()
        if step_init not in STEP_INITS:
            raise ValueError(f"step_init must be one of {STEP_INITS}, got {step_init!r}")
        self.step_init = step_init
        self.step_follow = bool(step_follow)
        self.candidates = validate_candidates(candidates)
        if reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
        self._estimator = get_estimator(estimator, reading)  # raises a one-line error naming the registered ones
        if not 0.0 <= init_dbp <= 1.0:
            raise ValueError(f"init_dbp must be in [0, 1], got {init_dbp!r}")
        if not 0.0 <= mix_eps < 0.5:
            raise ValueError(f"mix_eps must be in [0, 0.5), got {mix_eps!r}")
        self.reading = reading
        self.estimator = estimator
        self.per_channel = bool(per_channel)
        self.seed = int(seed)
        self.layer_id = int(layer_id)
        self.mix_eps = float(mix_eps)
        self._key = stream_key(self.seed, self.layer_id)
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
        self.register_buffer("last_index", torch.tensor(n - 1, dtype=torch.long), persistent=False)
        self.register_buffer("bits_table", torch.tensor(self.candidates, dtype=torch.float32), persistent=False)
        # per candidate: Qn, Qp, the LSQ gradient factor and 1-bit flag, gathered by the dynamic (searching) forward
        self.register_buffer("lsq_table", torch.zeros(n, 4), persistent=False)
        # the weight scale the unused widths' steps follow (step_follow); NaN: not known (set at the next follow)
        self.register_buffer("_follow_scale", torch.full(shape[1:], float("nan")), persistent=False)
        # each candidate's index, shaped to broadcast against ``steps`` (step_follow's mask of the widths not drawn)
        self.register_buffer("_step_index", torch.arange(n).view(-1, *([1] * (len(shape) - 1))), persistent=False)
        self._table_numel = -1
        self._frozen_index = -1
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync())
        if n == 1:  # a fixed bitwidth: no DBP to learn
            self.dbp.requires_grad_(False)
            self.freeze(self.candidates[0])
        if weight is not None:
            self.reset_steps(weight)

    # ----------------------------------------------------------------- state
    def _sync(self) -> None:
        self._frozen_index = int(self.frozen_index)
        self._follow_scale.fill_(float("nan"))  # loaded steps belong to the loaded weights: follow from there

    def get_extra_state(self) -> Tensor:
        """The quantizer's identity as a small int64 tensor (so every state-dict value stays a tensor):
        ``[1 (format), reading index, estimator index, per_channel, n, b_1, ..., b_n]``."""
        return torch.tensor([1, READINGS.index(self.reading), estimator_index(self.estimator), int(self.per_channel),
                             len(self.candidates), *self.candidates], dtype=torch.long)

    @staticmethod
    def decode_extra_state(state: Tensor) -> dict:
        v = [int(x) for x in state.tolist()]
        n = v[4]
        return {"reading": READINGS[v[1]], "estimator": estimator_name(v[2]), "per_channel": bool(v[3]),
                "candidates": tuple(v[5:5 + n])}

    def set_extra_state(self, state: Tensor) -> None:
        pass  # the candidate rows were mapped in _load_from_state_dict; reading/estimator follow this module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        extra = state_dict.get(prefix + "_extra_state")
        steps = state_dict.get(prefix + "steps")
        saved = self.decode_extra_state(extra)["candidates"] if isinstance(extra, Tensor) else None
        if saved is None and steps is not None and steps.shape[0] != len(self.candidates):
            if steps.shape[0] != len(_LEGACY_CANDIDATES):
                error_msgs.append(f"{prefix}steps has {steps.shape[0]} rows but this quantizer has candidates "
                                  f"{self.candidates} and the state dict names none")
                return
            saved = _LEGACY_CANDIDATES
        if saved is not None and saved != self.candidates:
            self._map_rows(state_dict, prefix, saved, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _map_rows(self, state_dict, prefix, saved: tuple[int, ...], error_msgs) -> None:
        """Load a state saved over candidates ``saved`` into this quantizer's subset of them (e.g. a frozen model)."""
        missing = [b for b in self.candidates if b not in saved]
        if missing:
            error_msgs.append(f"{prefix}: the saved quantizer has candidates {saved}, which lack {missing} of "
                              f"this quantizer's {self.candidates}")
            return
        rows = torch.tensor([saved.index(b) for b in self.candidates])
        for key in ("steps", "dbp"):
            if prefix + key in state_dict:
                state_dict[prefix + key] = state_dict[prefix + key].index_select(0, rows)
        if prefix + "frozen_index" in state_dict:
            fi = int(state_dict[prefix + "frozen_index"])
            if fi >= 0:
                b = saved[fi]
                if b not in self.candidates:
                    error_msgs.append(f"{prefix}: the saved quantizer is frozen at {b} bits, not one of "
                                      f"{self.candidates}")
                    return
                new = self.candidates.index(b)
            else:
                new = -1 if len(self.candidates) > 1 else 0
            state_dict[prefix + "frozen_index"] = torch.tensor(new, dtype=torch.long)
        if prefix + "level" in state_dict:
            lvl = saved[int(state_dict[prefix + "level"])]
            below = [i for i, b in enumerate(self.candidates) if b <= lvl]
            state_dict[prefix + "level"] = torch.tensor(below[-1] if below else 0, dtype=torch.long)
        state_dict[prefix + "_extra_state"] = self.get_extra_state()

    def extra_repr(self) -> str:
        state = f"frozen={self.bits}" if self.frozen else "searching"
        return f"candidates={self.candidates}, reading={self.reading}, estimator={self.estimator}, {state}"

    @property
    def frozen(self) -> bool:
        return self._frozen_index >= 0

    @property
    def frozen_at(self) -> int:
        """The frozen candidate index as a Python int (-1 while searching): no device read."""
        return self._frozen_index

    @property
    def frozen_step(self) -> Tensor:
        """The step size of the frozen candidate (a view of :attr:`steps`, differentiable)."""
        if not self.frozen:
            raise ValueError("frozen_step needs a frozen quantizer")
        return self.steps[self._frozen_index]

    @property
    def estimator_impl(self) -> Estimator:
        """The registered :class:`~sdq_lightning.quantizers.Estimator` named by :attr:`estimator`."""
        return self._estimator

    @property
    def stream(self) -> int:
        """The key of this layer's sampling stream (from ``seed`` and ``layer_id``)."""
        return self._key

    @property
    def vectorizable(self) -> bool:
        """Whether its searching forward can run batched with other layers' (progressive reading, an elementwise
        estimator): :mod:`sdq_lightning.modules.batched`."""
        return self.reading == "progressive" and self._estimator.vectorized

    @property
    def bits(self) -> int:
        """The bitwidth used now: the frozen one, else the current decision (see :meth:`decide`; reads the device)."""
        return self.candidates[self._frozen_index] if self.frozen else self.decide()

    @property
    def current_level(self) -> int:
        """The live level (reads it from the device: for reporting, not for a training step)."""
        return int(self.level)

    @property
    def last_bits(self) -> int:
        """The bitwidth the last forward used (reads it from the device: for tests and reporting)."""
        return self.candidates[int(self.last_index)]

    def set_level(self, index: int, reinit_dbp: float | None = 1.0) -> None:
        """Move the progressive level to candidate ``index``; optionally re-initialise its DBP."""
        if not 0 <= index < len(self.candidates):
            raise ValueError(f"level must be in [0, {len(self.candidates) - 1}], got {index}")
        self.level.fill_(index)
        if reinit_dbp is not None:
            with torch.no_grad():
                self.dbp[index] = reinit_dbp

    def set_temperature(self, tau: float | Tensor) -> None:
        if not isinstance(tau, Tensor) and not tau > 0:
            raise ValueError(f"temperature must be > 0, got {tau!r}")
        self.temperature.fill_(tau)

    def set_draw_step(self, step: int | Tensor) -> None:
        """Set the draw counter (the callback sets it to the trainer's global step before every batch)."""
        self.draw_step.fill_(step)

    @torch.no_grad()
    def clamp_dbp_(self) -> None:
        """Project the DBPs back into [0, 1] (call after each optimizer step)."""
        self.dbp.clamp_(0.0, 1.0)

    @torch.no_grad()
    def reset_steps(self, weight: Tensor) -> None:
        """Initialise the step of every candidate from ``weight`` (copied into the existing parameter)."""
        rule = getattr(self, "step_init", "lsq")
        for i, b in enumerate(self.candidates):
            # "mse": the widths a search decides between, up to 4 bits; a layer at a fixed width keeps LSQ's rule
            mse = rule == "mse_all" or (rule == "mse" and b <= MSE_STEP_MAX_BITS and len(self.candidates) > 1)
            init = weight_step_mse if mse else weight_step_init
            self.steps[i].copy_(init(weight, b, self.per_channel).to(self.steps.dtype))
        self._fill_table(weight)
        self.follow_from_(weight)

    def _scale_of(self, weight: Tensor) -> Tensor:
        a = weight.detach().abs()
        return (a.flatten(1).mean(1) if self.per_channel else a.mean()).to(self._follow_scale.dtype)

    @torch.no_grad()
    def follow_from_(self, weight: Tensor) -> None:
        """Record ``weight``'s scale as the one the steps now belong to (:meth:`follow_weight_` scales from it): the
        callback calls it when a fit starts, after a checkpoint's weights and steps are loaded, so that a resumed
        search follows exactly as the uninterrupted one."""
        self._follow_scale.copy_(self._scale_of(weight))

    @torch.no_grad()
    def follow_weight_(self, weight: Tensor) -> None:
        """``step_follow``: scale the steps of the widths not drawn now (progressive reading, searching: the
        candidates below the live pair) by ``mean|w|`` now over ``mean|w|`` at the last call, so each keeps its
        ratio to the weight until it is reached. On the device, no host read; a no-op without ``step_follow``,
        when frozen or under the cascade reading (which draws every width). The first call after construction
        without a weight, or after a state-dict load, only records the scale."""
        if not self.step_follow or self.frozen or self.reading != "progressive":
            return
        now = self._scale_of(weight)
        ref = self._follow_scale
        ratio = torch.where(torch.isfinite(ref) & (ref > 0), now / ref, torch.ones_like(now))
        unused = self._step_index < (self.level - 1)
        self.steps.copy_(torch.where(unused, self.steps * ratio.to(self.steps.dtype), self.steps))
        ref.copy_(now)

    def _numel(self, w: Tensor) -> int:
        return w.numel() // (w.shape[0] if self.per_channel else 1)

    @torch.no_grad()
    def _fill_table(self, w: Tensor) -> None:
        """``lsq_table`` for weights shaped like ``w``: the same numbers :meth:`quantize_at` uses (host arithmetic,
        once; a layer's weight shape never changes)."""
        numel = self._numel(w)
        rows = []
        for b in self.candidates:
            qn, qp = int_range(b, signed=True)
            rows.append([qn, qp, lsq_grad_factor(numel, qp), float(b == 1)])
        self.lsq_table.copy_(torch.tensor(rows, dtype=self.lsq_table.dtype))
        self._table_numel = numel

    def ensure_table(self, w: Tensor) -> None:
        """Fill :attr:`lsq_table` for weights shaped like ``w`` if not yet (a quantizer built without its weight)."""
        if self._table_numel != self._numel(w):  # a quantizer built without its weight: filled at the first forward
            self._fill_table(w)

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
        self.last_index.fill_(i)
        return b

    def unfreeze(self) -> None:
        if len(self.candidates) == 1:
            return
        self.frozen_index.fill_(-1)
        self._frozen_index = -1

    # ----------------------------------------------------------- probabilities
    def _pair(self) -> tuple[Tensor, Tensor]:
        """(live level, the level below it, floored at 0) as 1-element device index tensors."""
        hi = self.level.view(1)
        return hi, (hi - 1).clamp_min(0)

    def _live_beta(self) -> Tensor:
        """The live DBP: the probability of sampling the higher of the two bitwidths."""
        return _ste_clamp01(self.dbp.index_select(0, self.level.view(1)).squeeze(0))

    def probabilities(self, mixed: bool = False) -> Tensor:
        """Probability of each candidate under the current DBPs (differentiable; one-hot when frozen). ``mixed``:
        with every DBP mixed as ``eps + (1 - 2 eps) beta`` (the relaxation the gradient goes through)."""
        n = len(self.candidates)
        if self.frozen:
            # built on the device: a host tensor copied over would synchronise the step
            return (torch.arange(n, device=self.dbp.device) == self._frozen_index).to(self.dbp.dtype)
        if self.reading == "progressive":
            hi, lo = self._pair()
            beta = torch.where(hi == 0, torch.ones((), dtype=self.dbp.dtype, device=self.dbp.device),
                               self._live_beta())
            onehot_hi = nn.functional.one_hot(hi[0], n).to(self.dbp.dtype)
            onehot_lo = nn.functional.one_hot(lo[0], n).to(self.dbp.dtype)
            return beta * onehot_hi + (1 - beta) * onehot_lo
        beta = _ste_clamp01(self.dbp)
        if mixed:  # at beta = 1 the product of (1 - beta_j) would cut every lower DBP's gradient
            beta = self._mixed(beta)
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
            return self.bits_table.select(0, self._frozen_index).to(self.dbp.dtype)  # a view: no host copy
        table = self.bits_table.to(self.dbp.dtype)
        if self.reading == "progressive":
            hi, lo = self._pair()
            b_hi, b_lo = table.index_select(0, hi).squeeze(0), table.index_select(0, lo).squeeze(0)
            return b_lo + (b_hi - b_lo) * self._live_beta()
        return (self.probabilities() * table).sum()

    def decide(self) -> int:
        """Deterministic decision used at the phase boundary (progressive: b_i if beta_i >= 0.5 else b_{i-1};
        cascade: the most probable candidate). Reads the device."""
        if self.frozen:
            return self.candidates[self._frozen_index]
        if self.reading == "progressive":
            lvl = int(self.level)
            if lvl == 0 or float(self.dbp[lvl].detach()) >= 0.5:
                return self.candidates[lvl]
            return self.candidates[lvl - 1]
        return self.candidates[int(self.probabilities().detach().argmax())]

    # ------------------------------------------------------------- quantizers
    def _step(self, i: int, w: Tensor) -> Tensor:
        s = self.steps[i]
        if self.per_channel:
            s = s.view(-1, *([1] * (w.dim() - 1)))
        return s.to(w.dtype)

    def quantize_at(self, w: Tensor, index: int) -> Tensor:
        """Deterministic ``Q_{b_index}(w)`` with that candidate's step (``index`` a Python int)."""
        b = self.candidates[index]
        qp = int_range(b, signed=True)[1]
        numel = w.numel() // (w.shape[0] if self.per_channel else 1)
        return quantize_weight(w, self._step(index, w), b, lsq_grad_factor(numel, qp))

    def quantize_dynamic(self, w: Tensor, index: Tensor) -> Tensor:
        """``Q_{b_index}(w)`` for a 1-element device index tensor: the same values and gradients as
        :meth:`quantize_at`, with the step, range and LSQ gradient scale gathered on the device (no host read)."""
        self.ensure_table(w)
        s = self.steps.index_select(0, index)
        s = (s.view(-1, *([1] * (w.dim() - 1))) if self.per_channel else s.view(())).to(w.dtype)
        row = self.lsq_table.index_select(0, index).view(4)
        qn, qp, g = row[:3].to(w.dtype).unbind(0)
        if self.candidates[0] > 1:
            return lsq_quantize(w, s, qn, qp, g)
        return fake_quantize_dynamic(w, s, qn, qp, g, row[3] > 0)

    @torch.no_grad()
    def integer_weight(self, w: Tensor) -> tuple[Tensor, Tensor, int]:
        """Integer codes, step and bits of the frozen quantizer: ``Q(w) == codes * step``."""
        if not self.frozen:
            raise ValueError("integer_weight needs a frozen quantizer; call freeze(bits) first")
        i, b = self._frozen_index, self.candidates[self._frozen_index]
        s = self._step(i, w)
        v = lsq_quotient(w, s)
        codes = binary_codes(v) if b == 1 else lsq_codes(v, *int_range(b, signed=True))
        return codes.to(torch.int8), s.detach().clone(), b

    # ----------------------------------------------------------------- sampling
    def _uniforms(self, k: int) -> Tensor:
        """The ``k`` uniforms of the current draw step (a pure function of seed, layer id and draw step)."""
        return counter_uniform(self._key, self.draw_step, k)

    def _mixed(self, beta: Tensor) -> Tensor:
        return self.mix_eps + (1.0 - 2.0 * self.mix_eps) * beta

    def _touch_dbp(self, out: Tensor) -> Tensor:
        """Keep a DBP that takes no part in this forward in the graph (zero gradient), so DDP without
        ``find_unused_parameters`` sees every parameter used. Only in a distributed run: elsewhere the extra sum,
        cast and add (and their backward) are kernel launches for nothing."""
        if self.training and self.dbp.requires_grad and torch.is_grad_enabled() and distributed():
            return out + 0.0 * self.dbp.sum().to(out.dtype)
        return out

    def forward(self, w: Tensor) -> Tensor:
        if self.frozen:
            return self._touch_dbp(self.quantize_at(w, self._frozen_index))
        if self.training:
            self.draw_step.add_(1)
        if self.reading == "progressive":
            return self._forward_progressive(w)
        return self._forward_cascade(w)

    def _forward_progressive(self, w: Tensor) -> Tensor:
        hi_i, lo_i = self._pair()
        live = self.dbp.index_select(0, hi_i).squeeze(0)
        hi = self.quantize_dynamic(w, hi_i)
        lo = self.quantize_dynamic(w, lo_i)
        if not self.training:  # evaluation uses the current deterministic decision
            take, index = progressive_choice(live, hi_i[0], lo_i[0])
            self.last_index.copy_(index)
            return self._touch_dbp(torch.where(take, hi, lo))
        mask, index = progressive_choice(live, hi_i[0], lo_i[0], self._estimator, self.mix_eps,
                                         self._uniforms(1)[0], self.temperature)
        self.last_index.copy_(index)
        return lo + mask.to(w.dtype) * (hi - lo)

    def _forward_cascade(self, w: Tensor) -> Tensor:
        n = len(self.candidates)
        probs = self.probabilities()
        qs = torch.stack([self.quantize_at(w, j) for j in range(n)])
        shape = (n,) + (1,) * w.dim()
        if not self.training:
            i = probs.detach().argmax()
            self.last_index.copy_(i)
            onehot = nn.functional.one_hot(i, n).to(w.dtype).view(shape)
            return self._touch_dbp((onehot * qs).sum(0))
        u = self._uniforms(n)
        i, soft = self._estimator.cascade(probs, self.probabilities(mixed=True), u, self.temperature)
        hard = nn.functional.one_hot(i, n).to(probs.dtype)
        mask = (hard + soft - soft.detach()).to(w.dtype)
        self.last_index.copy_(i)
        # the chosen candidate carries gradient to the weight and its step; the others reach the DBPs through the mask
        out = (hard.to(w.dtype).view(shape) * qs).sum(0)
        return out + ((mask - hard.to(w.dtype)).view(shape) * qs.detach()).sum(0)


def progressive_choice(live: Tensor, hi: Tensor, lo: Tensor, estimator: Estimator | None = None,
                       mix_eps: float = 0.0, u: Tensor | None = None,
                       temperature: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The choice between the two adjacent quantizers of the progressive reading, for one layer (0-dim tensors) or
    for many at once (``[layers]`` tensors: the batched pass, :mod:`sdq_lightning.modules.batched`).

    ``live``: the live DBP (unclamped; its gradient goes through the estimator); ``hi``/``lo``: the live level and the
    one below it (floored at 0). Evaluation (``u`` None): the deterministic decision, ``(take, index)`` with ``take``
    True for the higher quantizer (``live >= 0.5``, or the lowest level). Training: the estimator's draw from the
    uniforms ``u`` at ``temperature``, ``(mask, index)`` with the mask ``hard + soft - soft.detach()`` (1 at the lowest
    level) between ``lo`` (0) and ``hi`` (1). ``index``: the candidate used, for ``last_index``."""
    at_bottom = hi == 0
    if u is None:
        take = (live.detach() >= 0.5) | at_bottom
        return take, torch.where(take, hi, lo)
    beta = _ste_clamp01(live)
    hard, soft = estimator.progressive(beta, mix_eps + (1.0 - 2.0 * mix_eps) * beta, u, temperature)
    mask = hard + soft - soft.detach()
    mask = torch.where(at_bottom, torch.ones_like(mask), mask)
    return mask, torch.where(hard.bool() | at_bottom, hi, lo)


def structure_key(modules: Iterable[nn.Module]) -> tuple:
    """The one key of what is built from quantized modules' structure (batched index tensors, CUDA graphs, cached
    regulariser and cost terms): per module, a Python value that changes when the work for it changes, never read
    from the device. A quantized layer (it has ``weight_quant``): the layer, its weight, its weight quantizer and
    that quantizer's frozen index; an :class:`SDQWeightQuantizer`: itself and its frozen index; an activation
    quantizer (it has ``is_initialized``): itself and whether it is initialised."""
    out = []
    for m in modules:
        if hasattr(m, "weight_quant"):
            wq = m.weight_quant
            out.append((m, m.weight, wq, None if wq is None else wq.frozen_at))
        elif isinstance(m, SDQWeightQuantizer):
            out.append((m, m.frozen_at))
        else:
            out.append((m, m.is_initialized))
    return tuple(out)


def stackable(quantizers: Sequence[SDQWeightQuantizer]) -> bool:
    """Whether the quantizers all search progressively over the same number of candidates (their DBPs, levels and
    bit tables then stack into ``[layers, candidates]`` tensors)."""
    return bool(quantizers) and not any(q.frozen or q.reading != "progressive" for q in quantizers) and \
        len({len(q.candidates) for q in quantizers}) == 1


def stacked_expected_bits(quantizers: Sequence[SDQWeightQuantizer], table: Tensor | None = None) -> Tensor | None:
    """Every quantizer's :meth:`~SDQWeightQuantizer.expected_bits` as one ``[layers]`` tensor from one stacked pass
    (differentiable w.r.t. the DBPs, equal per layer): a dozen kernels in all instead of a dozen per layer. None
    unless :func:`stackable`. ``table``: the stacked ``bits_table`` rows (``[layers, candidates]``), when the caller
    keeps them."""
    if not stackable(quantizers):
        return None
    dbp = torch.stack([q.dbp for q in quantizers])
    if table is None:
        table = torch.stack([q.bits_table for q in quantizers]).to(dbp.dtype)
    hi = torch.stack([q.level for q in quantizers]).view(-1, 1)
    lo = (hi - 1).clamp_min(0)
    b_hi, b_lo = table.gather(1, hi), table.gather(1, lo)
    beta = _ste_clamp01(dbp.gather(1, hi))  # the live DBP, as each quantizer reads it
    return (b_lo + (b_hi - b_lo) * beta).view(-1)
