"""One-call export of a model, a Lightning checkpoint or a training run folder of the app."""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdq_lightning.budget import BitPlan
from sdq_lightning.checkpoint import load_checkpoint, load_quantized, load_quantized_state, network_of, \
    plan_for_state, plan_from_checkpoint
from sdq_lightning.export.formats import DEFAULT_FORMATS, FORMATS, ExportContext, get_export_format
from sdq_lightning.export.onnx_export import DEFAULT_OPSET, onnx_int_type
from sdq_lightning.export.packed import check_exportable, check_plan_matches, plan_of

__all__ = ["FORMATS", "MIN_OPSET", "export_from_checkpoint", "export_model", "export_run", "load_run_model",
           "min_opset"]

MIN_OPSET = 18  # the float graph is written at opset 18 and the QDQ rewrite only raises it (per-axis DQ needs 13)


# ------------------------------------------------------------------------------------------------- checks
def min_opset(model: nn.Module) -> int:
    """The lowest ONNX opset the export of ``model`` accepts: :data:`MIN_OPSET`, or higher if a layer's bits have no
    ONNX integer type below it (:func:`onnx_int_type` decides: from opset 25 int2 holds 1..2-bit values, from 21 int4
    holds 3..4-bit values, below that they go into int8)."""
    need = MIN_OPSET
    for m in model.modules():
        for q, signed in ((getattr(m, "weight_quant", None), True), (getattr(m, "act_quant", None), None)):
            if q is None or not isinstance(getattr(q, "bits", None), int):
                continue
            s = bool(q.signed) if signed is None else signed
            need = max(need, next((o for o in range(MIN_OPSET, DEFAULT_OPSET + 1) if _has_type(q.bits, s, o)),
                                  DEFAULT_OPSET))
    return need


def _has_type(bits: int, signed: bool, opset: int) -> bool:
    try:
        onnx_int_type(bits, signed, opset)
    except ValueError:
        return False
    return True


def check_opset(model: nn.Module, opset: Any) -> int:
    """``opset`` as an int, or a one-line ``ValueError`` naming the range this model allows."""
    import onnx

    need, top = min_opset(model), onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not need <= opset <= top:
        bits = sorted({m.weight_quant.bits for m in model.modules() if getattr(m, "weight_quant", None) is not None})
        raise ValueError(f"opset must be an integer in [{need}, {top}] for this model (weight bits {bits}; onnx "
                         f"{onnx.__version__} knows opsets up to {top}), got {opset!r}")
    return opset


def _check_input(model: nn.Module, example_input: Any) -> None:
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(f"example_input must be a tensor batch the model accepts, got {type(example_input).__name__}")
    try:
        with torch.no_grad():
            model(example_input)
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"example input of shape {tuple(example_input.shape)} does not fit the model: {first}"
                         ) from None


def _formats(formats: Sequence[str] | str | None) -> list[str]:
    if formats is None:
        return list(DEFAULT_FORMATS)
    names = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats)
    names = [f for f in names if f]
    if not names:
        raise ValueError(f"formats must name at least one of {tuple(FORMATS)}")
    for f in names:
        get_export_format(f)  # one-line ValueError naming the registered formats
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------- export
def export_model(model: nn.Module, out_dir: str | Path, example_input: torch.Tensor, plan: BitPlan | None = None,
                 formats: Sequence[str] | str | None = None, opset: int = DEFAULT_OPSET, model_name: str | None = None,
                 model_kwargs: Mapping[str, Any] | None = None, verify: bool = True,
                 options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Export a frozen quantized model (any ``nn.Module``: a timm model, your own network, a LightningModule) in
    every format asked for under ``out_dir``, plus ``plan.yaml`` and a summary ``export.json``.

    ``formats``: names of registered formats (default :data:`DEFAULT_FORMATS`: ``packed`` -> ``model.sdqpack``,
    ``onnx`` -> ``model.onnx``, ``report`` -> ``capability.{md,json}``; add your own with
    :func:`register_export_format`). ``plan`` (optional) must match the bits the model holds. ``example_input``: a
    batch the model accepts (checked by one forward pass). With ``verify`` the ONNX model is run in onnxruntime on
    it and the max abs difference to PyTorch is recorded. ``model_name``/``model_kwargs``: how ``load_packed``
    rebuilds a timm model (read from timm's ``pretrained_cfg`` when left out; a non-timm model is rebuilt by passing
    ``load_packed(path, model=<float model>)``). ``options``: format-specific options, passed to every exporter as
    ``ctx.options``. Returns the summary dict. Raises ``ValueError`` (one line) for bad arguments.
    """
    names = _formats(formats)
    model = model.eval()
    check_exportable(model)
    if any(f in names for f in ("onnx", "report")):
        opset = check_opset(model, opset)
    _check_input(model, example_input)
    plan = check_plan_matches(plan, model) if plan is not None else plan_of(model, example_input)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = ExportContext(model=model, out_dir=out, example_input=example_input, plan=plan, opset=opset, verify=verify,
                        model_name=model_name, model_kwargs=dict(model_kwargs or {}), options=dict(options or {}))
    summary: dict[str, Any] = {"formats": names, "opset": opset, "files": {}}
    for name in names:
        part = dict(get_export_format(name)(ctx) or {})
        summary["files"].update(part.pop("files", {}) or {})
        summary.update(part)
    plan.save(out / "plan.yaml")
    summary["files"]["plan"] = str(out / "plan.yaml")
    (out / "export.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# ------------------------------------------------------------------------------------- checkpoints and runs
def _strip_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone's entries of a LightningModule's state dict (``model.`` as ``SDQClassifier`` writes it)."""
    keys = list(state)
    for prefix in ("model.", "module.model.", "net."):
        if all(k.startswith(prefix) for k in keys if not k.startswith(("teacher.", "_teacher"))):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith("model.") for k in keys):  # extra modules next to the backbone (losses, teacher, ...)
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return dict(state)


