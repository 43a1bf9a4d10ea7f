"""One-call export of a model, a Lightning checkpoint or a training run folder."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdq_lightning.budget import BitPlan
from sdq_lightning.export.onnx_export import DEFAULT_FORM, DEFAULT_OPSET, export_onnx, run_onnx
from sdq_lightning.export.packed import check_exportable, check_plan_matches, plan_of, save_packed
from sdq_lightning.export.report import capability_report, write_report

__all__ = ["FORMATS", "export_from_checkpoint", "export_model", "export_run", "load_run_model"]

FORMATS = ("packed", "onnx", "report")


def export_model(model: nn.Module, out_dir: str | Path, example_input: torch.Tensor, plan: BitPlan | None = None,
                 formats: Sequence[str] = FORMATS, opset: int = DEFAULT_OPSET, model_name: str | None = None,
                 model_kwargs: Mapping[str, Any] | None = None, verify: bool = True,
                 onnx_form: str = DEFAULT_FORM) -> dict[str, Any]:
    """Write ``model.sdqpack``, ``model.onnx`` and ``capability.{md,json}`` under ``out_dir``.

    ``plan`` (optional) must match the bits the model holds (``ValueError`` otherwise). With ``verify`` the ONNX
    model is run in onnxruntime on ``example_input`` and the max abs difference to PyTorch is recorded. Returns a
    summary dict (also written as ``export.json``).
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    model = model.eval()
    check_exportable(model)
    plan = check_plan_matches(plan, model) if plan is not None else plan_of(model, example_input)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"files": {}}
    if "packed" in formats:
        p = save_packed(model, out / "model.sdqpack", plan=plan, model_name=model_name,
                        model_kwargs=dict(model_kwargs or {}))
        summary["files"]["packed"] = str(p)
        summary["packed_bytes"] = p.stat().st_size
    if "onnx" in formats:
        p = export_onnx(model, out / "model.onnx", example_input, opset=opset, form=onnx_form)
        summary["files"]["onnx"] = str(p)
        if verify:
            with torch.no_grad():
                ref = model(example_input).numpy()
            got = run_onnx(p, example_input)
            summary["onnx_max_abs_diff"] = float(abs(got - ref).max())
            summary["onnx_top1_agreement"] = float((got.argmax(1) == ref.argmax(1)).mean())
    if "report" in formats:
        onnx_file = summary["files"].get("onnx")
        rep = capability_report(model, opset, onnx_path=onnx_file, example_shape=tuple(example_input.shape))
        j, m = write_report(rep, out)
        summary["files"]["report_json"], summary["files"]["report_md"] = str(j), str(m)
    plan.save(out / "plan.yaml")
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    return summary


def _strip_state(ckpt: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path} holds no state_dict (expected a Lightning checkpoint or a plain state dict)")
    keys = list(state)
    for prefix in ("model.", "module.model.", "net.", ""):
        if prefix and all(k.startswith(prefix) for k in keys if not k.startswith(("teacher.", "_teacher"))):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith("model.") for k in keys):  # extra modules next to the backbone (losses, teacher, ...)
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return dict(state)


