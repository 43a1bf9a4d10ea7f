"""The exported ONNX model of an app run against the run's own PyTorch model, on the run's whole test split.

    python experiments/onnx_test_accuracy.py outputs/runs/<name>/<run> --onnx exported/model.onnx [--threads 2]

The run folder is what ``sdq-train`` wrote, the ONNX file what ``sdq-export <run>`` wrote from it. The test split is
rebuilt from the run's ``dataset`` config (same root, subset and seed, evaluation transform), so it is the split the
run's ``test/acc`` was measured on. Prints the top-1 of the PyTorch model (the checkpoint, rebuilt as ``sdq-export``
rebuilds it) and of onnxruntime, how many predictions agree and the largest logit difference, next to the run's
``metrics.json``. For a run trained in the integer-only mode the two models are one arithmetic, so agreement should
be 100 % and the logits identical.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder of sdq-train (checkpoints/last.ckpt, config.yaml)")
    ap.add_argument("--onnx", required=True, help="the model.onnx sdq-export wrote from that run")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    args = ap.parse_args()
    import onnxruntime as ort

    from sdq_lightning.export.api import load_run_model
    from sdq_lightning.utils.instantiate import build_datamodule

    run, onnx_path = Path(args.run), Path(args.onnx)
    for path, what in ((run / "config.yaml", "the run's config.yaml"), (onnx_path, "--onnx")):
        if not path.is_file():
            raise SystemExit(f"error: {what} not found: {path}")
    net, plan, _ = load_run_model(run)
    net.eval()
    data = build_datamodule(OmegaConf.load(run / "config.yaml"))
    data.setup("test")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    n = right_pt = right_ort = agree = 0
    max_diff = 0.0
    with torch.inference_mode():
        for x, y in data.test_dataloader():
            pt = net(x).float().numpy()
            ox = sess.run(None, {name: x.numpy()})[0]
            n += len(y)
            right_pt += int((pt.argmax(1) == y.numpy()).sum())
            right_ort += int((ox.argmax(1) == y.numpy()).sum())
            agree += int((pt.argmax(1) == ox.argmax(1)).sum())
            max_diff = max(max_diff, float(np.abs(pt - ox).max()))
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    print(f"run: {run.parent.name}/{run.name}, plan avg bits {plan.average_bits:.3f}, {n} test images")
    print(f"metrics.json test/acc: {100 * metrics['test/acc']:.2f} %" if "test/acc" in metrics else
          "metrics.json: no test/acc")
    print(f"PyTorch top-1: {100 * right_pt / n:.2f} %")
    print(f"onnxruntime top-1: {100 * right_ort / n:.2f} % ({args.threads} threads)")
    print(f"top-1 agreement: {agree}/{n} ({100 * agree / n:.2f} %), largest logit difference {max_diff:.3g}")


if __name__ == "__main__":
    main()
