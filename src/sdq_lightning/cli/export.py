"""``sdq-export RUN_DIR_OR_CKPT --out DIR [--formats packed,onnx,report] [--example-input-size C,H,W] [--opset N]``.

Bad arguments print ONE ``sdq-export: error: ...`` line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from sdq_lightning.cli import OneLineParser
from sdq_lightning.export.api import MIN_OPSET
from sdq_lightning.export.formats import DEFAULT_FORMATS, export_format_help
from sdq_lightning.export.onnx_export import DEFAULT_OPSET


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sdq-export", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Export an SDQ training run of the app (or a checkpoint inside one): bit-packed "
                            "checkpoint, ONNX model (default form int8: the trained integer codes in int8/uint8, "
                            "run with ConvInteger/MatMulInteger in onnxruntime; --onnx-form qdq: "
                            "QuantizeLinear/DequantizeLinear at the true bitwidths) checked in onnxruntime, and "
                            "capability report, plus plan.yaml and export.json. A checkpoint of your own "
                            "LightningModule: sdq_lightning.load_quantized and sdq_lightning.export.export_model "
                            "(docs/export.md).",
                epilog=f"formats: {export_format_help()}\n\nExample: sdq-export outputs/runs/digits_demo/<run> "
                       f"--out exported/")
    p.add_argument("source", help="run folder written by sdq-train (checkpoints/last.ckpt, config.yaml, plan.yaml; "
                                  "also its fp/ and uniform/ sub-runs) or a .ckpt inside one")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help="comma-separated registered formats (default: %(default)s)")
    p.add_argument("--example-input-size", default=None, metavar="C,H,W",
                   help="shape of one input (default: the run's dataset.image_size and the first conv's channels)")
    p.add_argument("--onnx-form", default=None, metavar="FORM",
                   help="int8 (default: exact integer kernels in onnxruntime, ConvInteger/MatMulInteger) or qdq "
                        "(QuantizeLinear/DequantizeLinear at the true bitwidths, int2/int4); a model trained "
                        "integer-only: integer_only (default) or integer_only_qdq (the same graph for QDQ readers)")
    p.add_argument("--opset", default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset (default: %(default)s; minimum {MIN_OPSET}. 1..2-bit values are stored as int2 "
                        f"from opset 25, 3..4-bit values as int4 from opset 21, else in the next wider type)")
    return p


def _parse_size(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if not size or any(v < 1 for v in size):
        raise ValueError(f"--example-input-size must be positive integers C,H,W such as 3,32,32, got {text!r}")
    return size


def _parse_opset(text: str | int) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--opset must be an integer >= {MIN_OPSET} (default {DEFAULT_OPSET}), got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from sdq_lightning.export import export_run

        size, opset = _parse_size(args.example_input_size), _parse_opset(args.opset)
        from sdq_lightning.export import ONNX_FORMS

        if args.onnx_form is not None and args.onnx_form not in ONNX_FORMS:
            raise ValueError(f"--onnx-form must be one of {', '.join(ONNX_FORMS)}, got {args.onnx_form!r}")
        options = {"onnx_form": args.onnx_form} if args.onnx_form else None
        summary = export_run(args.source, args.out, size, formats=args.formats, opset=opset, options=options)
    except (ValueError, FileNotFoundError) as err:
        text = str(err).strip() or type(err).__name__
        msg = text.splitlines()[0]
        msg = msg.replace("example input of shape", "--example-input-size: input of shape") \
            if args.example_input_size else msg
        msg = re.sub(r"^opset must be", "--opset must be", msg)
        print(f"sdq-export: error: {msg}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
