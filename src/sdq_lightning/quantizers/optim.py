"""Optimizers of the quantizer parameters: the DBP search step (budget controller inside) and the step sizes.

Both are plain :class:`torch.optim.Optimizer` subclasses that read ``.grad`` and do everything on the device, so
they run inside a training step without a host read, and they work with a gradient scaler exactly like the user's
optimizer does (``scaler.unscale_(opt)`` then ``scaler.step(opt)``: skipped when a gradient is inf/NaN).

:class:`DBPOptimizer` (``budget_control="dual"``), per step, for every searchable layer ``l`` with live DBP
``beta_l`` (see ``docs/method.md``, "The search"):

* unit cost ``u_l`` = d(cost)/d(bits of layer l) relative to the mean over the searched layers (parameter share for
  ``avg_bits``/``size``, MACs x activation bits for ``bitops``), fixed per layer;
* task force ``t_l = (dL/dbeta_l) / u_l``, divided by an EMA of its root mean square over the layers, so the task
  signal has unit scale whatever the loss, model or schedule (``search_signal="budget_only"`` sets it to 0);
* budget force ``f_l = (dC/dbeta_l) / u_l / mean(u)``: the same push for every layer whatever its size (it equals
  ``b_i - b_{i-1}`` under ``avg_bits``), so the ranking between layers is the task loss per unit of cost;
* ``beta_l <- clip(beta_l - lr (task_weight t_l + lambda f_l), 0, 1)`` with the multiplier ``lambda`` chosen every
  step so that the linearised expected cost after the step equals the schedule's next point (the Lagrange
  multiplier of the linearised constraint ``E[C] = T(t + 1)``, solved in closed form instead of by slow dual
  ascent; negative when the task alone would undershoot the schedule, so the search ends AT the budget, not
  below it);
* in the holding part of the schedule a hardening force, growing from 0 to 1, pushes each live DBP towards the
  nearer of 0 and 1, so the freeze's rounding (and the projection after it) is a small correction; the multiplier is
  then one-sided (>= 0) within ``HARDEN_SLACK`` under the target and two-sided further under it;
* progressive level changes on the device: a live DBP at or below ``drop_threshold`` moves the layer one level down
  (re-initialised to ``reinit_dbp``) while the expected cost is above the schedule; a live DBP pushed past 1 while
  the cost is below the schedule moves it one level up (re-initialised to twice the threshold), so the task can
  take bits back; at most one change per ``min_steps_between_drops`` steps;
* a sensitivity estimate per layer for the projection: an EMA of ``-dL/dbeta_l`` (the loss decrease per level).

``budget_control="penalty"``: plain SGD on ``dL/dbeta + lambda_b dR(E[C])/dbeta`` (a fixed penalty weight, no
schedule: kept as a control for the dual controller).

:class:`LogStepAdam`: Adam on ``log s`` for the LSQ step sizes, ``s <- s exp(-lr m_hat / (sqrt(v_hat) + eps))``:
positive by construction and scale-free (a 1e-3 absolute Adam step moved an 8-bit weight step of 4e-3 by 25 % per
step, and drove activation steps negative at high learning rates).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sdq_lightning.quantizers.sdq import stackable

__all__ = ["DBPOptimizer", "LogStepAdam"]

HARDEN_SLACK = 0.01  # while hardening, the multiplier may turn negative once the cost is 1 % under the target


class DBPOptimizer(torch.optim.Optimizer):
    """The DBP step of the search (see the module docstring). One parameter group per searchable layer.

    Args:
        quantizers: the searchable :class:`~sdq_lightning.quantizers.SDQWeightQuantizer` s (their ``dbp`` are the
            parameters, in this order).
        units: relative unit cost of each layer (mean 1).
        lr: DBP travel per step per unit force (in DBP units; one level is one unit of ``beta``).
        control: ``"dual"`` or ``"penalty"``.
        task_weight: weight of the normalised task force (``dual``); 0 = budget only.
        drop_threshold, reinit_dbp, min_steps_between_drops: progressive level drops (``None`` threshold = none).
        rms_decay, sens_decay: EMA decays of the task-force scale and of the sensitivity.
        max_multiplier: upper bound of lambda, in units of the nominal push.
        measured: the task gradients are measured loss differences written by :meth:`record_probe` (the search's
            ``task_estimate="paired"``): the sensitivity is theirs, not an EMA of ``.grad``.
        probe_decay: EMA decay of the measured differences per probe of a layer's level (the first probes of a
            level are averaged, not decayed from zero).
    """

    def __init__(self, quantizers: Sequence[nn.Module], units: Sequence[float], lr: float, control: str = "dual",
                 task_weight: float = 1.0, drop_threshold: float | None = 0.05, reinit_dbp: float = 1.0,
                 min_steps_between_drops: int = 1, rms_decay: float = 0.98, sens_decay: float = 0.99,
                 max_multiplier: float = 20.0, settle: bool = True, measured: bool = False,
                 probe_decay: float = 0.8) -> None:
        if control not in ("dual", "penalty"):
            raise ValueError(f"control must be 'dual' or 'penalty', got {control!r}")
        if len(quantizers) != len(units):
            raise ValueError("one unit cost per quantizer is needed")
        groups = [{"params": [q.dbp], "unit": float(u)} for q, u in zip(quantizers, units)]
        super().__init__(groups, {"lr": float(lr)})
        self.quantizers = list(quantizers)
        self.control = control
        self.task_weight = float(task_weight)
        self.drop_threshold = drop_threshold
        self.reinit_dbp = float(reinit_dbp)
        self.min_steps_between_drops = int(min_steps_between_drops)
        self.rms_decay, self.sens_decay = float(rms_decay), float(sens_decay)
        self.max_multiplier = float(max_multiplier)
        self.settle = bool(settle) and control == "dual"
        self.measured = bool(measured)
        if not 0.0 <= probe_decay < 1.0:
            raise ValueError(f"probe_decay must be in [0, 1), got {probe_decay!r}")
        self.probe_decay = float(probe_decay)
        dev = quantizers[0].dbp.device if quantizers else torch.device("cpu")
        self.multiplier = torch.zeros((), device=dev)
        self.rms = torch.zeros((), device=dev)
        self.step_count = torch.zeros((), dtype=torch.long, device=dev)
        self._budget_grads: list[Tensor] | None = None
        self._expected: Tensor | None = None
        self._task_grads: Tensor | None = None  # [layers, candidates], handed over by prepare() (see step)
        # the schedule as device scalars, set by set_schedule with two multi-tensor operations (no host->device
        # copy): the step reads only these, so it can be captured once and replayed (a CUDA graph) while the
        # schedule moves. Target now, target next, target next x (1 - HARDEN_SLACK), harden weight, and the number
        # of layers that should be decided while hardening (int(layers x harden), computed on the host).
        self._sched = [torch.zeros((), device=dev) for _ in range(5)]
        for q in quantizers:
            st = self.state[q.dbp]
            st["sens"] = torch.zeros_like(q.dbp.detach())
            st["last_drop"] = torch.full((), -(10**9), dtype=torch.long, device=dev)
            st["settled"] = torch.zeros((), device=dev)  # 1.0 once settled (float: torch casts state on load)
            st["probes"] = torch.zeros_like(q.dbp.detach())  # measured differences per level (task_estimate=paired)
            st["probed_at"] = torch.full((), -1, dtype=torch.long, device=dev)
        # The step works on [layers, candidates] tensors (a few dozen kernels per step in all, whatever the number of
        # layers); layers with fewer candidates than the widest are padded with entries that are never live.
        self._counts = [int(q.dbp.shape[0]) for q in quantizers]
        self._width = max(self._counts, default=0)
        self._ragged = len(set(self._counts)) > 1
        self._top = torch.tensor(self._counts, dtype=torch.long, device=dev) - 1
        self._valid = torch.arange(self._width, device=dev).view(1, -1) < (self._top + 1).view(-1, 1)
        self._units = torch.tensor([float(u) for u in units], device=dev).view(-1, 1)
        self._progressive = torch.tensor([getattr(q, "reading", "progressive") == "progressive" for q in quantizers],
                                         dtype=torch.bool, device=dev)

    # ------------------------------------------------------------------ inputs of one step
    def prepare(self, budget_grads: Sequence[Tensor], expected: Tensor, target_now: float | None = None,
                target_next: float | None = None, harden: float = 0.0, task_grads: Tensor | None = None) -> None:
        """Hand over dC/dbeta of every layer (unscaled), the expected cost now, the schedule's points and the
        hardening weight (0..1: a push of each live DBP towards the nearer of 0 and 1, so that the freeze's
        rounding is a small change); without the schedule, the last :meth:`set_schedule` holds. ``task_grads``:
        the DBPs' task gradients stacked ``[layers, candidates]`` (:meth:`stacked_task_grads`), instead of
        ``.grad``."""
        if target_now is not None:
            self.set_schedule(target_now, target_now if target_next is None else target_next, harden)
        self._budget_grads = [g.detach() for g in budget_grads]
        self._expected = expected.detach()
        self._task_grads = task_grads

    def set_schedule(self, target_now: float, target_next: float, harden: float = 0.0) -> None:
        """The schedule of this step, written into device scalars (the step reads no host value of it)."""
        values = [float(target_now), float(target_next), float(target_next) * (1 - HARDEN_SLACK), float(harden),
                  float(int(len(self.quantizers) * float(harden)))]
        torch._foreach_zero_(self._sched)
        torch._foreach_add_(self._sched, values)

    @property
    def stackable(self) -> bool:
        """Whether :class:`~sdq_lightning.core.search.BitSearch` may replay the step (with the expected cost
        before it) as one CUDA graph: under ``dual`` control over progressive layers of one candidate count (the
        expected cost is then one stacked pass as well). The step itself never reads a host value of the step."""
        return self.control == "dual" and stackable(self.quantizers)

    def stacked_task_grads(self) -> Tensor:
        """The DBPs' task gradients stacked ``[layers, candidates]`` in float32 (zeros where ``.grad`` is None)."""
        return self._stack([g.float() for g in self._grads()])

    # ------------------------------------------------------------------ state beyond torch's per-param state
    def controller_state(self) -> dict:
        return {"multiplier": self.multiplier.clone(), "rms": self.rms.clone(), "step_count": self.step_count.clone()}

    def load_controller_state(self, state: dict) -> None:
        for key in ("multiplier", "rms", "step_count"):
            if key in state:
                getattr(self, key).copy_(state[key])

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["controller"] = self.controller_state()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        controller = state_dict.pop("controller", None)
        super().load_state_dict(state_dict)
        for g in self.param_groups:  # checkpoints from before settling and probing existed
            p = g["params"][0]
            self.state[p].setdefault("settled", torch.zeros((), device=p.device))
            self.state[p].setdefault("probes", torch.zeros_like(p.detach()))
            self.state[p].setdefault("probed_at", torch.full((), -1, dtype=torch.long, device=p.device))
        if controller is not None:
            self.load_controller_state(controller)

    # ------------------------------------------------------------------ stacking
    def _params(self) -> list[Tensor]:
        return [g["params"][0] for g in self.param_groups]

    def _grads(self) -> list[Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params()]

    def _stack(self, tensors: Sequence[Tensor]) -> Tensor:
        """``[layers, candidates]`` from one vector per layer (zero-padded to the widest layer)."""
        if self._ragged:
            tensors = [nn.functional.pad(t, (0, self._width - t.shape[0])) for t in tensors]
        return torch.stack(list(tensors))

    def _unstack(self, t: Tensor) -> list[Tensor]:
        rows = t.unbind(0)
        return [r[:c] for r, c in zip(rows, self._counts)] if self._ragged else list(rows)

    def _state(self, key: str) -> list[Tensor]:
        return [self.state[p][key] for p in self._params()]

    def _live(self, levels: Tensor) -> Tensor:
        """``[layers, candidates]``: the DBPs that move. Progressive: the live level's (none at the lowest
        candidate); cascade: every DBP but the first (which the cascade's probabilities do not read)."""
        idx = torch.arange(self._width, device=levels.device).view(1, -1)
        lv = levels.view(-1, 1)
        return torch.where(self._progressive.view(-1, 1), (idx == lv) & (lv > 0), (idx > 0) & self._valid)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        """One step of every layer's DBPs at once, on ``[layers, candidates]`` tensors (see the module docstring).
        Every value of the step is read from the device (the schedule from :meth:`set_schedule`'s scalars; the
        task gradients from ``prepare(task_grads=...)`` or stacked from ``.grad``; the hardening and settling terms
        are computed always and add exact zeros while hardening is off), so the step can be captured as a CUDA
        graph."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self._budget_grads is None:
            raise RuntimeError("DBPOptimizer.step needs prepare(...) first (the SDQ callback calls it)")
        params = self._params()
        target_now, target_next, _, harden, _ = self._sched
        p = self._stack([x.detach() for x in params])
        g = self._task_grads if self._task_grads is not None else self.stacked_task_grads()
        b = self._stack(self._budget_grads).float()
        levels = torch.stack([q.level for q in self.quantizers])
        lv = levels.view(-1, 1)
        live = self._live(levels)
        self._update_sensitivity(g, live)
        settled_list = self._state("settled")
        settled = torch.stack(settled_list) > 0.5
        if self.settle:  # before the multiplier is solved, so this step absorbs the rounding (none before hardening)
            beta = p.gather(1, lv).view(-1)
            now = self._settle_now(beta, levels, settled, self._units.view(-1))
            rounded = torch.where(now, (beta >= 0.5).to(beta.dtype), beta)
            self._expected = self._expected + (b.gather(1, lv).view(-1) * (rounded - beta)).sum()  # exact: linear
            p = p.scatter(1, lv, rounded.view(-1, 1))
            settled = settled | now
            torch._foreach_copy_(settled_list, settled.to(settled_list[0].dtype).unbind(0))
        live = live & ~settled.view(-1, 1)  # a settled layer no longer moves (its sensitivity is still measured)
        lr = self.param_groups[0]["lr"]
        if self.control == "penalty":
            p = p - lr * (g + b) * live
        else:
            p = self._dual(p, g, b, live, harden, target_next, lr)
        # a live DBP pushed past 1 asks for the next level up (used below when the cost is under the schedule)
        pushed_up = p.gather(1, lv).view(-1) > 1.0
        p = p.clamp(0.0, 1.0)
        self.step_count.add_(1)
        if self.drop_threshold is not None:
            p = self._change_levels(p, levels, settled, pushed_up, target_now, harden)
        torch._foreach_copy_(params, self._unstack(p.to(params[0].dtype)))
        self._budget_grads = self._task_grads = None
        return None

    def _dual(self, p: Tensor, g: Tensor, b: Tensor, live: Tensor, harden: Tensor, target_next: Tensor,
              lr: float) -> Tensor:
        """The DBPs after the ``dual`` move: normalised task force, hardening, budget force and the multiplier that
        puts the linearised expected cost after the step on the schedule's next point."""
        units = self._units
        task, forces = g * live / units, b * live / units
        n_live = live.sum().clamp_min(1)
        ms = (task * task).sum() / n_live
        first = self.rms == 0
        self.rms.copy_(torch.where(first, ms.sqrt(), self.rms * self.rms_decay + (1 - self.rms_decay) * ms.sqrt()))
        scale = torch.where(self.rms > 0, 1.0 / self.rms.clamp_min(1e-30), torch.zeros_like(self.rms))
        task = task * scale * self.task_weight
        # towards the nearer end: beta > 0.5 up, below down (a negative force raises beta); 0 while not hardening
        task = torch.where(harden > 0, task - harden * torch.sign(p - 0.5) * live, task)
        # the budget force per layer, normalised so that the mean unit cost is 1 (dC/dbeta / u = mean dC/dbits)
        norm = forces.abs().sum() / n_live
        forces = forces / norm.clamp_min(1e-30)
        # linearised constraint: E - lr sum<dC, task> - lr lam sum<dC, f> = T_next
        d_task, d_lam = (b * task).sum(), (b * forces).sum()
        excess = self._expected - target_next - lr * d_task
        lam = (excess / (lr * d_lam).clamp_min(1e-30)).clamp_max(self.max_multiplier).maximum(self._lower())
        lam = torch.where(d_lam > 0, lam, torch.zeros_like(lam))
        self.multiplier.copy_(lam)
        return p - lr * (task + lam * forces)

    def _change_levels(self, p: Tensor, levels: Tensor, settled: Tensor, pushed_up: Tensor, target_now: Tensor,
                       harden: Tensor) -> Tensor:
        """Level changes of the progressive layers: down when the live DBP reached the threshold and the cost is
        above the schedule; up (``dual`` only) when the live DBP was pushed past 1 and the cost is below it. Both
        keep the expected bits continuous up to the threshold (down: re-initialised to ``reinit_dbp``; up: to twice
        the threshold). At most one change per ``min_steps_between_drops`` steps, none once settled."""
        last_list = self._state("last_drop")
        last = torch.stack(last_list)
        step = self.step_count
        beta = p.gather(1, levels.view(-1, 1)).view(-1)
        ok = ((step - last) >= self.min_steps_between_drops) & ~settled & self._progressive
        above = self._expected > target_now
        below = self._expected < target_now
        drop = (beta <= self.drop_threshold) & (levels > 0) & above & ok
        rise = pushed_up & (levels < self._top) & below & ok & ((harden == 0) | self.settle)
        if self.control != "dual":
            rise = torch.zeros_like(rise)
        new = levels - drop.long() + rise.long()
        value = torch.where(drop, torch.full_like(beta, self.reinit_dbp),
                            torch.where(rise, torch.full_like(beta, 2 * self.drop_threshold),
                                        p.gather(1, new.view(-1, 1)).view(-1)))
        torch._foreach_copy_([q.level for q in self.quantizers], new.unbind(0))
        torch._foreach_copy_(last_list, torch.where(drop | rise, step, last).unbind(0))
        return p.scatter(1, new.view(-1, 1), value.view(-1, 1))

    def _update_sensitivity(self, g: Tensor, live: Tensor) -> None:
        if self.measured:
            return
        sens_list = self._state("sens")
        sens = self._stack(sens_list)
        torch._foreach_copy_(sens_list, self._unstack(torch.where(live, self.sens_decay * sens
                                                                   - (1 - self.sens_decay) * g, sens)))

    @torch.no_grad()
    def update_sensitivity(self) -> None:
        """EMA of -dL/dbeta on the live entries (the loss decrease per level up), for the projection, from ``.grad``
        without moving the DBPs (the controls that measure only); drops what :meth:`prepare` handed over. :meth:`step`
        does the same update. A no-op when the differences are measured (``measured=True``: :meth:`record_probe`
        writes the sensitivity)."""
        levels = torch.stack([q.level for q in self.quantizers])
        self._update_sensitivity(self.stacked_task_grads(), self._live(levels))
        self._budget_grads = self._task_grads = None

    def _lower(self) -> Tensor:
        """Lower bound of the multiplier. Two-sided while the schedule descends and holds (the search ends AT the
        budget). While hardening, one-sided (>= 0) as long as the expected cost is within ``HARDEN_SLACK`` of the
        target, so the DBPs can settle on 0/1 under the budget instead of being held fractional on it; below that,
        two-sided again: the hardening force (DBPs under 0.5 pushed to 0) must not carry the search far under the
        budget, which would give away bits the budget allows. With sequential
        settling (``settle=True``) always two-sided: the layers still moving hold the target exactly and absorb
        each settled layer's rounding."""
        two_sided = torch.full_like(self.multiplier, -self.max_multiplier)
        if self.settle:
            return two_sided
        _, _, next_slack, harden, _ = self._sched  # the schedule's device scalars: no host branch on this step
        return torch.where((harden > 0) & (self._expected >= next_slack), torch.zeros_like(two_sided), two_sided)

    def _settle_now(self, beta: Tensor, levels: Tensor, settled: Tensor, units: Tensor) -> Tensor:
        """Which layers settle at this step (sequential settling, ``settle=True``, while hardening).

        A settled layer's live DBP is rounded to 0 or 1 and no longer moves; the multiplier then holds the budget
        with the layers still moving, which absorb the rounding. The number of decided layers (settled, at the
        lowest candidate, or reading a cascade: those never settle) follows ``floor(n * harden)``: none when
        hardening starts, all but the last one at the last step, so the freeze's rounding only decides the last
        (smallest) layers. Largest unit cost first, ties by the most decided DBP: a large layer's rounding moves the
        cost by much, and the smaller layers still moving can absorb it; the small layers settle last, where a
        rounding costs little. All on the device (the goal ``int(n * harden)`` is a device scalar of
        :meth:`set_schedule`)."""
        n = beta.shape[0]
        decided = settled | (levels == 0) | ~self._progressive
        short = self._sched[4] - decided.sum()
        score = torch.where(decided, torch.full_like(beta, -1.0), units * (1 + (beta - 0.5).abs()))
        order = score.argsort(descending=True)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=beta.device))
        return ~decided & (rank < short)

    # ------------------------------------------------------------------ measured differences (task_estimate=paired)
    @torch.no_grad()
    def record_probe(self, layers: Tensor, hi_minus_lo: Tensor, level: Tensor | None = None) -> None:
        """Record measured ``L(b_hi) - L(b_lo)`` of the live levels of ``layers`` (device indices, distinct, ``-1``
        for a slot that records nothing; 0-dim or ``[k]``, with ``hi_minus_lo`` of the same shape; nothing is
        recorded for a layer at its lowest candidate): the sensitivity of each such level moves to the running mean of
        its measurements, then to an EMA with ``probe_decay``. ``level`` (a device index, 0-dim): record at that
        level instead of the live one (the search's lookahead probes). All on the device."""
        sens_list, count_list, at_list = self._state("sens"), self._state("probes"), self._state("probed_at")
        sens, count = self._stack(sens_list), self._stack(count_list)
        levels = torch.stack([q.level for q in self.quantizers]).view(-1, 1)
        if level is not None:
            levels = level.to(levels.dtype).expand_as(levels)
        slots = torch.arange(len(sens_list), device=sens.device).view(-1, 1) == layers.reshape(1, -1)
        rows = slots.any(1, keepdim=True)
        cols = torch.arange(sens.shape[1], device=sens.device).view(1, -1) == levels
        hit = rows & cols & (levels > 0)
        count = count + hit.to(count.dtype)
        weight = torch.maximum(1.0 / count.clamp_min(1.0), torch.full_like(count, 1.0 - self.probe_decay))
        measured = (slots.to(sens.dtype) * hi_minus_lo.detach().reshape(1, -1).to(sens.dtype)).sum(1, keepdim=True)
        value = -measured  # the loss decrease per level up, as the EMA of -dL/dbeta
        torch._foreach_copy_(sens_list, self._unstack(torch.where(hit, sens + weight * (value - sens), sens)))
        torch._foreach_copy_(count_list, self._unstack(count))
        at = torch.stack(at_list)
        torch._foreach_copy_(at_list, torch.where(rows.view(-1), self.step_count, at).unbind(0))

    def measured_grads(self) -> list[Tensor]:
        """The task gradients of the measured differences: ``dE[L]/dbeta = L(b_hi) - L(b_lo)`` per level (the
        expected loss is linear in the live DBP), 0 where a level was never measured."""
        return [torch.where(n > 0, -s, torch.zeros_like(s)) for n, s in zip(self._state("probes"), self._state("sens"))]

    def sensitivity(self) -> list[Tensor]:
        """Per layer, the EMA of -dL/dbeta per candidate index (0 where never live)."""
        return self._state("sens")


