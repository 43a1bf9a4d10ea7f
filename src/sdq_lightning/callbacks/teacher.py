"""Resolve the KD teacher: an nn.Module, a timm model name, or a checkpoint path."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["load_teacher"]


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or state


def load_teacher(teacher: nn.Module | str, num_classes: int | None = None, arch: str | None = None) -> nn.Module:
    """Build the teacher and freeze it (eval mode, no gradients).

    Args:
        teacher: a module; a checkpoint path (a Lightning ``.ckpt`` of :class:`SDQClassifier`, whose hyperparameters
            name the backbone, or a state dict with ``arch`` naming the timm model); or a timm model name (pretrained
            weights are downloaded by timm, which needs internet).
        num_classes: classes of the student, used to build the teacher from a name.
        arch: timm name for a plain state-dict checkpoint.
    """
    import timm

    if isinstance(teacher, nn.Module):
        model = teacher
    elif isinstance(teacher, (str, Path)) and Path(teacher).is_file():
        ckpt = torch.load(teacher, map_location="cpu", weights_only=True)
        hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
        name = arch or hparams.get("backbone")
        if not isinstance(name, str):
            raise ValueError(f"teacher checkpoint {teacher} does not name its architecture; pass teacher_arch=<timm "
                             f"model name>")
        ncls = hparams.get("num_classes", num_classes)
        kwargs = {"in_chans": hparams["in_chans"]} if "in_chans" in hparams else {}
        model = timm.create_model(name, pretrained=False, num_classes=ncls, **kwargs)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        model.load_state_dict(_strip(state, "model."))
    elif isinstance(teacher, str):
        if not timm.is_model(teacher):
            raise ValueError(f"teacher must be an nn.Module, an existing checkpoint file or a timm model name; "
                             f"{teacher!r} is neither a file nor a timm model")
        try:
            model = timm.create_model(teacher, pretrained=True, num_classes=num_classes)
        except Exception as err:  # noqa: BLE001 - network or missing weights
            raise ValueError(f"could not load pretrained weights for teacher {teacher!r} ({type(err).__name__}); "
                             f"offline, pass a checkpoint path or an nn.Module as teacher") from None
    else:
        raise ValueError(f"teacher must be None, an nn.Module, a timm model name or a checkpoint path, got "
                         f"{type(teacher).__name__}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
