"""``BitPlan``: the per-layer bit assignment, its costs, its file format and how it is applied to a model."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor, nn

from sdq_lightning.budget.cost import CONVENTION, METRICS, LayerCost, cost_of
from sdq_lightning.budget.profile import LayerProfile, held_bits, other_params, profile_model
from sdq_lightning.quantizers.functional import MAX_BITS, MIN_BITS
from sdq_lightning.surgery import QuantSpec, quant_layers, quantize_model, validate_activation_bits

__all__ = ["BitPlan", "LayerBits"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerBits:
    """One layer of a plan: weight and input-activation bits (None = floating point), weight count, MACs/sample."""

    w_bits: int | None
    a_bits: int | None
    params: int
    macs: int


@dataclass
class BitPlan(Mapping[str, int | None]):
    """Ordered mapping layer name -> weight bits, with activation bits, layer sizes and metadata.

    ``metadata`` holds ``candidates``, ``budget`` (metric and target), ``convention`` and ``model``. ``other_params``
    counts every parameter outside the Conv2d/Linear weights (biases, BatchNorm), stored at 32 bits.
    """

    layers: dict[str, LayerBits]
    other_params: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        candidates = self.metadata.get("candidates")
        for name, lb in self.layers.items():
            for key, value in (("w_bits", lb.w_bits), ("a_bits", lb.a_bits)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                          or not MIN_BITS <= value <= MAX_BITS):
                    raise ValueError(f"{key} of layer {name!r} must be an integer in [{MIN_BITS}, {MAX_BITS}] or "
                                     f"None (FP), got {value!r}")
        if candidates is not None:
            fixed = set(self.metadata.get("fixed_layers", {}))
            bad = {n: lb.w_bits for n, lb in self.layers.items()
                   if lb.w_bits is not None and n not in fixed and lb.w_bits not in candidates}
            if bad:
                raise ValueError(f"plan bits must be among the candidates {tuple(candidates)}, got {bad}")

    # ------------------------------------------------------------- mapping
    def __getitem__(self, name: str) -> int | None:
        return self.layers[name].w_bits

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    # --------------------------------------------------------------- costs
    def _costs(self) -> list[LayerCost]:
        return [LayerCost(lb.params, lb.macs, lb.w_bits, lb.a_bits) for lb in self.layers.values()]

    def cost(self, metric: str) -> float:
        """Cost under ``metric`` (see :mod:`sdq_lightning.budget.cost` for the convention)."""
        return float(cost_of(metric, self._costs(), self.other_params))

    @property
    def average_bits(self) -> float:
        return self.cost("avg_bits")

    @property
    def size_bytes(self) -> float:
        return self.cost("size")

    @property
    def bitops(self) -> float:
        return self.cost("bitops")

    def costs(self) -> dict[str, float]:
        return {m: self.cost(m) for m in METRICS}

    # ----------------------------------------------------------- creation
    @classmethod
    def from_model(cls, model: nn.Module, example_input: Tensor | None = None,
                   profile: Mapping[str, LayerProfile] | None = None, **metadata: Any) -> BitPlan:
        """The plan a model holds now: frozen (or currently decided) bits of every quantized layer, FP elsewhere."""
        if profile is None:
            if example_input is None:
                raise ValueError("BitPlan.from_model needs example_input or a profile")
            profile = profile_model(model, example_input)
        qlayers = quant_layers(model)
        layers = {name: LayerBits(*held_bits(qlayers.get(name)), p.params, p.macs) for name, p in profile.items()}
        metadata.setdefault("convention", CONVENTION)
        metadata.setdefault("model", type(model).__name__)
        metadata.setdefault("fixed_layers", {n: q.weight_quant.candidates[0] for n, q in qlayers.items()
                                             if q.weight_quant is not None and len(q.weight_quant.candidates) == 1})
        return cls(layers, other_params=other_params(model, profile), metadata=metadata)

    def with_bits(self, bits: Mapping[str, int | None]) -> BitPlan:
        """A copy with some layers' weight bits replaced."""
        unknown = sorted(set(bits) - set(self.layers))
        if unknown:
            raise ValueError(f"unknown layer names for this plan: {unknown[:5]}; known: {list(self.layers)[:5]}...")
        layers = {n: LayerBits(bits.get(n, lb.w_bits), lb.a_bits, lb.params, lb.macs) for n, lb in self.layers.items()}
        return BitPlan(layers, self.other_params, dict(self.metadata))

    def with_metadata(self, **metadata: Any) -> BitPlan:
        """A copy with these metadata entries set (e.g. ``integer_only=True``)."""
        return BitPlan(dict(self.layers), self.other_params, {**self.metadata, **metadata})

    # ------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "metadata": _plain(self.metadata),
                "costs": self.costs(), "other_params": self.other_params,
                "layers": {n: asdict(lb) for n, lb in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BitPlan:
        if not isinstance(data, Mapping) or "layers" not in data:
            raise ValueError("a bit plan must be a mapping with a 'layers' key (written by BitPlan.save)")
        layers = {}
        for name, lb in data["layers"].items():
            if isinstance(lb, Mapping):
                unknown = set(lb) - {"w_bits", "a_bits", "params", "macs"}
                if unknown:
                    raise ValueError(f"layer {name!r} of the plan has unknown keys {sorted(unknown)}")
                layers[name] = LayerBits(lb.get("w_bits"), lb.get("a_bits"), int(lb.get("params", 0)),
                                         int(lb.get("macs", 0)))
            else:  # the short form: name: bits
                layers[name] = LayerBits(lb, None, 0, 0)
        return cls(layers, int(data.get("other_params", 0)), dict(data.get("metadata") or {}))

    def save(self, path: str | Path) -> Path:
        """Write YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"plan file must end in .yaml, .yml or .json, got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        text = json.dumps(data, indent=2) if suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"bit plan file not found: {path}")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"bit plan file {path} is not valid {path.suffix[1:].upper()}: {err}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------ applying
    def rebased(self, model: nn.Module) -> BitPlan:
        """This plan with its layer names matched to ``model``: as they are, or with the prefix of a wrapping module
        added or removed (a plan of a bare timm model applies to ``SDQClassifier.model`` and back)."""
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if set(self.layers) <= set(names) or not names or not self.layers:
            return self
        ours = next(iter(self.layers))
        for candidate in names:
            if candidate.endswith("." + ours) or ours.endswith("." + candidate):
                if candidate.endswith("." + ours):
                    prefix = candidate[: -len(ours)]

                    def rename(n: str, prefix: str = prefix) -> str:
                        return prefix + n
                else:
                    def rename(n: str, cut: int = len(ours) - len(candidate)) -> str:
                        return n[cut:]
                renamed = {rename(n): lb for n, lb in self.layers.items()}
                if set(renamed) == set(names):
                    fixed = {rename(n): b for n, b in (self.metadata.get("fixed_layers") or {}).items()}
                    return BitPlan(renamed, self.other_params, {**self.metadata, "fixed_layers": fixed})
        return self

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` if the model's Conv2d/Linear layers are not the plan's (names and sizes)."""
        mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        unknown = [n for n in self.layers if n not in mods]
        if unknown:
            raise ValueError(f"plan names layers the model does not have (a plan for a different model?): "
                             f"{unknown[:5]}")
        missing = [n for n in mods if n not in self.layers]
        if missing:
            raise ValueError(f"the model has Conv2d/Linear layers the plan does not cover (a plan for a different "
                             f"model?): {missing[:5]}")
        wrong = [n for n, lb in self.layers.items() if lb.params and mods[n].weight.numel() != lb.params]
        if wrong:
            raise ValueError(f"layer sizes differ between plan and model (a plan for a different model?): {wrong[:5]}")

    def apply(self, model: nn.Module, seed: int = 0) -> nn.Module:
        """Freeze every quantized layer at its planned bits; a float model is first quantized with the plan's bits.

        Raises ``ValueError`` for a plan of another model, or bits outside a layer's candidates.
        """
        if self.rebased(model) is not self:
            return self.rebased(model).apply(model, seed)
        self.check_model(model)
        qlayers = quant_layers(model)
        if not qlayers:
            spec = QuantSpec(layer_bits={n: lb.w_bits for n, lb in self.layers.items()},
                             layer_act_bits={n: lb.a_bits for n, lb in self.layers.items()}, seed=seed,
                             integer_only=bool(self.metadata.get("integer_only", False)))
            quantize_model(model, spec)
            qlayers = quant_layers(model)
        for name, lb in self.layers.items():
            q = qlayers.get(name)
            if lb.w_bits is None:
                if q is not None and q.weight_quant is not None:
                    raise ValueError(f"plan keeps {name!r} in FP but the model quantizes it")
                continue
            if q is None or q.weight_quant is None:
                raise ValueError(f"plan quantizes {name!r} at {lb.w_bits} bits but the model keeps it in FP")
            try:
                q.weight_quant.freeze(lb.w_bits)
            except ValueError:
                raise ValueError(f"plan bits {lb.w_bits} for {name!r} are outside its candidates "
                                 f"{q.weight_quant.candidates}") from None
            validate_activation_bits(lb.a_bits, f"activation bits of {name}")
        return model

    def table(self) -> str:
        """A markdown table of the plan."""
        rows = ["| layer | W bits | A bits | params | MACs |", "|---|---:|---:|---:|---:|"]
        for n, lb in self.layers.items():
            rows.append(f"| {n} | {lb.w_bits or 'FP'} | {lb.a_bits or 'FP'} | {lb.params:,} | {lb.macs:,} |")
        return "\n".join(rows)


def _plain(value: Any) -> Any:
    """Metadata as YAML/JSON-safe plain data."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
