"""Per-layer sensitivities: the expected loss increase of quantizing one layer's weights alone at each bitwidth.

Three sources, one format (``{layer: {bits: loss_increase}}``):

* :func:`finite_difference` (the oracle): quantize layer ``l`` alone at ``b`` bits (every other layer in floating
  point), measure the mean cross-entropy on held-out batches, subtract the floating-point loss on the same batches.
  Paired per batch, so halves of the batches give two independent estimates (:meth:`Sensitivity.halves`).
* :func:`hawq` (HAWQ-V2/V3): ``Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2`` with the Hessian trace of the loss w.r.t. the
  layer's weights from Hutchinson's estimator (Rademacher probes, Hessian-vector products by double backward).
* :func:`from_search` (what an SDQ search measured): the search's per-level EMA of ``-dL/dbeta`` read from a run's
  checkpoint and integrated over the levels, as the freeze's projection reads it.

Weights are quantized as the project's weight quantizer does (signed symmetric LSQ codes, binary at 1 bit), with a
per-tensor step chosen for each bitwidth: ``"mse"`` (default) the step of least ``||Q_b(W) - W||^2`` on a grid around
the LSQ initial step (a trained step approaches it), ``"lsq_init"`` the LSQ initial step phase 2 starts from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sdq_lightning.quantizers.functional import quantize_weight, weight_step_init, weight_step_mse

__all__ = ["STEP_MODES", "Sensitivity", "finite_difference", "from_search", "hawq", "level_table", "quantize_alone",
           "spearman"]

STEP_MODES = ("mse", "lsq_init")


@dataclass
class Sensitivity:
    """``values[layer][bits]``: the loss increase of that layer alone at ``bits``. ``per_batch`` (oracle only): the
    same per held-out batch, in batch order."""

    values: dict[str, dict[int, float]]
    method: str
    per_batch: dict[str, dict[int, list[float]]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self, path: str | Path) -> Path:
        """Write ``{layer: {bits: loss_increase}}`` (JSON keys are strings)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({n: {str(b): v for b, v in t.items()} for n, t in self.values.items()}, indent=1))
        return path

    @classmethod
    def from_json(cls, path: str | Path, method: str = "file") -> Sensitivity:
        """Read ``{layer: {bits: loss_increase}}``; ``ValueError`` naming what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sensitivity file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"sensitivity file {path} is not JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
            raise ValueError(f"sensitivity file {path} must map each layer to {{bits: loss_increase}}")
        try:
            values = {str(n): {int(b): float(v) for b, v in t.items()} for n, t in data.items()}
        except (TypeError, ValueError):
            raise ValueError(f"sensitivity file {path}: bits must be integers and increases numbers") from None
        return cls(values, method)

    def halves(self) -> tuple[Sensitivity, Sensitivity]:
        """Two estimates from the even and the odd batches (needs ``per_batch`` with at least 2 batches)."""
        if not self.per_batch:
            raise ValueError(f"{self.method} sensitivities carry no per-batch values to split")
        out = []
        for start in (0, 1):
            vals = {n: {b: _mean(v[start::2]) for b, v in t.items()} for n, t in self.per_batch.items()}
            out.append(Sensitivity(vals, f"{self.method}[{'even' if start == 0 else 'odd'}]"))
        return out[0], out[1]

    def increments(self, levels: Iterable[tuple[int, int]]) -> dict[tuple[str, int, int], float]:
        """``S(lo) - S(hi)`` for every layer and each ``(hi, lo)`` pair both of whose bits it has: what a one-level
        drop costs, the quantity a plan's decisions compare."""
        measured = self.meta.get("measured")
        out = {}
        for n, t in self.values.items():
            for hi, lo in levels:
                if hi in t and lo in t and (measured is None or (n, hi, lo) in measured):
                    out[(n, hi, lo)] = t[lo] - t[hi]
        return out

    def one_level_drops(self) -> list[tuple[int, int]]:
        """The ``(hi, lo)`` pairs of adjacent bitwidths every table has in common, lowest first."""
        bits = sorted(set.intersection(*(set(t) for t in self.values.values()))) if self.values else []
        return [(hi, lo) for lo, hi in zip(bits[:-1], bits[1:])]

    def agreement(self, other: Sensitivity, levels: Sequence[tuple[int, int]] | None = None
                  ) -> dict[str, float]:
        """Spearman rank correlations of the one-level drops with ``other``'s, over the entries both have (a search
        has only the levels it measured): ``"all"`` over every layer and level, then per level ``"hi->lo"`` over
        the layers (the comparisons a plan at that level makes; NaN where fewer than 3 layers are shared)."""
        levels = list(levels) if levels is not None else self.one_level_drops()
        out = {"all": spearman(self.increments(levels), other.increments(levels))}
        for hi, lo in levels:
            try:
                out[f"{hi}->{lo}"] = spearman(self.increments([(hi, lo)]), other.increments([(hi, lo)]))
            except ValueError:
                out[f"{hi}->{lo}"] = float("nan")
        return out


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def spearman(a: Mapping[Any, float], b: Mapping[Any, float]) -> float:
    """Spearman rank correlation over the keys ``a`` and ``b`` share (scipy's)."""
    from scipy.stats import spearmanr

    keys = [k for k in a if k in b]
    if len(keys) < 3:
        raise ValueError(f"a rank correlation needs at least 3 shared entries, got {len(keys)}")
    return float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