def export_from_checkpoint(ckpt_path: str | Path, backbone: str, num_classes: int, plan: BitPlan | str | Path,
                           in_chans: int | None = None, **model_kwargs: Any) -> nn.Module:
    """A frozen quantized timm model from a Lightning checkpoint (or a plain state dict): ``timm.create_model
    (backbone)``, quantized with ``plan`` and the checkpoint's ``state_dict`` (``model.`` keys as ``SDQClassifier``
    writes them) loaded. Searched checkpoints (one step per candidate) work for any candidate set the plan names.
    Raises ``ValueError`` for a plan of another model or a state that does not fit."""
    import timm

    import sdq_lightning  # noqa: F401  (registers the CIFAR ResNets)

    path = Path(ckpt_path)
    ckpt = load_checkpoint(path)
    if not isinstance(plan, BitPlan):
        plan = BitPlan.load(plan)
    if in_chans is not None:
        model_kwargs["in_chans"] = int(in_chans)
    model = timm.create_model(backbone, pretrained=False, num_classes=int(num_classes), **model_kwargs)
    state = _strip_state(ckpt.get("state_dict", ckpt))
    return load_quantized_state(model, state, plan, where=f"checkpoint {path} ({backbone})")


def _find_checkpoint(run: Path) -> Path:
    if run.is_file():
        return run
    if not run.is_dir():
        raise FileNotFoundError(f"run folder or checkpoint not found: {run}")
    for folder in (run / "checkpoints", run):
        if (folder / "last.ckpt").is_file():
            return folder / "last.ckpt"
        ckpts = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if ckpts:
            return ckpts[-1]
    raise ValueError(f"no *.ckpt in run folder {run} (checkpoints/last.ckpt; train with save_checkpoint=true)")


def _run_config(base: Path) -> tuple[dict[str, Any], Path | None]:
    """``model`` and ``dataset`` of the run's config, resolved: ``config.yaml`` (written resolved by the app), else
    Hydra's ``.hydra/config.yaml``; in ``base`` or its parent (the ``fp/`` and ``uniform/`` runs of a compare)."""
    from omegaconf import OmegaConf

    for folder in (base, base.parent):
        for path in (folder / "config.yaml", folder / ".hydra" / "config.yaml"):
            if not path.is_file():
                continue
            cfg = OmegaConf.load(path)
            out: dict[str, Any] = {}
            for key in ("model", "dataset"):
                if key in cfg:
                    try:
                        out[key] = OmegaConf.to_container(cfg[key], resolve=True)
                    except Exception as err:  # noqa: BLE001 - OmegaConf raises several types
                        raise ValueError(f"{path}: cannot resolve {key}: {str(err).splitlines()[0]}") from None
            return out, path
    return {}, None


