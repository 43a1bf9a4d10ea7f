"""Reload an SDQ-trained model for inference: the checkpoint carries the bit plan, the quantized layers are rebuilt
from it and the weights (steps, calibrated activation quantizers included) are loaded.

>>> import sdq_lightning as sq
>>> lit = sq.load_quantized(LitNet, "checkpoints/last.ckpt")      # your LightningModule class (or an instance)
>>> lit(x)                                                         # == the fake-quantized model at the end of training

The SDQ callback stores its state, plan included, under the ``callbacks`` key of every Lightning checkpoint written
after the phase boundary (or from the start when the plan is given or the bits are uniform). No Lightning import
happens here: a LightningModule class is rebuilt through its own ``load_from_checkpoint``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdq_lightning.budget import BitPlan
from sdq_lightning.quantizers.migrate import migrate_state

__all__ = ["load_checkpoint", "load_quantized", "load_quantized_state", "network_of", "network_prefix",
           "plan_from_checkpoint", "unreadable"]


def unreadable(path: str | Path, err: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one line a user can act on. Only tensors and plain
    containers are ever unpickled here: the remedy is a file that holds just those, never loading arbitrary code."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"[Uu]nsupported global:? ([\w.]+)", text)
    if "Weights only load failed" in text and found:
        return (f"{path} holds Python objects besides tensors ({found.group(1)}), which are not unpickled here; "
                "save only tensors, e.g. torch.save(model.state_dict(), path) or a Lightning .ckpt")
    return (f"{path} is not a PyTorch checkpoint ({type(err).__name__}: neither torch.save's zip file nor a pickle of "
            "tensors; a text file, an HTML page or a truncated download?); pass a Lightning .ckpt or a state dict "
            "saved with torch.save")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle/zip errors of all kinds)
        raise ValueError(unreadable(path, err)) from None
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict or a state dict")
    return dict(ckpt)


def plan_from_checkpoint(ckpt: Mapping[str, Any] | str | Path) -> BitPlan | None:
    """The plan the SDQ callback stored in a Lightning checkpoint (``callbacks["SDQ{...}"]["plan"]``), or None when
    the checkpoint holds none (no SDQ callback, or saved before the phase boundary)."""
    if not isinstance(ckpt, Mapping):
        ckpt = load_checkpoint(ckpt)
    states = ckpt.get("callbacks") or {}
    plans = [s["plan"] for k, s in states.items()
             if str(k).startswith("SDQ") and isinstance(s, Mapping) and s.get("plan") is not None]
    if len(plans) > 1:
        raise ValueError(f"the checkpoint holds {len(plans)} SDQ plans (one SDQ callback per trainer is supported)")
    return BitPlan.from_dict(plans[0]) if plans else None


def network_prefix(module: nn.Module) -> str:
    """The name of the innermost submodule of ``module`` holding every Conv2d/Linear ("" for ``module`` itself)."""
    names = [n for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts) if parts else ():
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def network_of(module: nn.Module) -> nn.Module:
    """The innermost submodule holding every Conv2d/Linear of ``module`` (``SDQClassifier.model``, a user's
    ``self.net``), else ``module`` itself: what gets exported (and what the SDQ callback profiles and graphs)."""
    prefix = network_prefix(module)
    return module.get_submodule(prefix) if prefix else module


def _state_of(ckpt: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where} holds no state_dict (expected a Lightning checkpoint or a plain state dict)")
    return dict(state)


def plan_for_state(plan: BitPlan, state: Mapping[str, Any]) -> BitPlan:
    """``plan``, marked ``integer_only`` when ``state`` holds the integer-only mode's terms (``...integer_only.*``)
    and the plan does not say so: a plan given to a run in the mode before the callback marked given plans."""
    if plan.metadata.get("integer_only") or not any(k == "integer_only.active" or k.endswith(".integer_only.active")
                                                     for k in state):
        return plan
    return plan.with_metadata(integer_only=True)


def load_quantized_state(model: nn.Module, state: Mapping[str, torch.Tensor], plan: BitPlan,
                         where: str = "checkpoint") -> nn.Module:
    """Quantize ``model`` (a float model, or one already holding quantized layers) with ``plan``, load ``state``
    (a state dict of the SDQ-trained model, searched or frozen) strictly, freeze every layer at the plan's bits and
    return the model in eval mode. Plain PyTorch: no Lightning needed."""
    plan = plan_for_state(plan, state).rebased(model)
    plan.apply(model)  # ValueError for a plan of another model
    state = migrate_state(model, state, plan.metadata.get("candidates") or ())
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches and the quantizers' own messages
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise ValueError(f"{where} does not fit the model quantized with its plan: "
                         f"{lines[1] if len(lines) > 1 else lines[0]}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"{where} does not fit the model quantized with its plan: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (a checkpoint of another model or plan?)")
    plan.apply(model)  # the plan decides the bits, whatever the checkpoint's buffers said
    return model.eval()


def load_quantized(module: type[nn.Module] | nn.Module, checkpoint: str | Path,
                   plan: BitPlan | str | Path | None = None, map_location: Any = "cpu",
                   **init_kwargs: Any) -> nn.Module:
    """Rebuild an SDQ-trained model from a checkpoint, for inference in a fresh process.

    Args:
        module: your LightningModule class (rebuilt with its ``load_from_checkpoint``, i.e. from the saved
            hyper-parameters plus ``init_kwargs``), any other ``nn.Module`` class (``module(**init_kwargs)``), or a
            float instance to load into.
        checkpoint: a Lightning checkpoint written while the SDQ callback was on, or a ``torch.save``-d state dict.
        plan: the bit plan; default: the one the SDQ callback stored in the checkpoint. Needed for a plain state
            dict, or a checkpoint saved before the phase boundary.

    Returns the model in eval mode, its Conv2d/Linear layers quantized and frozen at the plan's bits: its outputs
    equal those of the model at the time the checkpoint was saved. Raises ``ValueError`` / ``FileNotFoundError``
    with a one-line message for a missing file, a checkpoint without a plan, or a checkpoint of another model.
    """
    path = Path(checkpoint)
    ckpt = load_checkpoint(path, map_location)
    if plan is None:
        plan = plan_from_checkpoint(ckpt)
        if plan is None:
            raise ValueError(f"{path} holds no SDQ bit plan (the SDQ callback stores it from the phase boundary on); "
                             f"pass plan= (the run's plan.yaml)")
    elif not isinstance(plan, BitPlan):
        plan = BitPlan.load(plan)
    state = _state_of(ckpt, str(path))
    if isinstance(module, nn.Module):
        model = module
    elif isinstance(module, type) and issubclass(module, nn.Module):
        if hasattr(module, "load_from_checkpoint") and "state_dict" in ckpt:
            with warnings.catch_warnings():  # the float model does not know the quantizer keys yet: loaded below
                warnings.filterwarnings("ignore", ".*Found keys that are")
                model = module.load_from_checkpoint(str(path), map_location=map_location, strict=False,
                                                    **init_kwargs)
        else:
            model = module(**init_kwargs)
    else:
        raise ValueError(f"module must be an nn.Module class or instance, got {module!r}")
    return load_quantized_state(model, state, plan, where=str(path))