# ----------------------------------------------------------------------------- weight quantization
@torch.no_grad()
def weight_step(w: Tensor, bits: int, mode: str = "mse") -> Tensor:
    """The per-tensor step at ``bits`` (see the module docstring); 1 bit: ``mean|w|`` (least squares for binary)."""
    if mode not in STEP_MODES:
        raise ValueError(f"step must be one of {STEP_MODES}, got {mode!r}")
    if mode == "lsq_init":
        return weight_step_init(w, bits)
    return weight_step_mse(w, bits)


@torch.no_grad()
def quantize_alone(w: Tensor, bits: int, mode: str = "mse") -> Tensor:
    """``Q_b(w)``: the project's weight codes at ``bits`` times the chosen step."""
    return quantize_weight(w, weight_step(w, bits, mode), bits)


def _batches(batches: Iterable[Any], device: torch.device) -> list[tuple[Tensor, Tensor]]:
    return [(b[0].to(device), b[1].to(device)) for b in batches]


# ----------------------------------------------------------------------------- the oracle
@torch.no_grad()
def finite_difference(model: nn.Module, batches: Iterable[Any], layers: Sequence[str], bits: Sequence[int],
                      step: str = "mse", progress: bool = False) -> Sensitivity:
    """The oracle: per layer and bitwidth, mean cross-entropy with that layer alone quantized minus the
    floating-point mean cross-entropy, per batch (eval mode; the model is restored)."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    data = _batches(batches, device)
    if not data:
        raise ValueError("finite_difference needs at least one batch")
    was_training = model.training
    model.eval()

    def losses() -> list[float]:
        return [float(F.cross_entropy(model(x).float(), y)) for x, y in data]

    base = losses()
    per_batch: dict[str, dict[int, list[float]]] = {}
    todo = [(n, b) for n in layers for b in bits]
    bar = _bar(len(todo), "oracle (layer x bits)", progress)
    try:
        for name in layers:
            weight = modules[name].weight
            original = weight.detach().clone()
            per_batch[name] = {}
            try:
                for b in bits:
                    weight.copy_(quantize_alone(original, b, step))
                    per_batch[name][b] = [q - f for q, f in zip(losses(), base)]
                    bar.update(1)
            finally:
                weight.copy_(original)
    finally:
        bar.close()
        model.train(was_training)
    values = {n: {b: _mean(v) for b, v in t.items()} for n, t in per_batch.items()}
    return Sensitivity(values, "oracle", per_batch,
                       {"batches": len(data), "images": sum(len(y) for _, y in data), "step": step,
                        "fp_loss": _mean(base)})


# ----------------------------------------------------------------------------- HAWQ
def hawq(model: nn.Module, batches: Iterable[Any], layers: Sequence[str], bits: Sequence[int], probes: int = 64,
         step: str = "mse", seed: int = 0, progress: bool = False) -> Sensitivity:
    """HAWQ-V2/V3 sensitivities: Hutchinson's estimate of each layer's Hessian trace (``probes`` Rademacher vectors
    spread over the batches, eval mode), divided by its weight count, times ``||Q_b(W) - W||^2``."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    data = _batches(batches, device)
    if not data:
        raise ValueError("hawq needs at least one batch")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes!r}")
    params = [modules[n].weight for n in layers]
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    traces = torch.zeros(len(params), dtype=torch.float64)
    per_batch = [probes // len(data) + (1 if i < probes % len(data) else 0) for i in range(len(data))]
    bar = _bar(probes, "Hessian trace (probes)", progress)
    try:
        for (x, y), k in zip(data, per_batch):
            if k == 0:
                continue
            loss = F.cross_entropy(model(x).float(), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for j in range(k):
                vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
                hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=j < k - 1)
                traces += torch.stack([(h * v).sum().double() for h, v in zip(hv, vs)]).cpu()
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    traces /= probes
    values = {}
    with torch.no_grad():
        for name, p, tr in zip(layers, params, traces.tolist()):
            w = p.detach()
            values[name] = {b: tr / w.numel() * float(((quantize_alone(w, b, step) - w) ** 2).sum()) for b in bits}
    return Sensitivity(values, "hawq", None, {"probes": probes, "step": step,
                                               "trace": dict(zip(layers, traces.tolist()))})


# ----------------------------------------------------------------------------- what a search measured
def level_table(candidates: Sequence[int], gains: Sequence[float]) -> dict[int, float]:
    """A layer's loss at each candidate, up to a constant, from the search's per-index estimate of the loss decrease
    of ``b_{i-1} -> b_i`` (``gains[i]``; 0 where the level was never live, filled with the mean of the measured
    ones). Non-increasing in the bits; the top candidate is not pinned."""
    gains = [float(v) for v in gains]
    level_gain = [max(v, 0.0) for v in gains]
    known = [v for i, v in enumerate(gains) if i > 0 and v != 0.0]
    fill = max(sum(known) / len(known), 0.0) if known else 0.0
    acc, table = 0.0, {}
    for i, b in enumerate(candidates):
        if i > 0:
            acc -= level_gain[i] if gains[i] != 0.0 else fill
        table[b] = acc
    return table


def from_search(checkpoint: str | Path, layers: Sequence[str], candidates: Sequence[int]) -> Sensitivity:
    """The sensitivities an SDQ search measured, from a Lightning checkpoint written during or after the search.
    ``layers``: the searched layers in execution order (the search's order, e.g. ``PlanProblem.names``), named as
    in the bare backbone. Values are shifted so that the top candidate is 0."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__})") from None
    states = [s for s in (ckpt.get("callbacks") or {}).values() if isinstance(s, dict) and s.get("search")]
    if not states:
        raise ValueError(f"{path} holds no SDQ search state (a checkpoint of a run with a search is needed)")
    opt = (states[0]["search"] or {}).get("optimizer")
    if not opt or not opt.get("state"):
        raise ValueError(f"{path}: the search had not started when this checkpoint was written")
    state = opt["state"]
    if len(state) != len(layers):
        raise ValueError(f"{path}: the search measured {len(state)} layers but {len(layers)} searched layers were "
                         "given (another model or first/last policy?)")
    values, measured = {}, set()
    for i, name in enumerate(layers):
        st = state[i] if i in state else state[str(i)]
        sens = st["sens"]
        if sens.numel() != len(candidates):
            raise ValueError(f"{path}: layer {name} has {sens.numel()} candidates, expected {len(candidates)}")
        table = level_table(candidates, sens.tolist())
        values[name] = {b: v - table[candidates[-1]] for b, v in table.items()}
        # what the search measured: levels probed (task_estimate="paired"), else levels whose EMA ever moved
        seen = (st["probes"] > 0) if "probes" in st and bool((st["probes"] > 0).any()) else (sens != 0)
        measured.update((name, candidates[j], candidates[j - 1]) for j in range(1, len(candidates)) if bool(seen[j]))
    return Sensitivity(values, "search", None, {"checkpoint": str(path), "measured": measured})


# ----------------------------------------------------------------------------- progress
def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not enabled)
