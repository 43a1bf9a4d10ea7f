"""The SDQ callback's setup: quantize the user's model, find an example input, profile the network for the cost
model, and take the quantizer parameters out of the user's optimizers.

Functions of the model and the trainer only (no callback state), composed by
:class:`~sdq_lightning.callbacks.sdq.SDQ` at ``setup`` and ``on_fit_start`` and tested on their own
(``tests/callbacks/test_setup.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from sdq_lightning.budget import BitPlan, profile_model
from sdq_lightning.budget.profile import LayerProfile
from sdq_lightning.checkpoint import network_of, network_prefix
from sdq_lightning.integer import attach_integer_only
from sdq_lightning.surgery import QuantReport, QuantSpec, quantize_model

__all__ = ["default_input_fn", "default_probe_loss", "find_example_input", "num_classes_of", "profile_network",
           "quantize"]


def default_probe_loss(output: Any, batch: Any) -> Tensor:
    """The loss the paired forwards of ``task_estimate="paired"`` compare: the cross-entropy of a classifier's
    logits against the integer labels in ``batch[1]`` (or a dict batch's ``label``/``labels``/``target``/``y``)."""
    target = None
    if isinstance(batch, dict):
        target = next((batch[k] for k in ("label", "labels", "target", "targets", "y") if k in batch), None)
    elif isinstance(batch, (list, tuple)) and len(batch) > 1:
        target = batch[1]
    if not isinstance(output, Tensor) or not isinstance(target, Tensor) or target.dtype.is_floating_point:
        raise ValueError("task_estimate='paired' compares the cross-entropy of the network's logits against integer "
                         "labels in batch[1]; for another output or batch pass probe_loss=lambda output, batch: ...")
    return torch.nn.functional.cross_entropy(output.float(), target)


def default_input_fn(batch: Any) -> Tensor:
    """The model input of a batch: the batch itself, a known key of a dict batch, else ``batch[0]``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        for key in ("image", "images", "input", "inputs", "x"):
            if key in batch:
                return batch[key]
        raise ValueError("cannot find the model input in a dict batch; pass input_fn=lambda batch: ...")
    return batch[0]


def quantize(root: nn.Module, spec: QuantSpec, plan: BitPlan | None = None) -> tuple[QuantReport, BitPlan | None]:
    """Swap the layers of ``root`` for quantized ones: searchable under ``spec``, or fixed at a given ``plan`` (its
    layer names rebased onto ``root`` and checked against it). Returns the surgery report and the rebased plan."""
    if plan is None:
        report = quantize_model(root, replace(spec, integer_only=False))
    else:
        plan = plan.rebased(root)
        plan.check_model(root)
        report = quantize_model(root, QuantSpec(layer_bits={n: lb.w_bits for n, lb in plan.layers.items()},
                                                layer_act_bits={n: lb.a_bits for n, lb in plan.layers.items()},
                                                seed=spec.seed))
        plan.apply(root)
    if spec.integer_only:  # attached, not active: the callback folds BatchNorm after phase 2's first steps
        attach_integer_only(network_of(root))
    return report, plan


def profile_network(root: nn.Module, example: Tensor) -> dict[str, LayerProfile]:
    """Per-layer parameters and MACs of ``root``'s network (:func:`~sdq_lightning.checkpoint.network_of`: the
    innermost module holding every Conv2d/Linear, profiled instead of a LightningModule whose own ``forward`` may not
    exist) on one example, keyed by names relative to ``root``."""
    device = next(root.parameters()).device
    prefix = network_prefix(root)
    profile = profile_model(network_of(root), example[:1].to(device))
    return {(f"{prefix}.{n}" if prefix else n): p for n, p in profile.items()}


def find_example_input(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str,
                       input_fn: Callable[[Any], Tensor], example_input: Tensor | None = None) -> Tensor | None:
    """An input to profile with: ``example_input``, else the module's ``example_input_array``, else one sample of the
    datamodule's loader for ``stage``; None if there is none (then the first training batch is used)."""
    if example_input is not None:
        return example_input
    if isinstance(getattr(pl_module, "example_input_array", None), Tensor):
        return pl_module.example_input_array
    dm = trainer.datamodule if hasattr(trainer, "datamodule") else None
    if dm is not None:
        loader_fn = {"fit": "train_dataloader", "validate": "val_dataloader", "test": "test_dataloader",
                     "predict": "predict_dataloader"}.get(stage)
        try:
            batch = next(iter(getattr(dm, loader_fn)()))
            return input_fn(batch)[:1]
        except Exception:  # noqa: BLE001 - fall back to the first training batch
            return None
    return None


def num_classes_of(root: nn.Module, last_layer: str | None) -> int | None:
    """Output features of the classifier ``last_layer`` (None if unknown)."""
    mod = root.get_submodule(last_layer) if last_layer else None
    return getattr(mod, "out_features", None)
