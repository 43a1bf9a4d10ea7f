"""Per-layer profile from one forward pass: parameters, MACs and shapes of every Conv2d / Linear."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LayerProfile", "held_bits", "other_params", "profile_model", "quantizers_disabled"]


@dataclass(frozen=True)
class LayerProfile:
    """One Conv2d or Linear layer.

    ``params`` counts the weight only (biases are FP parameters); ``macs`` are multiply-accumulates for ONE sample:
    ``out_elements * in_channels / groups * kh * kw`` for a conv, ``out_elements * in_features`` for a linear layer.
    """

    name: str
    kind: str
    params: int
    macs: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    groups: int = 1


def held_bits(layer: nn.Module | None) -> tuple[int | None, int | None]:
    """``(weight bits, input bits)`` a layer holds now; None where it has no such quantizer (floating point)."""
    wq, aq = getattr(layer, "weight_quant", None), getattr(layer, "act_quant", None)
    return (None if wq is None else wq.bits), (None if aq is None else aq.bits)


def other_params(model: nn.Module, profile: Mapping[str, LayerProfile]) -> int:
    """Parameters outside the profiled Conv2d/Linear weights (biases, BatchNorm); quantizer steps and DBPs left out."""
    weights = sum(p.params for p in profile.values())
    return sum(t.numel() for n, t in model.named_parameters() if not n.endswith(("dbp", "steps", "step"))) - weights


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Temporarily switch every weight/activation quantizer off (restored on exit)."""
    saved = []
    for m in model.modules():
        if hasattr(m, "weight_quant") and hasattr(m, "act_quant"):
            saved.append((m, m.weight_quant, m.act_quant))
            m.weight_quant, m.act_quant = None, None
    try:
        yield
    finally:
        for m, wq, aq in saved:
            m.weight_quant, m.act_quant = wq, aq


def _macs(module: nn.Module, out: Tensor) -> int:
    per_sample = out[0].numel() if out.dim() > 1 else out.numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_sample * (module.in_channels // module.groups) * kh * kw
    return per_sample * module.in_features


@torch.no_grad()
def profile_model(model: nn.Module, example_input: Tensor) -> dict[str, LayerProfile]:
    """Profile every Conv2d/Linear in execution order with one forward of ``example_input`` (batch 1 is enough).

    Quantizers are switched off and the model is put in eval mode for the pass (its mode is restored), so profiling
    changes no state.
    """
    records: dict[str, LayerProfile] = {}
    hooks = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            if name in records:
                return
            records[name] = LayerProfile(
                name=name,
                kind="conv" if isinstance(module, nn.Conv2d) else "linear",
                params=module.weight.numel(),
                macs=_macs(module, out),
                in_shape=tuple(inputs[0].shape[1:]),
                out_shape=tuple(out.shape[1:]),
                groups=getattr(module, "groups", 1),
            )

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with quantizers_disabled(model):
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return records
