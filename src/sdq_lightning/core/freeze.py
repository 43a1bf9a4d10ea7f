"""The phase boundary of the SDQ callback: decide each searched layer's bitwidth, project the decision onto the
budget, freeze every quantizer at its bitwidth, and say what happened.

:func:`freeze_searched` works on the search (:class:`~sdq_lightning.core.search.BitSearch`) and the model only;
:class:`~sdq_lightning.callbacks.sdq.SDQ` calls it at the last training batch of the last search epoch, then builds
and saves the plan. Tested on its own in ``tests/callbacks/test_freeze.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from sdq_lightning.surgery import quant_layers

__all__ = ["FreezeResult", "freeze_searched", "freeze_message", "freeze_warnings"]

UNDECIDED_BELOW = 0.9  # a layer is "undecided" at the freeze while its most probable bitwidth has less probability
UNREACHED_ABOVE = 0.02  # the search reached the budget if its expected cost is within this fraction of the target


@dataclass
class FreezeResult:
    """What the freeze decided. ``record`` is what history.json keeps at the freeze epoch."""

    bits: dict[str, int | None]  # the frozen bitwidth of each searched layer (after the projection)
    decided: dict[str, int | None]  # the search's own rounding (before the projection)
    changed: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer: (decided, frozen), where they differ
    record: dict[str, Any] = field(default_factory=dict)


def freeze_searched(search: Any, root: nn.Module) -> FreezeResult:
    """Decide (the search's rounding), project onto the budget (``search.freeze_bits``) and freeze every quantized
    layer of ``root`` at its bitwidth. Reads the device (once, at the boundary)."""
    expected_cost = float(search.cost_model.expected(search.budget.metric).detach())
    undecided = sum(int(q.probabilities().detach().max() < UNDECIDED_BELOW) for q in search.quantizers
                    if not q.frozen)
    decided, bits, expected_avg = search.freeze_bits()
    for name, layer in quant_layers(root).items():
        if layer.weight_quant is not None and bits.get(name) is not None:
            layer.weight_quant.freeze(bits[name])
    changed = {n: (decided[n], bits[n]) for n in bits if decided[n] != bits[n]}
    cands = {n: q.candidates for n, q in zip(search.names, search.quantizers)}
    levels = {n: abs(cands[n].index(b) - cands[n].index(d)) for n, (d, b) in changed.items() if n in cands}
    record = {"expected_avg_bits": expected_avg, "expected_cost": expected_cost,
              "projection_changed_layers": len(changed), "undecided_layers": undecided,
              "rounding_changed_layers": search.argmax_changed,
              "projection_max_levels": max(levels.values()) if levels else 0, "decided_bits": decided}
    return FreezeResult(bits=bits, decided=decided, changed=changed, record=record)


def freeze_message(epoch: int, plan: Any, budget: Any, result: FreezeResult) -> str:
    """One log line: the plan's cost against the budget, the expected cost before the projection, how many layers
    were undecided and what the projection changed."""
    cost = "" if budget.metric == "avg_bits" else f", {budget.metric} {plan.cost(budget.metric):.6g}"
    rec = result.record
    return (f"[SDQ] froze the plan at epoch {epoch}: avg bits {plan.average_bits:.4f}{cost} (target {budget.metric} "
            f"<= {budget.target:g}); expected before the projection {rec['expected_cost']:.6g} "
            f"({rec['undecided_layers']} layers undecided: top probability < {UNDECIDED_BELOW}; the budget rounding "
            f"moved {rec['rounding_changed_layers']}); projection changed {len(result.changed)} layers {result.changed}")


def many_layers(searched: int) -> int:
    """A projection that changes more than this many of ``searched`` layers decided the plan instead of the search
    (with sequential settling it changes 0-1)."""
    return max(1, searched // 10)


def freeze_warnings(plan: Any, budget: Any, result: FreezeResult, searched: int) -> list[str]:
    """One line per sign that the search did not decide the plan: its expected cost at the freeze still above the
    target, or a projection that changed many layers."""
    rec, out = result.record, []
    expected, target = rec["expected_cost"], budget.target
    if expected > target * (1 + UNREACHED_ABOVE):
        out.append(f"[SDQ] the search had not reached the budget by the freeze: expected {budget.metric} "
                   f"{expected:.6g} against the target {target:g} ({100 * (expected / target - 1):+.1f} %), so the "
                   f"projection cut the plan down to {plan.cost(budget.metric):.6g}; the search was too short to "
                   "descend: give it more steps (search_epochs, more training batches) or a higher search.dbp_lr")
    changed = len(result.changed)
    if changed > many_layers(searched):
        out.append(f"[SDQ] the projection changed {changed} of {searched} searched layers (up to "
                   f"{rec['projection_max_levels']} levels): the plan is the projection's ranking more than the "
                   f"search's decision; {rec['undecided_layers']} layers were undecided at the freeze; a longer search "
                   "(search_epochs) lets the layers settle")
    return out
