"""Figures of docs/RESULTS.md (issues 12 and 10, export): for every candidate set a preset uses, a tiny app run on
digits, exported with ``export_run`` (= sdq-export), the ONNX model and the packed checkpoint checked against the
reloaded PyTorch network on the WHOLE digits test split (450 real images).

    PYTHONPATH=src:tests/export python tests/export/export_figures.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from sdq_lightning.utils.instantiate import build_datamodule

from export_helpers import APP_TINY, compose_app
from sdq_lightning.cli.train import run
from sdq_lightning.export import export_run, ideal_packed_bytes, load_packed, load_run_model, run_onnx
from test_app_export import CASES


def main() -> None:
    print("| candidates | plan bits (conv1, conv2, conv3, fc) | A bits | export s | packed B | ideal B | FP32 B | "
          "ONNX top-1 agree | ONNX max abs diff | packed == PyTorch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for case, overrides in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_app([*APP_TINY, *overrides])
            run(cfg, Path(tmp) / "run")
            t0 = time.perf_counter()
            summary = export_run(Path(tmp) / "run", Path(tmp) / "out")
            seconds = time.perf_counter() - t0
            net, plan, _ = load_run_model(Path(tmp) / "run")
            dm = build_datamodule(cfg)
            dm.setup("test")
            x = torch.cat([b[0] for b in dm.test_dataloader()])
            with torch.no_grad():
                ref = net(x)
                packed = load_packed(Path(tmp) / "out" / "model.sdqpack")(x)
            got = torch.from_numpy(run_onnx(Path(tmp) / "out" / "model.onnx", x))
            agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
            fp32 = sum(t.numel() * 4 for k, t in net.state_dict().items() if "_quant." not in k)
            bits = ", ".join(str(plan[n]) for n in plan)
            abits = sorted({lb.a_bits for lb in plan.layers.values()}, key=str)
            print(f"| {case} | {bits} | {abits} | {seconds:.1f} | {summary['packed_bytes']:,} | "
                  f"{ideal_packed_bytes(net):,.0f} | {fp32:,} | {agree * 100:.2f} % ({len(x)} images) | "
                  f"{float((got - ref).abs().max()):.2e} | {torch.equal(packed, ref)} |")


if __name__ == "__main__":
    main()
