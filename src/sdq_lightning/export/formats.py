"""The registry of export formats: format name -> exporter (``packed``, ``onnx`` and ``report`` built in).

A new format is one function plus one registration (see ``docs/extending.md``)::

    @register_export_format("npz", description="integer codes and steps as a numpy .npz")
    def export_npz(ctx: ExportContext) -> dict[str, Any]:
        path = ctx.out_dir / "model.npz"
        ...                                  # write it
        return {"files": {"npz": str(path)}}

Every registered format is accepted by :func:`sdq_lightning.export.export_model`, ``export_run`` and
``sdq-export --formats``. An exporter returns a dict that is merged into the export summary (``export.json``): its
``files`` entries name the files it wrote; any other key (e.g. a size or an agreement figure) is kept as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdq_lightning.budget import BitPlan
from sdq_lightning.registry import Registry, RegistryNames

__all__ = ["DEFAULT_FORMATS", "FORMATS", "ExportContext", "ExportFn", "export_format_help", "get_export_format",
           "register_export_format", "unregister_export_format"]


@dataclass
class ExportContext:
    """What every exporter gets: the frozen quantized model (eval mode), where to write, an example input (a batch
    the model accepts), the plan it holds, the ONNX opset asked for and the options of ``export_model``."""

    model: nn.Module
    out_dir: Path
    example_input: torch.Tensor
    plan: BitPlan
    opset: int
    verify: bool = True
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # format-specific options (``export_model(options=)``)


ExportFn = Callable[[ExportContext], Mapping[str, Any]]


@dataclass(frozen=True)
class _Format:
    fn: ExportFn
    description: str
    default: bool


_FORMATS: Registry[_Format] = Registry(
    "export format", (re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$"), "a letter followed by letters, digits, '_' or '-'"))

FORMATS = RegistryNames(_FORMATS)
"""Names of every registered export format (live)."""


DEFAULT_FORMATS = RegistryNames(_FORMATS, keep=lambda f: f.default)
"""The formats written when none are named (the built-ins; a format registered with ``default=True`` joins them)."""


def register_export_format(name: str, *, description: str = "", default: bool = False,
                           replace: bool = False) -> Callable[[ExportFn], ExportFn]:
    """Decorator registering ``fn(ctx: ExportContext) -> dict`` as export format ``name``. ``default=True`` writes it
    whenever no formats are named; ``replace=True`` overrides an existing format (else ``ValueError``)."""
    _FORMATS.check(name, replace)

    def decorate(fn: ExportFn) -> ExportFn:
        if not callable(fn):
            raise ValueError(f"register_export_format({name!r}) decorates a function (ctx) -> dict, "
                             f"got {type(fn).__name__}")
        _FORMATS.add(name, _Format(fn, description or (fn.__doc__ or "").strip().split("\n")[0], bool(default)),
                     replace=True)
        return fn

    return decorate


def unregister_export_format(name: str) -> None:
    """Remove a registered export format (``ValueError`` for an unknown name)."""
    _FORMATS.remove(name)


def get_export_format(name: str) -> ExportFn:
    """The exporter registered as ``name``; ``ValueError`` naming the registered formats otherwise."""
    return _FORMATS.lookup(name).fn


def export_format_help() -> str:
    """One line per registered format: name, whether it is a default, description (for ``--help``)."""
    return "; ".join(f"{n}{' (default)' if f.default else ''}: {f.description}" for n, f in _FORMATS.items())


# ----------------------------------------------------------------------------------------------- built-in formats
@register_export_format("packed", default=True, description="model.sdqpack, weights bit-packed at the plan's bits")
def _export_packed(ctx: ExportContext) -> dict[str, Any]:
    from sdq_lightning.export.packed import save_packed

    p = save_packed(ctx.model, ctx.out_dir / "model.sdqpack", plan=ctx.plan, model_name=ctx.model_name,
                    model_kwargs=dict(ctx.model_kwargs))
    return {"files": {"packed": str(p)}, "packed_bytes": p.stat().st_size}


@register_export_format("onnx", default=True, description="model.onnx with QuantizeLinear/DequantizeLinear, "
                                                          "checked in onnxruntime")
def _export_onnx(ctx: ExportContext) -> dict[str, Any]:
    from sdq_lightning.checkpoint import network_of
    from sdq_lightning.export.integer_only import INTEGER_ONLY_OPSET
    from sdq_lightning.export.lowering import (INTEGER_FORMS, INTEGER_ONLY_FORM, ONNX_FORMS, LoweringContext,
                                               get_lowering)
    from sdq_lightning.export.onnx_export import DEFAULT_FORM, DEFAULT_OPSET, run_onnx
    from sdq_lightning.integer import is_integer_only

    form = ctx.options.get("onnx_form") or DEFAULT_FORM
    if is_integer_only(network_of(ctx.model)):  # trained as onnxruntime's integer graph: that graph, nothing else
        form = ctx.options.get("onnx_form") or INTEGER_ONLY_FORM
        if form not in INTEGER_FORMS:
            raise ValueError(f"this model was trained integer-only: its ONNX form is {INTEGER_ONLY_FORM!r} (one of "
                             f"{', '.join(INTEGER_FORMS)}), got onnx_form={form!r}")
    elif form not in ONNX_FORMS:
        raise ValueError(f"onnx_form must be one of {', '.join(ONNX_FORMS)}, got {form!r}")
    p = get_lowering(form)(LoweringContext(ctx.model, ctx.out_dir / "model.onnx", ctx.example_input, ctx.opset))
    out: dict[str, Any] = {"files": {"onnx": str(p)}, "onnx_form": form}
    if form in INTEGER_FORMS:
        out["onnx_opset"] = INTEGER_ONLY_OPSET
    if ctx.verify:
        with torch.no_grad():
            ref = ctx.model(ctx.example_input).numpy()
        try:
            got = run_onnx(p, ctx.example_input)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            import onnxruntime

            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"onnxruntime {onnxruntime.__version__} cannot run the exported {p.name} at opset "
                             f"{ctx.opset} ({first}); the default opset is {DEFAULT_OPSET}") from None
        out["onnx_max_abs_diff"] = float(abs(got - ref).max())
        out["onnx_top1_agreement"] = float((got.argmax(1) == ref.argmax(1)).mean())
    return out


@register_export_format("report", default=True, description="capability.md/.json, per-layer bits and formats")
def _export_report(ctx: ExportContext) -> dict[str, Any]:
    from sdq_lightning.export.report import capability_report, write_report

    onnx_file = ctx.out_dir / "model.onnx"  # written first when "onnx" is among the formats: name its kernels
    rep = capability_report(ctx.model, ctx.opset, onnx_path=str(onnx_file) if onnx_file.exists() else None,
                            example_shape=tuple(ctx.example_input.shape))
    j, m = write_report(rep, ctx.out_dir)
    return {"files": {"report_json": str(j), "report_md": str(m)}}