class LogStepAdam(torch.optim.Optimizer):
    """Adam on the logarithm of positive step sizes (see the module docstring); keeps every step > 0."""

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 min_step: float = 1e-12) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        super().__init__(params, {"lr": float(lr), "betas": betas, "eps": float(eps), "min_step": float(min_step)})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                self._init_state(ps)
                self._update(group, ps, [p.grad for p in ps])
        return None

    @torch.no_grad()
    def step_grads(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """One step of ``params`` (of the first group, their state already made by a :meth:`step`) with the given
        gradients instead of ``.grad``: what a CUDA graph replays (the gradients enter as its static inputs)."""
        self._update(self.param_groups[0], params, grads)

    def has_state(self, params: list[Tensor]) -> bool:
        """Whether every parameter of ``params`` has its state (made by its first :meth:`step`)."""
        return all(self.state.get(p) for p in params)

    def _init_state(self, ps: list[Tensor]) -> None:
        for p in ps:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)

    def _update(self, group: dict, ps: list[Tensor], grads: list[Tensor]) -> None:
        b1, b2 = group["betas"]
        # every operation a foreach over the group's tensors: a handful of kernel launches per step in all,
        # not a dozen per parameter (on a GPU, launches rather than arithmetic set the cost of this step)
        glog = torch._foreach_mul([g.float() for g in grads], ps)  # dL/dlog s = s dL/ds
        m = [self.state[p]["exp_avg"] for p in ps]
        v = [self.state[p]["exp_avg_sq"] for p in ps]
        t = [self.state[p]["step"] for p in ps]
        torch._foreach_add_(t, 1.0)
        torch._foreach_lerp_(m, glog, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, glog, glog, value=1 - b2)
        bc1, bc2 = torch._foreach_pow(b1, t), torch._foreach_pow(b2, t)  # b^t
        torch._foreach_mul_(bc1, -1.0)
        torch._foreach_add_(bc1, 1.0)                                    # 1 - b1^t
        torch._foreach_mul_(bc2, -1.0)
        torch._foreach_add_(bc2, 1.0)                                    # 1 - b2^t
        denom = torch._foreach_div(v, bc2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        upd = torch._foreach_div(m, bc1)
        torch._foreach_div_(upd, denom)
        torch._foreach_mul_(upd, -group["lr"])
        torch._foreach_clamp_min_(upd, -1.0)
        torch._foreach_clamp_max_(upd, 1.0)
        torch._foreach_exp_(upd)
        torch._foreach_mul_(ps, upd)
        torch._foreach_clamp_min_(ps, group["min_step"])
