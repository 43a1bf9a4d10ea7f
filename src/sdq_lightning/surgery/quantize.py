"""``quantize_model(model, spec)``: swap the selected layers for quantized ones, in place. A layer is a candidate
when it is an instance of a class with a registered quantized layer type (:mod:`~sdq_lightning.surgery.layer_types`:
``nn.Conv2d`` and ``nn.Linear`` built in); a subclass without a registration of its own is refused when selected.

Selection precedence: a layer is quantized when it matches ``include`` (all layers when empty) and does not match
``exclude``; the first conv and the classifier then follow ``first_last`` whatever the patterns say. Patterns are
exact module names or regular expressions matched with ``re.fullmatch``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from sdq_lightning.modules import QuantConv2d, QuantLinear, is_quant_layer
from sdq_lightning.quantizers import READINGS, ActQuantizer, SDQWeightQuantizer, validate_candidates
from sdq_lightning.quantizers.estimators import get_estimator
from sdq_lightning.quantizers.functional import STEP_INITS
from sdq_lightning.surgery.layer_types import build_quant_layer, check_quant_layer_type, has_quant_layer_type, \
    quantizable_types

__all__ = [
    "FIRST_LAST_POLICIES",
    "QuantReport",
    "QuantSpec",
    "dequantize_model",
    "find_first_last",
    "quant_layers",
    "quantize_model",
    "validate_activation_bits",
]

FIRST_LAST_POLICIES = ("8bit", "fp", "search")


def validate_activation_bits(bits: int | None, name: str = "activation_bits") -> int | None:
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be an integer in [2, 8] or None (floating point), got {bits!r}")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how.

    Args:
        weight_bits: candidate weight bitwidths of the searched layers (one value = uniform quantization).
        activation_bits: input-activation bits of every quantized layer but the first/last, None = FP.
        first_last: ``"8bit"`` (first conv and classifier at ``first_last_bits``, inputs too), ``"fp"`` (left in
            floating point) or ``"search"`` (treated like every other layer).
        first_last_bits: their bitwidth under the ``"8bit"`` policy.
        include / exclude: module names or regexes (``re.fullmatch``).
        first_layer / last_layer: override the automatic detection (timm ``pretrained_cfg``, else first/last).
        reading / estimator / per_channel / seed / step_init / step_follow: passed to every :class:`SDQWeightQuantizer`
            (``step_init`` here defaults to LSQ's rule, the quantizer's own; the :class:`~sdq_lightning.SDQ`
            callback passes its ``layers.step_init``, whose default is ``"mse"``).
        layer_bits: fixed per-layer weight bits (e.g. from a BitPlan); such a layer gets the single candidate.
        layer_act_bits: per-layer input bits overriding ``activation_bits``.
        integer_only: train the integer graph onnxruntime runs (:mod:`sdq_lightning.integer`): weight steps per
            channel; the model is prepared (and switched to the mode at once when no layer is searched; a search
            switches at its freeze, :func:`sdq_lightning.integer.activate_integer_only`).
    """

    weight_bits: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    activation_bits: int | None = 4
    first_last: str = "8bit"
    first_last_bits: int = 8
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    first_layer: str | None = None
    last_layer: str | None = None
    reading: str = "progressive"
    estimator: str = "gumbel"
    per_channel: bool = False
    seed: int = 0
    step_init: str = "lsq"
    step_follow: bool = False
    layer_bits: dict[str, int | None] = field(default_factory=dict)
    layer_act_bits: dict[str, int | None] = field(default_factory=dict)
    integer_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.integer_only, bool):
            raise ValueError(f"integer_only must be true or false, got {self.integer_only!r}")
        if self.integer_only:  # a BatchNorm's per-channel scale folds into per-channel steps only
            object.__setattr__(self, "per_channel", True)
        object.__setattr__(self, "weight_bits", validate_candidates(self.weight_bits, "weight_bits"))
        validate_activation_bits(self.activation_bits)
        if self.first_last not in FIRST_LAST_POLICIES:
            raise ValueError(f"first_last must be one of {FIRST_LAST_POLICIES}, got {self.first_last!r}")
        validate_candidates((self.first_last_bits,), "first_last_bits")
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, got {self.reading!r}")
        get_estimator(self.estimator, self.reading)  # one-line error naming the registered estimators
        if self.step_init not in STEP_INITS:
            raise ValueError(f"step_init must be one of {STEP_INITS}, got {self.step_init!r}")
        for key in ("include", "exclude"):
            pats = getattr(self, key)
            pats = (pats,) if isinstance(pats, str) else tuple(pats or ())
            for p in pats:
                try:
                    re.compile(p)
                except re.error as err:
                    raise ValueError(f"{key} pattern {p!r} is not a valid regular expression: {err}") from None
            object.__setattr__(self, key, pats)


@dataclass
class QuantReport:
    """What :func:`quantize_model` did."""

    quantized: list[str] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)
    fixed: dict[str, int] = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)  # kept in FP: a subclass with no quantized layer type
    first_layer: str | None = None
    last_layer: str | None = None
    changed: bool = True

    def __str__(self) -> str:
        return (f"quantized {len(self.quantized)} layers ({len(self.searched)} searched, {len(self.fixed)} fixed), "
                f"kept {len(self.kept_float)} in FP, {len(self.unsupported)} unsupported; "
                f"first={self.first_layer}, last={self.last_layer}")


