"""Resolve the KD teacher: an nn.Module, a timm model name, or a checkpoint path.

A checkpoint is rebuilt from, in order: ``teacher_cls`` (your LightningModule class, or an import path such as
``"mypkg.models.LitNet"``, loaded with ``load_from_checkpoint``; or any callable returning an ``nn.Module`` whose
state dict the checkpoint holds); a ``_class_path`` hyperparameter (LightningCLI checkpoints); ``arch`` or the
``backbone`` hyperparameter (a timm model, e.g. an :class:`SDQClassifier` checkpoint). Otherwise the error says
which of these to pass.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = ["check_teacher_file", "load_teacher"]

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TeacherCls = type | Callable[[], nn.Module] | str


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or state


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"teacher_cls must be a class, a callable or an import path 'package.module.Class', "
                         f"got {path!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"teacher_cls {path!r} cannot be imported ({type(err).__name__}: {err})") from None


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip checkpoint (mmap) or pickled objects beyond weights
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            from sdq_lightning.checkpoint import unreadable

            raise ValueError(f"teacher checkpoint: {unreadable(path, err)}") from None


def _hparams(ckpt: Any) -> Mapping[str, Any]:
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    return hp if isinstance(hp, Mapping) else {}


def _what_to_pass(path: Path, ckpt: Any) -> str:
    lightning = isinstance(ckpt, Mapping) and any(k.startswith("pytorch-lightning") for k in ckpt)
    kind = "a LightningModule checkpoint" if lightning else "a state dict"
    keys = sorted(_hparams(ckpt))
    hp = f" (hyper_parameters: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})" if keys else ""
    return (f"teacher checkpoint {path} is {kind} that names no model to rebuild{hp}; pass teacher_cls=<your "
            f"LightningModule class or 'package.module.Class'> (it is loaded with load_from_checkpoint), or the "
            f"module itself as teacher (teacher=LitNet.load_from_checkpoint('{path}')), or teacher_arch=<timm model "
            f"name> if the weights are a timm model's")


def _pretrained_unavailable(name: str, timeout: float = 3.0) -> str | None:
    """Why timm cannot get the pretrained weights of ``name`` now (None: cached, or the download host answers)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        return "timm has no pretrained weights for it"
    if cfg.file and Path(cfg.file).is_file():
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
            return None
        host = "huggingface.co"
    else:
        if (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name).is_file():
            return None
        host = urlparse(cfg.url).hostname or "the download host"
    if cfg.hf_hub_id and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "they are not in the local cache and HF_HUB_OFFLINE is set"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as err:
        return f"they are not in the local cache and {host} cannot be reached ({type(err).__name__})"


def check_teacher_name(name: str) -> None:
    """Fail fast with one line when ``name`` is no timm model or its pretrained weights cannot be had (offline and
    not cached), instead of timm's download retries."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"teacher must be an nn.Module, an existing checkpoint file or a timm model name; "
                         f"{name!r} is neither a file nor a timm model")
    why = _pretrained_unavailable(name)
    if why is not None:
        raise ValueError(f"teacher {name!r} needs timm's pretrained weights, but {why}; pass a teacher checkpoint "
                         "path (or an nn.Module), or run once online to cache the weights")


def check_teacher_file(teacher: str | Path, arch: str | None = None, teacher_cls: TeacherCls | None = None) -> None:
    """Fail early (e.g. in ``SDQ.__init__``) with one line when a teacher cannot be had: a checkpoint that cannot be
    rebuilt (read memory-mapped where possible), a missing file, or a timm name without reachable weights."""
    path = Path(teacher)
    if not path.is_file():
        if path.suffix in CHECKPOINT_SUFFIXES:
            raise FileNotFoundError(f"teacher checkpoint {teacher} does not exist")
        check_teacher_name(str(teacher))
        return
    if teacher_cls is not None:
        if isinstance(teacher_cls, str):
            teacher_cls = _import(teacher_cls)
        if not callable(teacher_cls):
            raise ValueError(f"teacher_cls must be a class, a callable or an import path, got "
                             f"{type(teacher_cls).__name__}")
        return
    ckpt = _read(path)
    hp = _hparams(ckpt)
    if arch is None and not isinstance(hp.get("backbone"), str) and not isinstance(hp.get("_class_path"), str):
        raise ValueError(_what_to_pass(path, ckpt))


def _from_class(cls: Any, path: Path, ckpt_reader: Callable[[], Any]) -> nn.Module:
    if isinstance(cls, str):
        cls = _import(cls)
    if hasattr(cls, "load_from_checkpoint"):
        return cls.load_from_checkpoint(path, map_location="cpu")
    if not callable(cls):
        raise ValueError(f"teacher_cls must be a class, a callable or an import path, got {type(cls).__name__}")
    model = cls()
    if not isinstance(model, nn.Module):
        raise ValueError(f"teacher_cls() must return an nn.Module, got {type(model).__name__}")
    ckpt = ckpt_reader()
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else ckpt
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        for prefix in ("model.", "net.", "module."):
            stripped = _strip(state, prefix)
            if stripped is not state and not any(model.load_state_dict(stripped, strict=False)):
                return model
        raise ValueError(f"teacher checkpoint {path} does not match teacher_cls(): {len(missing)} missing keys "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    return model


def _from_checkpoint(path: Path, num_classes: int | None, arch: str | None, teacher_cls: TeacherCls | None
                     ) -> nn.Module:
    import timm

    if teacher_cls is not None:
        return _from_class(teacher_cls, path, lambda: _read(path))
    ckpt = _read(path)
    hparams = _hparams(ckpt)
    if arch is None and isinstance(hparams.get("_class_path"), str):
        return _from_class(hparams["_class_path"], path, lambda: ckpt)
    name = arch or hparams.get("backbone")
    if not isinstance(name, str):
        raise ValueError(_what_to_pass(path, ckpt))
    ncls = hparams.get("num_classes", num_classes)
    kwargs = {"in_chans": hparams["in_chans"]} if "in_chans" in hparams else {}
    model = timm.create_model(name, pretrained=False, num_classes=ncls, **kwargs)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    model.load_state_dict(_strip(state, "model."))
    return model


def load_teacher(teacher: nn.Module | str | Path, num_classes: int | None = None, arch: str | None = None,
                 teacher_cls: TeacherCls | None = None) -> nn.Module:
    """Build the teacher and freeze it (eval mode, no gradients).

    Args:
        teacher: a module; a checkpoint path (see the module docstring for how it is rebuilt); or a timm model name
            (pretrained weights are downloaded by timm, which needs internet).
        num_classes: classes of the student, used to build the teacher from a name.
        arch: timm name for a plain state-dict checkpoint.
        teacher_cls: for a checkpoint of your own model: your LightningModule class (or its import path), loaded
            with ``load_from_checkpoint``; or a zero-argument callable returning the ``nn.Module`` whose state dict
            the checkpoint holds (a ``model.``/``net.``/``module.`` prefix is stripped when needed).
    """
    import timm

    if isinstance(teacher, nn.Module):
        model = teacher
    elif isinstance(teacher, (str, Path)) and Path(teacher).is_file():
        model = _from_checkpoint(Path(teacher), num_classes, arch, teacher_cls)
    elif isinstance(teacher, (str, Path)) and Path(teacher).suffix in CHECKPOINT_SUFFIXES:
        raise FileNotFoundError(f"teacher checkpoint {teacher} does not exist")
    elif isinstance(teacher, str):
        check_teacher_name(teacher)
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
