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
        self._harden = 0.0
        self._expected: Tensor | None = None
        self._target_next: float | None = None
        self._target_now: float | None = None
        self._task_grads: Tensor | None = None  # [layers, candidates], handed over by prepare() (see step)
        # the schedule as device scalars, set by set_schedule with two multi-tensor operations (no host->device
        # copy): the stacked step reads only these, so it can be captured once and replayed (a CUDA graph) while
        # the schedule moves. Target now, target next, target next x (1 - HARDEN_SLACK), harden weight, and the
        # number of layers that should be decided while hardening (int(layers x harden), computed on the host).
        self._sched = [torch.zeros((), device=dev) for _ in range(5)]
        # True while a CUDA graph of the step is captured: the stacked step then branches on no host value of the
        # step (the hardening and settling terms are computed and masked; with hardening off they add exact zeros,
        # so both forms give the same values bit for bit). Eager steps skip that work while hardening is off.
        self.branch_free = False
        for q in quantizers:
            st = self.state[q.dbp]
            st["sens"] = torch.zeros_like(q.dbp.detach())
            st["last_drop"] = torch.full((), -(10**9), dtype=torch.long, device=dev)
            st["settled"] = torch.zeros((), device=dev)  # 1.0 once settled (float: torch casts state on load)
            st["probes"] = torch.zeros_like(q.dbp.detach())  # measured differences per level (task_estimate=paired)
            st["probed_at"] = torch.full((), -1, dtype=torch.long, device=dev)
        # One [layers, candidates] step instead of a loop over layers when every searched layer reads its DBPs
        # progressively over the same number of candidates (the usual case): a few dozen kernels per step in all,
        # where the loop issued about 100 per layer (on a GPU the step was bound by kernel launches).
        lengths = {q.dbp.shape[0] for q in quantizers}
        self.vectorised = bool(quantizers) and len(lengths) == 1 and all(
            getattr(q, "reading", "progressive") == "progressive" for q in quantizers)
        self._units = torch.tensor([float(u) for u in units], device=dev).view(-1, 1) if quantizers else None
        self._progressive = torch.tensor([getattr(q, "reading", "progressive") == "progressive" for q in quantizers],
                                         dtype=torch.bool, device=dev)

    # ------------------------------------------------------------------ inputs of one step
    def prepare(self, budget_grads: Sequence[Tensor], expected: Tensor, target_now: float | None = None,
                target_next: float | None = None, harden: float = 0.0, task_grads: Tensor | None = None) -> None:
        """Hand over dC/dbeta of every layer (unscaled), the expected cost now, the schedule's points and the
        hardening weight (0..1: a push of each live DBP towards the nearer of 0 and 1, so that the freeze's
        rounding is a small change); without the schedule, the last :meth:`set_schedule` holds. ``task_grads``:
        the DBPs' task gradients stacked ``[layers, candidates]`` (the stacked step only), instead of ``.grad``."""
        if target_now is not None:
            self.set_schedule(target_now, target_now if target_next is None else target_next, harden)
        self._budget_grads = [g.detach() for g in budget_grads]
        self._expected = expected.detach()
        self._task_grads = task_grads

    def set_schedule(self, target_now: float, target_next: float, harden: float = 0.0) -> None:
        """The schedule of this step: host values for the per-layer path, device scalars for the stacked one."""
        self._harden = float(harden)
        self._target_now, self._target_next = float(target_now), float(target_next)
        values = [self._target_now, self._target_next, self._target_next * (1 - HARDEN_SLACK), self._harden,
                  float(int(len(self.quantizers) * self._harden))]
        torch._foreach_zero_(self._sched)
        torch._foreach_add_(self._sched, values)

    @property
    def stackable(self) -> bool:
        """Whether :meth:`step` runs the stacked form (which reads no host value of the step: capturable)."""
        return self.vectorised and self.control == "dual"

    def stacked_task_grads(self) -> Tensor:
        """The DBPs' task gradients stacked ``[layers, candidates]`` in float32 (zeros where ``.grad`` is None)."""
        return torch.stack([g.float() for g in self._grads()])

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

    # ------------------------------------------------------------------ the step
    def _grads(self) -> list[Tensor]:
        return [g["params"][0].grad if g["params"][0].grad is not None else torch.zeros_like(g["params"][0])
                for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self._budget_grads is None:
            raise RuntimeError("DBPOptimizer.step needs prepare(...) first (the SDQ callback calls it)")
        if self.stackable:
            self._step_stacked()
            self._budget_grads = self._task_grads = None
            return None
        params = [g["params"][0] for g in self.param_groups]
        grads = [g.float() for g in self._grads()]
        if self.settle and self._harden > 0:
            self._settle_loop(params)
        live = [self._live_mask(q, p) for q, p in zip(self.quantizers, params)]
        lr = self.param_groups[0]["lr"]
        self.update_sensitivity(grads, live)
        if self.control == "penalty":
            for p, g, b, m in zip(params, grads, self._budget_grads, live):
                p.sub_(lr * (g + b) * m)
        else:
            moving = [m & (self.state[p]["settled"] < 0.5) for p, m in zip(params, live)]
            self._dual_step(params, grads, moving, lr)
        # a live DBP pushed past 1 asks for the next level up (used below when the cost is under the schedule)
        pushed_up = [p.index_select(0, q.level.view(1))[0] > 1.0 for q, p in zip(self.quantizers, params)]
        for p in params:
            p.clamp_(0.0, 1.0)
        self.step_count.add_(1)
        if self.drop_threshold is not None:
            self._drop_levels(params, pushed_up)
        self._budget_grads = None
        return None

    @torch.no_grad()
    def update_sensitivity(self, grads: list[Tensor] | None = None, live: list[Tensor] | None = None) -> None:
        """EMA of -dL/dbeta on the live entries (the loss decrease per level up), for the projection. Called by
        :meth:`step`, and alone by the controls that measure without moving. A no-op when the differences are
        measured (``measured=True``: :meth:`record_probe` writes the sensitivity)."""
        if self.measured:
            return
        params = [g["params"][0] for g in self.param_groups]
        grads = [g.float() for g in self._grads()] if grads is None else grads
        live = [self._live_mask(q, p) for q, p in zip(self.quantizers, params)] if live is None else live
        for p, g, m in zip(params, grads, live):
            sens = self.state[p]["sens"]
            sens.copy_(torch.where(m, self.sens_decay * sens - (1 - self.sens_decay) * g, sens))

    @staticmethod
    def _live_mask(q: nn.Module, p: Tensor) -> Tensor:
        idx = torch.arange(p.shape[0], device=p.device)
        if getattr(q, "reading", "progressive") == "progressive":
            return (idx == q.level) & (q.level > 0)
        return idx > 0

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

    def _dual_step(self, params: list[Tensor], grads: list[Tensor], live: list[Tensor], lr: float) -> None:
        units = [g["unit"] for g in self.param_groups]
        task = [g * m / u for g, m, u in zip(grads, live, units)]
        forces = [b * m / u for b, m, u in zip(self._budget_grads, live, units)]
        n_live = torch.stack([m.sum() for m in live]).sum().clamp_min(1)
        ms = torch.stack([(t * t).sum() for t in task]).sum() / n_live
        first = self.rms == 0
        self.rms.copy_(torch.where(first, ms.sqrt(), self.rms * self.rms_decay + (1 - self.rms_decay) * ms.sqrt()))
        scale = torch.where(self.rms > 0, 1.0 / self.rms.clamp_min(1e-30), torch.zeros_like(self.rms))
        task = [t * scale * self.task_weight for t in task]
        if self._harden > 0:  # towards the nearer end: beta > 0.5 up, below down (a negative force raises beta)
            task = [t - self._harden * torch.sign(p.detach() - 0.5) * m for t, p, m in zip(task, params, live)]
        # the budget force per layer, normalised so that the mean unit cost is 1 (dC/dbeta / u = mean dC/dbits)
        norm = torch.stack([f.abs().sum() for f in forces]).sum() / n_live
        forces = [f / norm.clamp_min(1e-30) for f in forces]
        # linearised constraint: E - lr sum<dC, task> - lr lam sum<dC, f> = T_next
        d_task = torch.stack([(b * t).sum() for b, t in zip(self._budget_grads, task)]).sum()
        d_lam = torch.stack([(b * f).sum() for b, f in zip(self._budget_grads, forces)]).sum()
        excess = self._expected - self._target_next - lr * d_task
        lam = (excess / (lr * d_lam).clamp_min(1e-30)).clamp_max(self.max_multiplier).maximum(self._lower())
        lam = torch.where(d_lam > 0, lam, torch.zeros_like(lam))
        self.multiplier.copy_(lam)
        for p, t, f in zip(params, task, forces):
            p.sub_(lr * (t + lam * f))

    def _step_stacked(self) -> None:
        """:meth:`step` under ``dual`` on the stacked ``[layers, candidates]`` DBPs: the same arithmetic as the
        per-layer loop (:meth:`update_sensitivity`, :meth:`_dual_step`, :meth:`_drop_levels`), summed in another
        order (equal up to float rounding; ``tests/unit/test_search_controller.py`` compares the two). Every value
        of the step is read from the device (the schedule from :meth:`set_schedule`'s scalars; the task gradients
        from ``prepare(task_grads=...)`` or stacked from ``.grad``), so the step can be captured as a CUDA graph."""
        params = [g["params"][0] for g in self.param_groups]
        target_now, target_next, _, harden, _ = self._sched
        p = torch.stack([x.detach() for x in params])
        g = self._task_grads if self._task_grads is not None else self.stacked_task_grads()
        b = torch.stack(self._budget_grads).float()
        levels = torch.stack([q.level for q in self.quantizers])
        lv = levels.view(-1, 1)
        idx = torch.arange(p.shape[1], device=p.device).view(1, -1)
        live = (idx == lv) & (lv > 0)
        if not self.measured:
            sens_list = [self.state[x]["sens"] for x in params]
            sens = torch.stack(sens_list)
            torch._foreach_copy_(sens_list, torch.where(live, self.sens_decay * sens - (1 - self.sens_decay) * g,
                                                        sens).unbind(0))
        settled_list = [self.state[x]["settled"] for x in params]
        settled = torch.stack(settled_list) > 0.5
        if self.settle and (self.branch_free or self._harden > 0):  # before the multiplier is solved, so this step
            beta = p.gather(1, lv).view(-1)  # absorbs the rounding (none before hardening: the goal is 0 then)
            now = self._settle_now(beta, levels, settled, self._units.view(-1))
            rounded = torch.where(now, (beta >= 0.5).to(beta.dtype), beta)
            self._expected = self._expected + (b.gather(1, lv).view(-1) * (rounded - beta)).sum()  # exact: linear
            p = p.scatter(1, lv, rounded.view(-1, 1))
            settled = settled | now
            torch._foreach_copy_(settled_list, settled.to(settled_list[0].dtype).unbind(0))
        live = live & ~settled.view(-1, 1)  # a settled layer no longer moves (its sensitivity is still measured)
        lr, units = self.param_groups[0]["lr"], self._units
        task, forces = g * live / units, b * live / units
        n_live = live.sum().clamp_min(1)
        ms = (task * task).sum() / n_live
        first = self.rms == 0
        self.rms.copy_(torch.where(first, ms.sqrt(), self.rms * self.rms_decay + (1 - self.rms_decay) * ms.sqrt()))
        scale = torch.where(self.rms > 0, 1.0 / self.rms.clamp_min(1e-30), torch.zeros_like(self.rms))
        task = task * scale * self.task_weight
        if self.branch_free:
            task = torch.where(harden > 0, task - harden * torch.sign(p - 0.5) * live, task)
        elif self._harden > 0:
            task = task - harden * torch.sign(p - 0.5) * live
        norm = forces.abs().sum() / n_live
        forces = forces / norm.clamp_min(1e-30)
        d_task, d_lam = (b * task).sum(), (b * forces).sum()
        excess = self._expected - target_next - lr * d_task
        lam = (excess / (lr * d_lam).clamp_min(1e-30)).clamp_max(self.max_multiplier).maximum(self._lower())
        lam = torch.where(d_lam > 0, lam, torch.zeros_like(lam))
        self.multiplier.copy_(lam)
        p = p - lr * (task + lam * forces)
        pushed_up = p.gather(1, lv).view(-1) > 1.0
        p = p.clamp(0.0, 1.0)
        self.step_count.add_(1)
        if self.drop_threshold is not None:
            last_list = [self.state[x]["last_drop"] for x in params]
            last = torch.stack(last_list)
            step = self.step_count
            beta = p.gather(1, lv).view(-1)
            ok = ((step - last) >= self.min_steps_between_drops) & ~settled
            above = self._expected > target_now
            below = self._expected < target_now
            drop = (beta <= self.drop_threshold) & (levels > 0) & above & ok
            rise = pushed_up & (levels < p.shape[1] - 1) & below & ok & ((harden == 0) | self.settle)
            new = levels - drop.long() + rise.long()
            value = torch.where(drop, torch.full_like(beta, self.reinit_dbp),
                                torch.where(rise, torch.full_like(beta, 2 * self.drop_threshold),
                                            p.gather(1, new.view(-1, 1)).view(-1)))
            p = p.scatter(1, new.view(-1, 1), value.view(-1, 1))
            torch._foreach_copy_([q.level for q in self.quantizers], new.unbind(0))
            torch._foreach_copy_(last_list, torch.where(drop | rise, step, last).unbind(0))
        torch._foreach_copy_(params, p.to(params[0].dtype).unbind(0))

    def _settle_now(self, beta: Tensor, levels: Tensor, settled: Tensor, units: Tensor,
                    eligible: Tensor | None = None) -> Tensor:
        """Which layers settle at this step (sequential settling, ``settle=True``, while hardening).

        A settled layer's live DBP is rounded to 0 or 1 and no longer moves; the multiplier then holds the budget
        with the layers still moving, which absorb the rounding. The number of decided layers (settled, or at the
        lowest candidate) follows ``floor(n * harden)``: none when hardening starts, all but the last one at the
        last step, so the freeze's rounding only decides the last (smallest) layers. Largest unit cost first, ties
        by the most decided DBP: a large layer's rounding moves the cost by much, and the smaller layers still
        moving can absorb it; the small layers settle last, where a rounding costs little. All on the device (the
        goal ``int(n * harden)`` is a device scalar of :meth:`set_schedule`)."""
        n = beta.shape[0]
        decided = settled | (levels == 0)
        if eligible is not None:
            decided = decided | ~eligible
        short = self._sched[4] - decided.sum()
        score = torch.where(decided, torch.full_like(beta, -1.0), units * (1 + (beta - 0.5).abs()))
        order = score.argsort(descending=True)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=beta.device))
        return ~decided & (rank < short)

    def _settle_loop(self, params: list[Tensor]) -> None:
        """:meth:`_settle_now` for the per-layer path (progressive layers only; cascade layers never settle), with
        the expected cost moved by the rounding (exact: linear in the live DBP) before the multiplier is solved."""
        progressive = self._progressive
        levels = torch.stack([q.level for q in self.quantizers])
        beta = torch.stack([p.index_select(0, q.level.view(1))[0] for q, p in zip(self.quantizers, params)])
        settled_list = [self.state[p]["settled"] for p in params]
        settled = torch.stack(settled_list) > 0.5
        now = self._settle_now(beta, levels, settled, self._units.view(-1), eligible=progressive)
        jump = torch.zeros_like(self._expected)
        for q, p, flag, dc in zip(self.quantizers, params, now.unbind(0), self._budget_grads):
            b = p.index_select(0, q.level.view(1))
            rounded = torch.where(flag, (b >= 0.5).to(b.dtype), b)
            jump = jump + (dc.index_select(0, q.level.view(1)) * (rounded - b)).sum()
            p.index_put_((q.level.view(1),), rounded)
        self._expected = self._expected + jump
        torch._foreach_copy_(settled_list, (settled | now).to(settled_list[0].dtype).unbind(0))

    def _drop_levels(self, params: list[Tensor], pushed_up: list[Tensor]) -> None:
        """Level changes on the device: down when the live DBP reached the threshold and the cost is above the
        schedule; up (``dual`` only) when the live DBP was pushed past 1 and the cost is below it. Both keep the
        expected bits continuous up to the threshold (down: re-initialised to ``reinit_dbp``; up: to twice the
        threshold)."""
        above = self._expected > self._target_now
        below = self._expected < self._target_now
        step = self.step_count
        for q, p, up in zip(self.quantizers, params, pushed_up):
            if getattr(q, "reading", "progressive") != "progressive":
                continue
            st = self.state[p]
            lvl = q.level
            beta = p.index_select(0, lvl.view(1))[0]
            ok = ((step - st["last_drop"]) >= self.min_steps_between_drops) & (st["settled"] < 0.5)
            drop = (beta <= self.drop_threshold) & (lvl > 0) & above & ok
            rise = (up & (lvl < p.shape[0] - 1) & below & ok & (self.control == "dual")
                    & (self._harden == 0 or self.settle))
            new = lvl - drop.long() + rise.long()
            value = torch.where(drop, torch.full_like(beta, self.reinit_dbp),
                                torch.where(rise, torch.full_like(beta, 2 * self.drop_threshold),
                                            p.index_select(0, new.view(1))[0]))
            p.index_put_((new.view(1),), value.view(1))
            lvl.copy_(new)
            st["last_drop"].copy_(torch.where(drop | rise, step, st["last_drop"]))

    # ------------------------------------------------------------------ measured differences (task_estimate=paired)
    @torch.no_grad()
    def record_probe(self, layer: Tensor, hi_minus_lo: Tensor) -> None:
        """Record one measured ``L(b_hi) - L(b_lo)`` of the live level of the layer ``layer`` (a 0-dim device index;
        nothing is recorded when that layer sits at its lowest candidate): the sensitivity of that level moves to
        the running mean of its measurements, then to an EMA with ``probe_decay``. All on the device."""
        params = [g["params"][0] for g in self.param_groups]
        sens_list = [self.state[x]["sens"] for x in params]
        count_list = [self.state[x]["probes"] for x in params]
        at_list = [self.state[x]["probed_at"] for x in params]
        sens, count = torch.stack(sens_list), torch.stack(count_list)
        levels = torch.stack([q.level for q in self.quantizers]).view(-1, 1)
        rows = torch.arange(len(params), device=sens.device).view(-1, 1) == layer
        cols = torch.arange(sens.shape[1], device=sens.device).view(1, -1) == levels
        hit = rows & cols & (levels > 0)
        count = count + hit.to(count.dtype)
        weight = torch.maximum(1.0 / count.clamp_min(1.0), torch.full_like(count, 1.0 - self.probe_decay))
        value = -hi_minus_lo.detach().to(sens.dtype)  # the loss decrease per level up, as the EMA of -dL/dbeta
        torch._foreach_copy_(sens_list, torch.where(hit, sens + weight * (value - sens), sens).unbind(0))
        torch._foreach_copy_(count_list, count.unbind(0))
        at = torch.stack(at_list)
        torch._foreach_copy_(at_list, torch.where(rows.view(-1), self.step_count, at).unbind(0))

    def measured_grads(self) -> list[Tensor]:
        """The task gradients of the measured differences: ``dE[L]/dbeta = L(b_hi) - L(b_lo)`` per level (the
        expected loss is linear in the live DBP), 0 where a level was never measured."""
        out = []
        for g in self.param_groups:
            st = self.state[g["params"][0]]
            out.append(torch.where(st["probes"] > 0, -st["sens"], torch.zeros_like(st["sens"])))
        return out

    def sensitivity(self) -> list[Tensor]:
        """Per layer, the EMA of -dL/dbeta per candidate index (0 where never live)."""
        return [self.state[g["params"][0]]["sens"] for g in self.param_groups]


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
