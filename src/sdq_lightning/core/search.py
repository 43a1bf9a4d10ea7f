"""The bit search of phase 1 and the freeze at the phase boundary, as one object the SDQ callback drives.

:class:`BitSearch` owns the DBP optimizer (:class:`~sdq_lightning.quantizers.optim.DBPOptimizer`, budget controller
inside), the expected-cost schedule, the per-step draw counter and temperature, and the freeze (decide, project onto
the budget by a loss-aware ranking, freeze). It holds no Lightning state of its own: the callback calls
:meth:`begin_step` before a training batch, :meth:`step` in ``on_before_optimizer_step`` and :meth:`freeze` at the
phase boundary.

Search signals (``search_signal``), the controls that can refute the method:

* ``task+budget`` (default): the DBPs move by the task gradient and the budget controller;
* ``budget_only``: the same controller, no task force (the task gradients are still measured for the projection);
* ``projection_only``: the DBPs never move; the freeze projects the starting plan (every layer at its top
  candidate) onto the budget by the measured sensitivity;
* ``size_greedy``: the DBPs never move; the freeze projects the starting plan by a seeded random per-layer slope
  divided by the cost a drop saves, so the largest layers fall first (a size heuristic, not a random plan);
* ``random``: the DBPs never move; the freeze takes a plan drawn uniformly from all plans whose cost lies within 1 %
  under the target (:func:`sdq_lightning.planning.random_plan`, seeded): size-neutral, no ranking of any kind.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from sdq_lightning.budget import Budget, CostModel, budget_penalty, project_to_budget
from sdq_lightning.budget.costmodel import quantization_mse
from sdq_lightning.modules.graphs import CallCaptureFn, GraphedCall
from sdq_lightning.quantizers.optim import DBPOptimizer
from sdq_lightning.quantizers.sdq import stacked_expected_bits

__all__ = ["BUDGET_CONTROLS", "PROJECTION_SENSITIVITIES", "SEARCH_SIGNALS", "TASK_ESTIMATES", "BitSearch"]

BUDGET_CONTROLS = ("dual", "penalty")
SEARCH_SIGNALS = ("task+budget", "budget_only", "projection_only", "size_greedy", "random")
TASK_ESTIMATES = ("pathwise", "paired", "paired_train", "paired_isolated")
PROJECTION_SENSITIVITIES = ("task_grad", "weight_mse")
ROUNDINGS = ("budget", "argmax")


class BitSearch:
    """Phase 1 of SDQ over the searchable layers of a model (see the module docstring)."""

    def __init__(self, cost_model: CostModel, budget: Budget, *, control: str = "dual",
                 signal: str = "task+budget", dbp_lr: float | None = None, task_weight: float = 1.0,
                 budget_reach: float = 0.75, penalty_weight: float = 1.0, penalty: str = "squared_hinge",
                 drop_threshold: float = 0.05, reinit_dbp: float = 1.0, min_steps_between_drops: int = 1,
                 projection_sensitivity: str = "task_grad", seed: int = 0, rounding: str = "argmax",
                 settle: bool = True, task_estimate: str = "pathwise", lookahead_levels: int = 0,
                 lookahead_repeats: int = 4) -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if task_estimate not in TASK_ESTIMATES:
            raise ValueError(f"task_estimate must be one of {TASK_ESTIMATES}, got {task_estimate!r}")
        self.task_estimate = task_estimate
        self.rounding = rounding
        self.settle = bool(settle)
        self.argmax_changed = 0  # layers the last freeze_bits' budget rounding moved from the per-layer argmax
        self.cost_model, self.budget = cost_model, budget
        self.control, self.signal = control, signal
        self.dbp_lr, self.task_weight, self.budget_reach = dbp_lr, float(task_weight), float(budget_reach)
        self.penalty_weight, self.penalty = float(penalty_weight), penalty
        self.drop_threshold, self.reinit_dbp = float(drop_threshold), float(reinit_dbp)
        self.min_steps_between_drops = int(min_steps_between_drops)
        self.projection_sensitivity, self.seed = projection_sensitivity, int(seed)
        self.names = cost_model.searchable()
        self.quantizers = [cost_model.quantizer(n) for n in self.names]
        if task_estimate != "pathwise":
            other = [(n, getattr(q, "reading", "?")) for n, q in zip(self.names, self.quantizers)
                     if getattr(q, "reading", "") != "progressive"]
            if other:
                raise ValueError(f"task_estimate={task_estimate!r} needs the progressive reading; layer {other[0][0]} reads "
                                 f"its DBPs as {other[0][1]!r}")
        if lookahead_levels and task_estimate == "pathwise":
            raise ValueError("lookahead_levels needs a measured task estimate (paired, paired_train or paired_isolated); "
                             "got task_estimate='pathwise'")
        if int(lookahead_levels) < 0 or int(lookahead_repeats) < 1:
            raise ValueError(f"lookahead_levels must be >= 0 and lookahead_repeats >= 1, got {lookahead_levels!r} and "
                             f"{lookahead_repeats!r}")
        self.lookahead_levels, self.lookahead_repeats = int(lookahead_levels), int(lookahead_repeats)
        self.lookahead_done = 0  # lookahead probes made so far (host count: the schedule is fixed in advance)
        self._draw = (0, 1.0)  # the last begin_step's (global step, temperature): a probe repeats that step's draws
        self.units = self._unit_costs()
        self.optimizer: DBPOptimizer | None = None
        self.start_cost: float | None = None
        self.total_steps: int | None = None
        self.steps_done = 0
        self.last_terms: dict[str, Tensor] = {}
        self.trace: dict[str, list] = {"step": [], "expected_bits": [], "expected_cost": [], "control": []}
        self._trace_buf: list[tuple[int, Tensor]] = []  # device tensors, read back at flush_trace()
        self.graph: GraphedCall | None = None  # the DBP step as a CUDA graph (use_graphs)

    def use_graphs(self, enabled: bool = True, capture_fn: CallCaptureFn | None = None) -> None:
        """Replay the DBP step (expected cost, its DBP gradients, the controller's stacked step) as one CUDA graph
        when it can be (:attr:`DBPOptimizer.stackable`, DBPs moving, no gradient scaler); the schedule enters as
        device scalars set eagerly (:meth:`DBPOptimizer.set_schedule`), the task gradients as a stacked input.
        ``capture_fn``: see :class:`~sdq_lightning.modules.graphs.GraphedCall` (tests pass a CPU stand-in)."""
        self.graph = GraphedCall(self._graphed_core, key=self._graph_key, name="the DBP step",
                                 capture_fn=capture_fn, state=self._step_state) if enabled else None

    def _graph_key(self) -> tuple:
        opt = self.optimizer
        return id(opt), opt.param_groups[0]["lr"] if opt is not None else None

    def _step_state(self) -> list[Tensor]:
        """What a DBP step changes in place: the DBPs, the levels, the controller and the optimizer's state."""
        opt = self.optimizer
        out = [q.dbp for q in self.quantizers] + [q.level for q in self.quantizers]
        out += [opt.multiplier, opt.rms, opt.step_count]
        for st in opt.state.values():
            out += [v for v in st.values() if isinstance(v, Tensor)]
        return out

    # ------------------------------------------------------------------ set-up
    def _unit_costs(self) -> list[float]:
        """d(cost)/d(bits) of each searchable layer, relative to the mean (1 for equal layers)."""
        metric = self.budget.metric
        bits = self.cost_model.current_bits()
        base = self.cost_model.of_bits(bits, metric)
        raw = []
        for n in self.names:
            b = bits[n] if bits[n] is not None else 8
            raw.append(abs(self.cost_model.of_bits({**bits, n: b + 1}, metric) - base))
        mean = sum(raw) / max(len(raw), 1) or 1.0
        return [max(r / mean, 1e-6) for r in raw]

    def start(self, steps_per_epoch: int, search_epochs: int, pending_state: Mapping[str, Any] | None = None) -> None:
        """Build the optimizer at the first search step (the number of steps is known then)."""
        if pending_state:
            self.start_cost = pending_state.get("start_cost")
            self.total_steps = pending_state.get("total_steps")
            self.steps_done = int(pending_state.get("steps_done", 0))
            self.lookahead_done = int(pending_state.get("lookahead_done", 0))
            if pending_state.get("trace"):
                self.trace = pending_state["trace"]
        if self.total_steps is None:
            self.total_steps = max(int(steps_per_epoch) * int(search_epochs), 1)
        if self.start_cost is None:
            self.start_cost = float(self.cost_model.expected(self.budget.metric).detach())  # one host read
        lr = self.dbp_lr
        if lr is None:
            lr = self._auto_lr() if self.control == "dual" else 0.05
        self.optimizer = DBPOptimizer(self.quantizers, self.units, lr=lr, control=self.control,
                                      task_weight=self.task_weight if self.signal == "task+budget" else 0.0,
                                      drop_threshold=self.drop_threshold, reinit_dbp=self.reinit_dbp,
                                      min_steps_between_drops=self.min_steps_between_drops, settle=self.settle,
                                      measured=self.probes_wanted)
        if pending_state and pending_state.get("optimizer") is not None:
            self.optimizer.load_state_dict(pending_state["optimizer"])

    def _auto_lr(self) -> float:
        """The DBP travel per step at which the nominal push (lambda = 1) meets the schedule: the number of
        one-level steps of every searched layer needed to go from the start cost to the target, spread over the
        reaching part of the search."""
        metric = self.budget.metric
        bits = self.cost_model.current_bits()
        base = self.cost_model.of_bits(bits, metric)
        per_level = 0.0  # cost saved when every searched layer drops one level
        for n, q in zip(self.names, self.quantizers):
            i = q.candidates.index(bits[n])
            if i > 0:
                per_level += base - self.cost_model.of_bits({**bits, n: q.candidates[i - 1]}, metric)
        per_level /= max(len(self.names), 1)
        levels = abs(self.start_cost - self.budget.target) / max(per_level * len(self.names), 1e-12)
        return float(min(max(levels / max(self.budget_reach * self.total_steps, 1.0), 1e-4), 1.0))

    # ------------------------------------------------------------------ schedule
    def target_at(self, step: int) -> float:
        """The expected-cost schedule: linear from the start cost to the target over ``budget_reach`` of the
        search, then the target."""
        frac = min(step / max(self.budget_reach * self.total_steps, 1.0), 1.0)
        return self.start_cost + (self.budget.target - self.start_cost) * frac

    def harden_at(self, step: int) -> float:
        """Weight of the hardening force: 0 while the schedule descends, then linear to 1 at the end."""
        start = self.budget_reach * self.total_steps
        if self.total_steps <= start:
            return 0.0
        return min(max((step - start) / (self.total_steps - start), 0.0), 1.0)

    # ------------------------------------------------------------------ per step
    def begin_step(self, global_step: int, temperature: float) -> None:
        """Set every searched layer's draw counter and temperature: two multi-tensor operations each, not one fill
        per layer (on a GPU each is a kernel launch)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self._draw = (int(global_step), float(temperature))
        if not self.quantizers:
            return
        for bufs, value in (([q.draw_step for q in self.quantizers], int(global_step)),
                            ([q.temperature for q in self.quantizers], float(temperature))):
            torch._foreach_zero_(bufs)
            torch._foreach_add_(bufs, value)

    @property
    def probes_wanted(self) -> bool:
        """Whether the task signal is measured by paired forwards (:meth:`probe`) rather than the DBP gradients."""
        return self.task_estimate != "pathwise"

    def use_pathwise(self) -> None:
        """Measure the task force by the DBP gradients from now on (the paired measurements cannot be made)."""
        self.task_estimate = "pathwise"
        self.lookahead_levels = 0  # nothing measured ahead either: every level from the DBP gradients
        if self.optimizer is not None:
            self.optimizer.measured = False

    def lookahead_plan(self) -> list[tuple[int, int]]:
        """The lookahead probes in order: ``(layer, level)`` for level indices 1..``lookahead_levels`` (level i
        decides between ``candidates[i - 1]`` and ``candidates[i]``: 1 is the lowest drop), every searched layer that
        has that level, ``lookahead_repeats`` rounds, lowest level first within a round."""
        return [(i, lv) for _ in range(self.lookahead_repeats) for lv in range(1, self.lookahead_levels + 1)
                for i, q in enumerate(self.quantizers) if lv < len(q.candidates)]

    @property
    def lookahead_pending(self) -> bool:
        """Whether lookahead probes are still to be made (they come before any live-level probe)."""
        return self.lookahead_levels > 0 and self.lookahead_done < len(self.lookahead_plan())

    @property
    def probes(self) -> bool:
        """Whether a probe can be recorded now (paired estimate, the search started)."""
        return self.probes_wanted and self.optimizer is not None

    @torch.no_grad()
    def probe(self, main_loss: Tensor | None, loss_of: Callable[[], Tensor], count: int = 1) -> None:
        """Paired measurements of ``L(b_hi) - L(b_lo)`` for up to ``count`` layers (``task_estimate="paired"``,
        ``"paired_train"`` or ``"paired_isolated"``).

        ``main_loss``: the reference loss of this step's batch, from a forward whose every layer's ``last_index``
        says which of its two live widths it used (the training forward, or an eval forward at the current
        decisions); ``loss_of()``: the same loss from another forward of the same batch with the same weights and
        mode (no gradients; the caller keeps BatchNorm statistics and other buffers unchanged). Per probed layer, its
        width is flipped (hi <-> lo at its live level) and every other layer uses what it used (in train mode: the
        same draw step): the difference is that layer's loss change at its live level on this batch, with the
        batch's noise cancelled. The layers probed are distinct: those not probed for longest among the ones still
        moving (level above the lowest, not settled), levels never measured first, ties to the lower index. A slot
        with no such layer left costs its forward and records nothing. In a distributed run the differences of all
        probes are averaged over the ranks in one all-reduce (every rank probes the same layers on its own batch).
        All on the device: the choice, the flips and the records.

        ``"paired_isolated"``: the oracle's context instead of the search's: every other searched layer at its top
        width while the probed layer is measured at its two live widths (two forwards per probed layer; ``main_loss``
        is not used). Levels and DBPs are put back afterwards.

        ``lookahead_levels > 0``: the search first measures its lowest levels ahead of time, while the network is
        still near its starting point (see :meth:`lookahead_plan`; ``main_loss`` is not used, two eval forwards per
        probe: the probed layer at the two widths of that level, every other layer at its current decision). Those
        measurements are final: afterwards only levels above ``lookahead_levels`` are probed live."""
        qs, opt = self.quantizers, self.optimizer
        if not qs or opt is None:
            return
        if self.lookahead_pending:
            self._lookahead(loss_of, count)
            return
        dbps = [q.dbp for q in qs]
        levels = torch.stack([q.level for q in qs])
        states = [opt.state[p] for p in dbps]
        settled = torch.stack([st["settled"] for st in states]) > 0.5
        unmeasured = torch.stack([st["probes"] for st in states]).gather(1, levels.view(-1, 1)).view(-1) == 0
        last = torch.stack([st["probed_at"] for st in states]).float()
        eligible = (levels > self.lookahead_levels) & ~settled  # lookahead levels are measured already
        score = torch.where(eligible, unmeasured.float() * 1e9 - last, torch.full_like(last, -float("inf")))
        layers = torch.sort(score, descending=True, stable=True).indices[:min(int(count), len(qs))]
        p = torch.stack([d.detach() for d in dbps])
        diffs = []
        try:
            if self.task_estimate == "paired_isolated":
                diffs = self._isolated_probes(layers, levels, p, loss_of)
            else:
                took_hi = torch.stack([q.last_index for q in qs]) == levels
                live = p.gather(1, levels.view(-1, 1)).view(-1)
                rows = torch.arange(len(qs), device=p.device)
                main = main_loss.detach().float()
                for layer in layers.unbind(0):
                    forced = torch.where(rows == layer, (~took_hi).to(p.dtype), live)  # the other width, certainly
                    torch._foreach_copy_(dbps, p.scatter(1, levels.view(-1, 1), forced.view(-1, 1)).unbind(0))
                    self.begin_step(*self._draw)  # the same uniforms as the training forward
                    other = loss_of().detach().float()
                    diffs.append(torch.where(took_hi.index_select(0, layer.view(1))[0], main - other, other - main))
        finally:
            torch._foreach_copy_(dbps, p.unbind(0))
            torch._foreach_copy_([q.level for q in qs], levels.unbind(0))
        hi_minus_lo = torch.stack(diffs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(hi_minus_lo)
            hi_minus_lo = hi_minus_lo / torch.distributed.get_world_size()
        ok = eligible.index_select(0, layers) & torch.isfinite(hi_minus_lo)
        opt.record_probe(torch.where(ok, layers, torch.full_like(layers, -1)), torch.where(ok, hi_minus_lo, 0.0))

    def _lookahead(self, loss_of: Callable[[], Tensor], count: int) -> None:
        """The next ``count`` probes of :meth:`lookahead_plan` (each its own record: a layer may come twice)."""
        qs, opt = self.quantizers, self.optimizer
        plan = self.lookahead_plan()
        todo = plan[self.lookahead_done:self.lookahead_done + max(int(count), 1)]
        dbps = [q.dbp for q in qs]
        levels = torch.stack([q.level for q in qs])
        p = torch.stack([d.detach() for d in dbps])
        rows = torch.arange(len(qs), device=p.device)
        made = []
        try:
            for layer, level in todo:
                probed = rows == layer
                at = torch.where(probed, torch.full_like(levels, level), levels)
                torch._foreach_copy_([q.level for q in qs], at.unbind(0))
                loss = []
                for keep in (1.0, 0.0):  # the higher width of that level, then the lower one
                    col = p[:, level].clone()
                    forced = torch.where(probed, torch.full_like(col, keep), col)
                    torch._foreach_copy_(dbps, p.scatter(1, torch.full_like(levels, level).view(-1, 1),
                                                         forced.view(-1, 1)).unbind(0))
                    self.begin_step(*self._draw)
                    loss.append(loss_of().detach().float())
                made.append((layer, level, loss[0] - loss[1]))
        finally:
            torch._foreach_copy_(dbps, p.unbind(0))
            torch._foreach_copy_([q.level for q in qs], levels.unbind(0))
        self.lookahead_done += len(todo)
        if not made:
            return
        diffs = torch.stack([d for _, _, d in made])
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # one all-reduce for the step
            torch.distributed.all_reduce(diffs)
            diffs = diffs / torch.distributed.get_world_size()
        dev = p.device
        for (layer, level, _), diff in zip(made, diffs.unbind(0)):
            ok = torch.isfinite(diff)
            opt.record_probe(torch.where(ok, torch.tensor(layer, device=dev), torch.tensor(-1, device=dev)),
                             torch.where(ok, diff, 0.0), level=torch.tensor(level, device=dev))

    def _isolated_probes(self, layers: Tensor, levels: Tensor, p: Tensor, loss_of: Callable[[], Tensor]
                         ) -> list[Tensor]:
        """``L(b_hi) - L(b_lo)`` of each of ``layers`` with every other searched layer at its top width (the caller
        restores levels and DBPs)."""
        qs = self.quantizers
        rows = torch.arange(len(qs), device=p.device)
        top = torch.full_like(levels, p.shape[1] - 1)
        out = []
        for layer in layers.unbind(0):
            probed = rows == layer
            at = torch.where(probed, levels, top)
            torch._foreach_copy_([q.level for q in qs], at.unbind(0))
            at = at.view(-1, 1)
            loss = []
            for keep in (1.0, 0.0):  # the probed layer at its live level's higher width, then the lower one
                forced = torch.where(probed, torch.full_like(p[:, 0], keep), torch.ones_like(p[:, 0]))
                torch._foreach_copy_([q.dbp for q in qs], p.scatter(1, at, forced.view(-1, 1)).unbind(0))
                self.begin_step(*self._draw)
                loss.append(loss_of().detach().float())
            out.append(loss[0] - loss[1])
        return out

    @property
    def moves(self) -> bool:
        return self.signal in ("task+budget", "budget_only")

    def step(self, scaler: Any = None) -> dict[str, Tensor]:
        """One DBP step from the gradients in ``.grad`` (scaled by ``scaler`` if given). Returns tensors to log."""
        opt = self.optimizer
        if scaler is not None:
            scaler.unscale_(opt)
        if self.probes_wanted:  # the measured differences replace the pathwise gradients
            for q, g in zip(self.quantizers, opt.measured_grads()):
                q.dbp.grad = g.to(q.dbp.dtype)
        now, nxt = self.target_at(self.steps_done), self.target_at(self.steps_done + 1)
        opt.set_schedule(now, nxt, harden=self.harden_at(self.steps_done))
        if self.graph is not None and scaler is None and opt.stackable and self.moves:
            # the graph's output is overwritten by its next replay: the logged cost is a copy
            expected = self.graph(opt.stacked_task_grads()).clone()
            objective = expected
        else:
            expected, objective = self._core(scaler)
        opt.zero_grad(set_to_none=True)
        self.steps_done += 1
        every = max(self.total_steps // 200, 1)
        if self.steps_done % every == 0 or self.steps_done == 1:
            with torch.no_grad():
                control = opt.multiplier if self.control == "dual" else objective.detach()
                bits = stacked_expected_bits(self.quantizers)  # one pass; per layer for cascade/mixed sets
                if bits is None:
                    bits = torch.stack([q.expected_bits() for q in self.quantizers])
                row = torch.cat([bits.detach().float(), torch.stack([expected.detach().float(), control.float()])])
            self._trace_buf.append((self.steps_done, row))
        terms = {"expected_cost": expected.detach(), "budget_schedule": torch.tensor(nxt)}
        if self.control == "dual":
            terms["multiplier"] = opt.multiplier.clone()
        else:
            terms["penalty"] = objective.detach()
        self.last_terms = terms
        return terms

    def _core(self, scaler: Any = None, task_grads: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The step's device work: the expected cost and its DBP gradients, then the controller's step. Returns the
        expected cost and the objective (detached)."""
        opt = self.optimizer
        dbps = [q.dbp for q in self.quantizers]
        with torch.enable_grad():
            expected = self.cost_model.expected(self.budget.metric)
            if self.control == "penalty":
                objective = self.penalty_weight * budget_penalty(expected, self.budget, self.penalty)
            else:
                objective = expected
            grads = torch.autograd.grad(objective, dbps, allow_unused=True) if objective.requires_grad else \
                [None] * len(dbps)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(dbps, grads)]
        opt.prepare(grads, expected, task_grads=task_grads)
        if self.moves:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        else:  # measure only: the sensitivity EMA, no move
            opt.update_sensitivity()
        return expected.detach(), objective.detach()

    def _graphed_core(self, task_grads: Tensor) -> Tensor:
        return self._core(None, task_grads)[0]

    def flush_trace(self) -> dict[str, list]:
        """Move the recorded trace to the host (one read; call at epoch ends) and return it."""
        if self._trace_buf:
            rows = torch.stack([r for _, r in self._trace_buf]).cpu().tolist()
            for (step, _), row in zip(self._trace_buf, rows):
                self.trace["step"].append(step)
                self.trace["expected_bits"].append(dict(zip(self.names, row[:-2])))
                self.trace["expected_cost"].append(row[-2])
                self.trace["control"].append(row[-1])
            self._trace_buf = []
        return self.trace

    # ------------------------------------------------------------------ freeze
    def sensitivities(self, root: torch.nn.Module | None = None) -> dict[str, dict[int, float]]:
        """``sens[name][bits]``: the loss the layer adds at ``bits`` (up to a constant), for the projection."""
        if self.signal == "size_greedy":
            rng = _random.Random(self.seed)
            out = {}
            for n, q in zip(self.names, self.quantizers):
                slope = rng.random()
                out[n] = {b: -slope * i for i, b in enumerate(q.candidates)}
            return out
        if self.projection_sensitivity == "weight_mse":
            return {n: quantization_mse(e.layer) for n in self.names
                    for e in self.cost_model.entries if e.name == n}
        from sdq_lightning.planning.sensitivity import level_table

        sens = self.optimizer.sensitivity() if self.optimizer is not None else [None] * len(self.names)
        # per index i: the EMA of -dL/dbeta_i estimates the loss decrease of b_{i-1} -> b_i; integrated per layer
        return {n: level_table(q.candidates, [0.0] * len(q.candidates) if s is None else s.detach().cpu().tolist())
                for n, q, s in zip(self.names, self.quantizers, sens)}

    def freeze_bits(self) -> tuple[dict[str, int | None], dict[str, int | None], float]:
        """(decided bits, projected bits, expected avg bits before the projection)."""
        expected_avg = float(self.cost_model.expected("avg_bits").detach())
        decided = self.cost_model.current_bits()
        self.argmax_changed = 0
        if self.signal == "random":  # a size-neutral random plan, taken as drawn (no projection, no fill-up)
            from sdq_lightning.planning import PlanProblem, random_plan

            drawn = random_plan(PlanProblem.of_cost_model(self.cost_model), self.budget, seed=self.seed)
            return {**decided, **drawn}, {**decided, **drawn}, expected_avg
        if not self.moves:  # the controls that do not search start the projection from the top candidates
            for n, q in zip(self.names, self.quantizers):
                decided[n] = q.candidates[-1]
        elif self.rounding == "budget":
            rounded = self.round_to_budget(decided)
            self.argmax_changed = sum(int(rounded[n] != decided[n]) for n in decided)
            decided = rounded
        projected = project_to_budget(self.cost_model, decided, self.budget, self.sensitivities(),
                                      max_raise_levels=1 if self.moves else None)
        return decided, projected, expected_avg

    def round_to_budget(self, argmax: Mapping[str, int | None]) -> dict[str, int | None]:
        """The search's own rounding at the budget (``rounding="budget"``; the default ``"argmax"`` rounds each live
        DBP at 0.5 on its own; progressive reading): every searched layer whose live DBP is not already 0 or 1 (not
        settled) takes the lower of its two live bitwidths, then, in order of decreasing live DBP (the most confident
        first), the higher one wherever the cost stays within the target. Equal to the per-layer argmax when that
        plan is within the budget and leaves no layer that fits; when the search ends fractional (a large layer half
        way between two levels holds the expected cost at the target), it decides by the DBPs instead of leaving the
        correction to the projection. Reads the device (once, at the freeze)."""
        bits = dict(argmax)
        options = []
        for n, q in zip(self.names, self.quantizers):
            if q.frozen or getattr(q, "reading", "progressive") != "progressive":
                continue
            level = int(q.level)
            if level == 0:
                continue
            beta = float(q.dbp.detach()[level].clamp(0.0, 1.0))
            if beta in (0.0, 1.0):  # decided (a settled layer): keep its argmax
                continue
            bits[n] = q.candidates[level - 1]
            options.append((beta, n, q.candidates[level]))
        metric, target = self.budget.metric, self.budget.target
        for _, n, up in sorted(options, key=lambda o: -o[0]):
            trial = {**bits, n: up}
            if self.cost_model.of_bits(trial, metric) <= target:
                bits = trial
        return bits

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self.flush_trace()
        return {"trace": self.trace, "control": self.control, "start_cost": self.start_cost, "total_steps": self.total_steps, "steps_done": self.steps_done,
                "lookahead_done": self.lookahead_done,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}
