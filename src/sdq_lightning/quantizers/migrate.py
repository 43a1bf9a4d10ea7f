"""Bringing a saved state dict to what the current quantizers load: a state saved before the weight quantizer
recorded its candidate set, and a per-channel state loaded into a quantizer built per-tensor (plans do not record
per-channel steps)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sdq_lightning.quantizers.sdq import SDQWeightQuantizer

__all__ = ["migrate_state"]


def migrate_state(model: nn.Module, state: Mapping[str, Any], candidates: Sequence[int] = ()) -> dict[str, Any]:
    """A copy of ``state`` that ``model.load_state_dict`` takes: every weight quantizer of ``model`` whose saved
    steps are per-channel is switched to per-channel first, and a quantizer state without ``_extra_state`` (saved
    before the candidate set was recorded) gets the candidate set it was searched with: the quantizer's own where its
    step rows match them, else ``candidates`` (a plan's metadata) where they match, else 1..8 for eight rows."""
    state = dict(state)
    cands = tuple(candidates or ())
    for name, q in model.named_modules():
        if not isinstance(q, SDQWeightQuantizer):
            continue
        prefix = f"{name}." if name else ""
        steps = state.get(prefix + "steps")
        if not isinstance(steps, torch.Tensor) or steps.dim() == 0:
            continue
        if steps.dim() == 2 and not q.per_channel:
            q.per_channel = True
            q.steps = nn.Parameter(torch.empty(len(q.candidates), steps.shape[1]),
                                   requires_grad=q.steps.requires_grad)
        if prefix + "_extra_state" in state:
            continue
        saved = cands if len(cands) == steps.shape[0] else tuple(range(1, 9)) if steps.shape[0] == 8 else None
        if steps.shape[0] == len(q.candidates):
            saved = q.candidates
        if saved is None:
            raise ValueError(f"layer {name.rsplit('.', 1)[0]!r} has {steps.shape[0]} step candidates in the "
                             f"checkpoint, but the plan's candidate set is {cands or 'unknown'}: the plan is not "
                             f"the one this checkpoint was searched with")
        old = SDQWeightQuantizer(saved)
        old.per_channel = steps.dim() == 2
        state[prefix + "_extra_state"] = old.get_extra_state()
    return state