def _module_class(target: str | None) -> type[nn.Module]:
    target = target or "sdq_lightning.lit.SDQClassifier"
    mod, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"the run's model._target_ {target!r} cannot be imported") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"the run's model._target_ {target!r} is not an nn.Module class")
    return cls


def load_run_model(run: str | Path) -> tuple[nn.Module, BitPlan, dict[str, Any]]:
    """The frozen quantized network of a run folder the app wrote (``checkpoints/last.ckpt``, ``config.yaml`` or
    ``.hydra/config.yaml``, ``plan.yaml``; also its ``fp/`` and ``uniform/`` sub-runs), or of a single ``.ckpt``
    inside one. Returns the network (``SDQClassifier.model``), its plan and the run's resolved ``model``/``dataset``
    config. The LightningModule is rebuilt from the checkpoint's hyper-parameters (``model._target_`` of the config,
    default ``SDQClassifier``); the plan comes from the checkpoint, else from ``plan.yaml``."""
    ckpt_path = _find_checkpoint(Path(run))
    base = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    cfg, cfg_path = _run_config(base)
    ckpt = load_checkpoint(ckpt_path)
    if cfg_path is None and "backbone" not in (ckpt.get("hyper_parameters") or {}):
        raise ValueError(f"{ckpt_path} is not from an sdq-train run (no config.yaml beside it, not an SDQClassifier "
                         "checkpoint): sdq-export rebuilds the app's models only; export your own LightningModule "
                         "in Python: lit = sdq_lightning.load_quantized(YourModule, path), then "
                         "sdq_lightning.export.export_model(<its network>, out_dir, example_input=x) (docs/export.md)")
    plan = plan_from_checkpoint(ckpt)
    if plan is None:
        plan_path = next((d / "plan.yaml" for d in (base, base.parent) if (d / "plan.yaml").is_file()), None)
        if plan_path is None:
            raise ValueError(f"{ckpt_path} holds no SDQ plan and there is no plan.yaml next to it")
        plan = BitPlan.load(plan_path)
    mcfg = dict(cfg.get("model") or {})
    cls = _module_class(mcfg.pop("_target_", None))
    hparams = ckpt.get("hyper_parameters")
    no_weights = {"pretrained": False, "init_checkpoint": None}  # the checkpoint holds the weights
    if hparams:
        init = {k: v for k, v in no_weights.items() if k in hparams}
    elif mcfg:
        init = {k: v for k, v in mcfg.items() if v is not None}
        for key in ("num_classes", "in_chans"):
            if key not in init and (cfg.get("dataset") or {}).get(key) is not None:
                init[key] = cfg["dataset"][key]
        init.update({k: v for k, v in no_weights.items() if k in init})
    else:
        raise ValueError(f"{ckpt_path} has no hyper_parameters and no run config was found next to it "
                         f"(config.yaml or .hydra/config.yaml)")
    plan = plan_for_state(plan, ckpt.get("state_dict", ckpt))  # a run trained in the mode under a given plan
    module = load_quantized(cls, ckpt_path, plan=plan, **init)
    net = network_of(module)
    return net.eval(), plan.rebased(net), cfg


def _input_size(net: nn.Module, cfg: Mapping[str, Any]) -> tuple[int, ...]:
    data = cfg.get("dataset") or {}
    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    size = data.get("image_size")
    if first is not None and isinstance(size, int):
        return (first.in_channels, size, size)
    cfg_size = (getattr(net, "pretrained_cfg", None) or {}).get("input_size")
    if cfg_size:
        return tuple(int(v) for v in cfg_size)
    raise ValueError("cannot tell the model's input size from the run; pass --example-input-size C,H,W")


def export_run(run: str | Path, out_dir: str | Path, example_input_size: Sequence[int] | None = None,
               formats: Sequence[str] | str | None = None, opset: int = DEFAULT_OPSET,
               example_input: torch.Tensor | None = None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Export a run folder of the app, or a checkpoint inside one (see :func:`load_run_model`). The example input
    is ``example_input``, else a random batch of one of ``example_input_size`` (default: the run's
    ``dataset.image_size`` and the first conv's channels)."""
    net, plan, cfg = load_run_model(run)
    if example_input is None:
        size = tuple(example_input_size) if example_input_size is not None else _input_size(net, cfg)
        if not size or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
            raise ValueError(f"example input size must be positive integers such as 3,32,32, got {size}")
        example_input = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    return export_model(net, out_dir, example_input, plan=plan, formats=formats, opset=opset, options=options)
