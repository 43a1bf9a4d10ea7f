"""``sdq-export RUN_DIR_OR_CKPT --out DIR [--formats packed,onnx,report] [--example-input-size 3,32,32]``."""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdq-export", description="Export an SDQ training run: bit-packed checkpoint, "
                                "QDQ ONNX model and capability report.")
    p.add_argument("source", help="run folder (plan.yaml, *.ckpt, .hydra/config.yaml) or a .ckpt inside one")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--formats", default="packed,onnx,report", help="comma-separated subset of packed,onnx,report")
    p.add_argument("--example-input-size", default=None, help="C,H,W of one input (default: the timm config's)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 25: int2/int4 types)")
    p.add_argument("--onnx-form", default=None, help="int8 (default: integer kernels in onnxruntime, exact) or qdq "
                   "(int2/int4/int8 QuantizeLinear/DequantizeLinear, the true bitwidths)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from sdq_lightning.export import DEFAULT_FORM, DEFAULT_OPSET, ONNX_FORMS, export_run

        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        size = None
        if args.example_input_size:
            try:
                size = tuple(int(v) for v in args.example_input_size.split(","))
            except ValueError:
                raise ValueError(f"--example-input-size must be C,H,W integers, got {args.example_input_size!r}")
        form = args.onnx_form or DEFAULT_FORM
        if form not in ONNX_FORMS:
            raise ValueError(f"--onnx-form must be one of {', '.join(ONNX_FORMS)}, got {form!r}")
        summary = export_run(args.source, args.out, size, formats=formats, opset=args.opset or DEFAULT_OPSET,
                             onnx_form=form)
    except (ValueError, FileNotFoundError) as err:
        print(f"sdq-export: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
