"""Peak memory of a searched network's training step: the batched weight pass against the per-layer quantizers
(``--ebr``: of EBR and its gradient on the frozen network, the one-pass form against the per-layer one).

The flat pass makes weight-sized temporaries; chunks of ``sdq_lightning.modules.batched.CHUNK`` elements bound them.
Each measurement is a fresh process (CPU): three forward + backward steps of the searched model (weights 1..8 bits, FP
activations, batch 8, 32x32 inputs), peak RSS (VmHWM, reset through ``/proc/self/clear_refs`` after a first step)
minus the RSS before them. RSS is coarse (allocator caching, glibc arenas), so the runs alternate between the two
forms and the medians are printed.

    python benchmarks/mem_batched.py [--model resnet18] [--repeats 5] [--chunk 0 (default CHUNK) | N] [--ebr]

With ``--ebr`` every quantized layer is frozen (bits 1, 2, 3, 4, 8 in turn) and a step is EBR plus its gradient;
the one-pass form is forced (``batched_max_weights`` lifted) so that it is measured whatever the model size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def child(model: str, batched: bool, chunk: int, ebr: bool = False) -> None:
    import timm
    import torch

    import sdq_lightning as sq
    from sdq_lightning.modules import batched as batched_mod

    torch.set_num_threads(2)
    if chunk:
        batched_mod.CHUNK = chunk
    torch.manual_seed(0)
    net = timm.create_model(model, num_classes=10)
    bits = (1, 2, 3, 4, 8) if ebr else tuple(range(1, 9))
    sq.quantize_model(net, sq.QuantSpec(weight_bits=bits, activation_bits=None))
    net.train()
    if ebr:
        from sdq_lightning.losses import EntropyBinRegularizer

        layers = [m for m in sq.quant_layers(net).values() if m.weight_quant is not None]
        for i, m in enumerate(layers):
            if not m.weight_quant.frozen:
                m.weight_quant.freeze(m.weight_quant.candidates[i % len(m.weight_quant.candidates)])
        reg = EntropyBinRegularizer()
        reg.batched_max_weights = 1 << 62  # the one-pass form at any size
        fn = reg if batched else reg.per_layer

        def step() -> None:
            torch.autograd.grad(fn(layers), [m.weight for m in layers])
    else:
        if batched:
            sq.batch_weights(net)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

        def step() -> None:
            for p in net.parameters():
                p.grad = None
            torch.nn.functional.cross_entropy(net(x), y).backward()

    def kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    step()
    Path("/proc/self/clear_refs").write_text("5")
    before = kib("VmRSS")
    for _ in range(3):
        step()
    weights = sum(m.weight.numel() for m in sq.quant_layers(net).values())
    print(json.dumps({"weights": weights, "peak_mib": (kib("VmHWM") - before) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=0, help="elements per chunk (0: the library's CHUNK)")
    ap.add_argument("--ebr", action="store_true", help="EBR + its gradient on the frozen network instead")
    ap.add_argument("--child", choices=("batched", "per-layer"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.child == "batched", args.chunk, args.ebr)
        return
    runs: dict[str, list[float]] = {"batched": [], "per-layer": []}
    weights = 0
    for _ in range(args.repeats):
        for form in runs:
            out = subprocess.run([sys.executable, __file__, "--child", form, "--model", args.model,
                                  "--chunk", str(args.chunk)] + ["--ebr"] * args.ebr, capture_output=True,
                                 text=True, check=True).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            weights = rec["weights"]
            runs[form].append(rec["peak_mib"])
    chunk = args.chunk or "CHUNK"
    what = "EBR + gradient, frozen" if args.ebr else f"training step, searched, chunk {chunk}"
    print(f"{args.model}, {weights:,} quantized weights, {what}, {args.repeats} runs each (MiB of peak RSS over 3 "
          f"steps)\n")
    print(f"| {'EBR' if args.ebr else 'weights'} | median | runs |")
    print("|---|---:|---|")
    for form, vals in runs.items():
        print(f"| {form} | {statistics.median(vals):.0f} | {', '.join(f'{v:.0f}' for v in vals)} |")


if __name__ == "__main__":
    main()
