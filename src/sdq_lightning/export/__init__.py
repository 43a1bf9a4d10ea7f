"""Deployment export: packed checkpoint (bit-packed integer weights), QDQ ONNX, capability report.

>>> from sdq_lightning.export import export_model, load_packed
>>> export_model(model, "out/", torch.randn(1, 3, 32, 32))   # model.sdqpack, model.onnx, capability.{md,json}
>>> model2 = load_packed("out/model.sdqpack")                  # outputs equal the fake-quantized model's
>>> export_run("outputs/runs/digits_demo/<run>", "out/")          # a run folder of the app (= sdq-export)

New formats: :func:`register_export_format`; new ONNX forms: :func:`register_lowering` (see ``docs/extending.md``).
"""

from sdq_lightning.export.api import (
    MIN_OPSET,
    export_from_checkpoint,
    export_model,
    export_run,
    load_run_model,
    min_opset,
)
from sdq_lightning.export.formats import (
    DEFAULT_FORMATS,
    FORMATS,
    ExportContext,
    get_export_format,
    register_export_format,
    unregister_export_format,
)
from sdq_lightning.export.lowering import (
    LOWERINGS,
    LoweringContext,
    get_lowering,
    register_lowering,
    unregister_lowering,
)
from sdq_lightning.export.bitpack import pack_bits, packed_nbytes, unpack_bits
from sdq_lightning.export.onnx_export import (
    DEFAULT_FORM,
    DEFAULT_OPSET,
    ONNX_FORMS,
    export_float_onnx,
    export_onnx,
    onnx_int_type,
    run_onnx,
)
from sdq_lightning.export.packed import (
    check_exportable,
    check_plan_matches,
    ideal_packed_bytes,
    load_packed,
    read_header,
    save_packed,
)
from sdq_lightning.export.report import capability_report, onnx_kernels, report_markdown, write_report

__all__ = [
    "DEFAULT_FORM",
    "DEFAULT_FORMATS",
    "DEFAULT_OPSET",
    "FORMATS",
    "LOWERINGS",
    "MIN_OPSET",
    "ONNX_FORMS",
    "ExportContext",
    "LoweringContext",
    "capability_report",
    "check_exportable",
    "check_plan_matches",
    "export_float_onnx",
    "export_from_checkpoint",
    "export_model",
    "export_onnx",
    "export_run",
    "get_export_format",
    "get_lowering",
    "ideal_packed_bytes",
    "load_packed",
    "load_run_model",
    "min_opset",
    "onnx_int_type",
    "onnx_kernels",
    "pack_bits",
    "packed_nbytes",
    "read_header",
    "register_export_format",
    "register_lowering",
    "report_markdown",
    "run_onnx",
    "save_packed",
    "unpack_bits",
    "unregister_export_format",
    "unregister_lowering",
    "write_report",
]
