"""Peer speed benchmark: our quantized ResNet20 training step against Brevitas at the same bits, and against FP.

Each arm is ResNet20 (10 classes) training on one batch of 128 CIFAR-10 images (forward, cross entropy, backward,
SGD step), CPU. Quantized arms put every Conv2d/Linear under a weight quantizer and an input-activation quantizer;
the first conv and the classifier at 8/8 bits in both libraries:

* ours: ``quantize_model(QuantSpec(weight_bits=(W,), activation_bits=A))`` - LSQ steps, per-tensor;
* Brevitas: ``brevitas.nn.QuantConv2d/QuantLinear(weight_bit_width=W, input_quant=Int8ActPerTensorFloat,
  input_bit_width=A)`` - its default per-tensor weight and activation quantizers;
* A = FP: no input quantizer in either library.

Our LSQ arithmetic runs with ``--kernels`` (default ``compile``: ``sdq_lightning.set_kernels("compile")``, the Hydra
app's default; ``eager`` for the plain eager ops). Brevitas runs as it ships (eager).

Arms run interleaved (round robin, order reversed every other round) in one process; each round times ``--steps``
steps after ``--warmup``; the table gives medians over rounds and the ratios ours/Brevitas and ours/FP.

    python benchmarks/bench_brevitas.py [--data-root PATH_TO_CIFAR10] [--rounds 5 --steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch import nn
from torch.nn import functional as F

import sdq_lightning as sq
from sdq_lightning.surgery import find_first_last


def brevitas_model(wbits: int, abits: int | None) -> nn.Module:
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat

    model = timm.create_model("resnet20", num_classes=10)
    first, last = find_first_last(model)
    for name, m in list(model.named_modules()):
        if type(m) not in (nn.Conv2d, nn.Linear):
            continue
        edge = name in (first, last)
        w, a = (8, 8) if edge else (wbits, abits)
        kw = dict(weight_bit_width=w, bias=m.bias is not None)
        if a is not None:
            kw.update(input_quant=Int8ActPerTensorFloat, input_bit_width=a)
        if isinstance(m, nn.Conv2d):
            new = qnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                                  groups=m.groups, **kw)
        else:
            new = qnn.QuantLinear(m.in_features, m.out_features, **kw)
        new.weight.data.copy_(m.weight.data)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def ours_model(wbits: int, abits: int | None) -> nn.Module:
    model = timm.create_model("resnet20", num_classes=10)
    sq.quantize_model(model, sq.QuantSpec(weight_bits=(wbits,), activation_bits=abits))
    return model


def load_batch(root: str | None, n: int = 128) -> tuple[torch.Tensor, torch.Tensor, str]:
    if root:
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.ToTensor(),
                                 transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
        ds = datasets.ImageFolder(f"{root}/train", transform=tf)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
        xs, ys = zip(*(ds[int(i)] for i in idx))
        return torch.stack(xs), torch.tensor(ys), "real CIFAR-10 images"
    return torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)), "random tensors (no --data-root)"


def time_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kernels", choices=sq.modules.fused.KERNELS, default="compile")
    args = parser.parse_args()
    sq.set_kernels(args.kernels)
    torch.manual_seed(0)
    x, y, what = load_batch(args.data_root)
    arms: dict[str, nn.Module] = {"FP": timm.create_model("resnet20", num_classes=10)}
    for w, a in ((4, 4), (2, None)):
        tag = f"W{w}/A{a or 'FP'}"
        arms[f"ours {tag}"] = ours_model(w, a)
        arms[f"brevitas {tag}"] = brevitas_model(w, a)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in arms.items()}
    for k, m in arms.items():
        m.train()
        time_steps(m, opts[k], x, y, args.warmup)
    results: dict[str, list[float]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(args.rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            results[k].append(time_steps(arms[k], opts[k], x, y, args.steps))
        print(f"round {r}: " + ", ".join(f"{k} {results[k][-1] * 1e3:.0f} ms" for k in names), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nResNet20 train step, batch 128, CPU threads {torch.get_num_threads()}, our kernels {args.kernels}, "
          f"{what}; median of {args.rounds} "
          f"interleaved rounds x {args.steps} steps")
    print("| arm | ms/step | ours / Brevitas | / FP |\n|---|---:|---:|---:|")
    print(f"| FP | {med['FP'] * 1e3:.1f} | | 1.00 |")
    for tag in ("W4/A4", "W2/AFP"):
        o, b = med[f"ours {tag}"], med[f"brevitas {tag}"]
        print(f"| ours {tag} | {o * 1e3:.1f} | {o / b:.2f} | {o / med['FP']:.2f} |")
        print(f"| Brevitas {tag} | {b * 1e3:.1f} | | {b / med['FP']:.2f} |")


if __name__ == "__main__":
    main()