def export_from_checkpoint(ckpt_path: str | Path, backbone: str, num_classes: int, plan: BitPlan | str | Path,
                           in_chans: int | None = None, **model_kwargs: Any) -> nn.Module:
    """A frozen quantized model from a Lightning checkpoint: ``timm.create_model(backbone)``, ``plan.apply``, then the
    checkpoint's ``state_dict`` (keys prefixed ``model.`` as ``SDQClassifier`` writes them) loaded with
    ``torch.load(weights_only=True)``. Raises ``ValueError`` for a plan of another model or a state that does not fit.
    """
    import timm

    import sdq_lightning  # noqa: F401

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not isinstance(plan, BitPlan):
        plan = BitPlan.load(plan)
    kwargs = {"num_classes": int(num_classes), **model_kwargs}
    if in_chans is not None:
        kwargs["in_chans"] = int(in_chans)
    model = timm.create_model(backbone, pretrained=False, **kwargs)
    plan.apply(model)  # ValueError for a plan of another model
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle/zip errors of all kinds)
        raise ValueError(f"{path} is not a loadable checkpoint (torch.load weights_only=True): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    state = _strip_state(ckpt, path)
    own = model.state_dict()
    # a searched checkpoint has one step/DBP per candidate; keep the frozen candidate's step only
    for name, q in ((n, m) for n, m in model.named_modules() if hasattr(m, "weight_quant")):
        key = f"{name}.weight_quant.steps"
        if q.weight_quant is not None and key in state and state[key].shape != own[key].shape:
            steps = state[key]
            cands = state.get(f"{name}.weight_quant.candidates")
            idx = _candidate_index(steps, plan[name] if name in plan else q.weight_quant.bits, cands)
            state[key] = steps[idx:idx + 1]
            for k in ("dbp", "level", "frozen_index"):
                state.pop(f"{name}.weight_quant.{k}", None)
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.endswith(("dbp", "level", "frozen_index", "draw_step",
                                                                      "temperature"))]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit {backbone} with this plan: shape mismatch {wrong[:3]}, "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    frozen = {n: int(m.weight_quant.frozen_index) for n, m in model.named_modules()
              if getattr(m, "weight_quant", None) is not None}
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith(("frozen_index", "level"))}, strict=False)
    for n, idx in frozen.items():  # the plan decides the bits, whatever the checkpoint's buffers said
        model.get_submodule(n).weight_quant.freeze(model.get_submodule(n).weight_quant.candidates[idx])
    return model.eval()


def _candidate_index(steps: torch.Tensor, bits: int, cands: Any) -> int:
    n = steps.shape[0]
    if n == 8:  # the default candidate set 1..8
        return bits - 1
    raise ValueError(f"checkpoint has {n} step candidates; cannot tell which one is {bits} bits "
                     f"(apply the plan to the SDQ-trained model and use export_model instead)")


def load_run_model(run: str | Path) -> tuple[nn.Module, BitPlan, dict[str, Any]]:
    """Model, plan and config of a training run folder (``plan.yaml``, ``*.ckpt``, ``.hydra/config.yaml``), or of a
    single ``.ckpt`` with ``plan.yaml`` and ``.hydra/`` next to it or one level up."""
    import yaml

    run = Path(run)
    if run.is_file():
        ckpt, base = run, run.parent
    elif run.is_dir():
        ckpts = sorted(run.rglob("*.ckpt"))
        last = [c for c in ckpts if c.name == "last.ckpt"]
        if not ckpts:
            raise ValueError(f"no *.ckpt under run folder {run}")
        ckpt, base = (last or ckpts)[-1], run
    else:
        raise FileNotFoundError(f"run folder or checkpoint not found: {run}")
    candidates = [base, base.parent, base.parent.parent]
    plan_path = next((d / "plan.yaml" for d in candidates if (d / "plan.yaml").is_file()), None)
    cfg_path = next((d / ".hydra" / "config.yaml" for d in candidates if (d / ".hydra" / "config.yaml").is_file()),
                    None)
    if plan_path is None or cfg_path is None:
        raise ValueError(f"{run}: need plan.yaml and .hydra/config.yaml next to the checkpoint (found plan: "
                         f"{plan_path}, config: {cfg_path})")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    mcfg = cfg.get("model") or {}
    backbone, num_classes = mcfg.get("backbone"), mcfg.get("num_classes")
    if not backbone or num_classes is None:
        raise ValueError(f"{cfg_path} lacks model.backbone or model.num_classes")
    kwargs = {}
    if mcfg.get("in_chans") is not None:
        kwargs["in_chans"] = int(mcfg["in_chans"])
    plan = BitPlan.load(plan_path)
    model = export_from_checkpoint(ckpt, backbone, int(num_classes), plan, **kwargs)
    return model, plan, cfg


def export_run(run: str | Path, out_dir: str | Path, example_input_size: Sequence[int] | None = None,
               formats: Sequence[str] = FORMATS, opset: int = DEFAULT_OPSET,
               onnx_form: str = DEFAULT_FORM) -> dict[str, Any]:
    """Export a training run folder or Lightning checkpoint (see :func:`load_run_model`)."""
    model, plan, cfg = load_run_model(run)
    if example_input_size is None:
        cfg_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        example_input_size = tuple(cfg_size) if cfg_size else (3, 32, 32)
    x = torch.randn(1, *example_input_size)
    return export_model(model, out_dir, x, plan=plan, formats=formats, opset=opset, onnx_form=onnx_form)