def find_first_last(model: nn.Module) -> tuple[str | None, str | None]:
    """First conv and classifier: timm's ``pretrained_cfg`` (``first_conv``, ``classifier``), else the first and
    last quantizable layer (Conv2d/Linear) in module order."""
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, quantizable_types())]
    if not names:
        return None, None
    first = last = None
    for prefix, m in modules.items():  # the outermost module with a timm pretrained_cfg (e.g. a wrapped backbone)
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            pre = f"{prefix}." if prefix else ""
            fc, cl = cfg.get("first_conv"), cfg.get("classifier")
            first = pre + fc if isinstance(fc, str) and pre + fc in names else None
            last = pre + cl if isinstance(cl, str) and pre + cl in names else None
            break
    return first or names[0], last or names[-1]


def quant_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """All quantized layers by fully-qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if is_quant_layer(m)}


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or re.fullmatch(p, name) for p in patterns)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _layer_bits(spec: QuantSpec, name: str, edge: bool) -> tuple[tuple[int, ...], int | None] | None:
    """``(weight bit candidates, input bits)`` of layer ``name`` under ``spec`` (``edge``: the first conv or the
    classifier), or None for a layer kept in FP."""
    if name in spec.layer_bits:
        bits = spec.layer_bits[name]
        if bits is None:
            return None
        cands, abits = (bits,), spec.layer_act_bits.get(name, spec.activation_bits)
    elif edge and spec.first_last == "fp":
        return None
    elif edge and spec.first_last == "8bit":
        cands, abits = (spec.first_last_bits,), spec.first_last_bits
    elif not edge and not ((not spec.include or _matches(name, spec.include)) and not _matches(name, spec.exclude)):
        return None
    else:
        cands, abits = spec.weight_bits, spec.activation_bits
    abits = spec.layer_act_bits.get(name, abits)
    validate_activation_bits(abits, f"activation bits of {name}")
    return cands, abits


def quantize_model(model: nn.Module, spec: QuantSpec | None = None) -> QuantReport:
    """Swap the selected layers of ``model`` for :class:`QuantConv2d` / :class:`QuantLinear` (the registered
    quantized layer types), in place. A selected layer whose class is a subclass with no registration of its own
    (e.g. timm's ``Conv2dSame``) is a one-line ``ValueError`` naming it, raised before any layer is swapped; one kept
    in FP is listed in ``report.unsupported``.

    Idempotent: a model that already holds quantized layers is left unchanged (``report.changed`` is False).
    """
    spec = spec or QuantSpec()
    first, last = spec.first_layer, spec.last_layer
    auto_first, auto_last = find_first_last(model)
    first, last = first or auto_first, last or auto_last
    existing = quant_layers(model)
    if existing:
        return QuantReport(quantized=list(existing), first_layer=first, last_layer=last, changed=False)
    modules = dict(model.named_modules())
    candidates = {n: m for n, m in modules.items() if isinstance(m, quantizable_types())}
    for key, name in (("layer_bits", spec.layer_bits), ("layer_act_bits", spec.layer_act_bits)):
        unknown = sorted(set(name) - set(candidates))
        if unknown:
            raise ValueError(f"{key} names layers that are not Conv2d/Linear layers of the model: {unknown[:5]}")
    decided = {name: _layer_bits(spec, name, name in (first, last)) for name in candidates}
    for name, bits in decided.items():
        if bits is not None:
            check_quant_layer_type(candidates[name], name)  # before any layer is swapped
    report = QuantReport(first_layer=first, last_layer=last)
    for name, module in candidates.items():
        if decided[name] is None:
            (report.kept_float if has_quant_layer_type(module) else report.unsupported).append(name)
            continue
        cands, abits = decided[name]
        wq = SDQWeightQuantizer(cands, spec.reading, spec.estimator, weight=module.weight.detach(),
                                per_channel=spec.per_channel, seed=spec.seed, layer_id=zlib.crc32(name.encode()),
                                step_init=spec.step_init, step_follow=spec.step_follow)
        wq.to(module.weight.device)
        aq = ActQuantizer(abits).to(module.weight.device) if abits is not None else None
        _set_module(model, name, build_quant_layer(module, name, wq, aq))
        report.quantized.append(name)
        if len(cands) > 1:
            report.searched.append(name)
        else:
            report.fixed[name] = cands[0]
    if spec.integer_only:
        from sdq_lightning.checkpoint import network_of  # (checkpoint -> budget -> surgery)
        from sdq_lightning.integer import activate_integer_only, attach_integer_only

        (attach_integer_only if report.searched else activate_integer_only)(network_of(model))
    return report


def dequantize_model(model: nn.Module, bake: bool = False) -> list[str]:
    """Swap quantized layers back to float ones (``bake``: keep the fake-quantized weights). Returns the names."""
    names = list(quant_layers(model))
    for name in names:
        _set_module(model, name, model.get_submodule(name).to_float(bake=bake))
    return names
