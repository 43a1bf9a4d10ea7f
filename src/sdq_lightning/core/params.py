"""Which parameters of a quantized model the search and the step-size optimizer own, and taking them out of the
user's optimizers (the weights stay there)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sdq_lightning.quantizers import ActQuantizer, SDQWeightQuantizer

__all__ = ["quantizer_params", "take_from_optimizers"]


def quantizer_params(root: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(DBPs of the searchable weight quantizers, step sizes of every quantizer). The DBP of a single-candidate
    quantizer has nothing to learn: its ``requires_grad`` is turned off here."""
    dbps, steps = [], []
    for m in root.modules():
        if isinstance(m, SDQWeightQuantizer):
            if len(m.candidates) > 1:
                dbps.append(m.dbp)
            else:
                m.dbp.requires_grad_(False)
            steps.append(m.steps)
        elif isinstance(m, ActQuantizer):
            steps.append(m.step)
    return dbps, steps


def take_from_optimizers(optimizers: Iterable[torch.optim.Optimizer], params: Iterable[nn.Parameter]) -> int:
    """Remove ``params`` from every parameter group of ``optimizers`` (the callback steps them itself). Returns how
    many entries were removed."""
    ids = {id(p) for p in params}
    removed = 0
    for opt in optimizers:
        for group in opt.param_groups:
            kept = [p for p in group["params"] if id(p) not in ids]
            removed += len(group["params"]) - len(kept)
            group["params"] = kept
    return removed
