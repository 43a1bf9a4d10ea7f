"""Outputs and gradients of every LSQ code path, for a fixed seed: run it before and after a change of the LSQ
arithmetic and compare (exact equality, and the same bits, signs of zero included).

Paths: the functional fake quantizers (``quantize_weight``, ``lsq_quantize`` on signed and unsigned ranges,
``fake_quantize_dynamic``), the fused activation kernels (``lsq_act_quantize``, ``quant_conv2d``, ``quant_linear``;
float32 and bfloat16, eager and compiled kernels), the batched weight pass (``segment_quantize`` alone, and
``BatchedWeights`` on a searched and a frozen ResNet20), EBR (``bin_regularization``, the one-pass and per-layer
regularizer), the SDQ quantizer (frozen, progressive and cascade forwards, ``integer_weight``) and the integer-only
weight codes. Bits 1..8, per-tensor and per-channel steps; inputs include exact rounding ties, zeros of both signs and
values beyond the range.

    python benchmarks/lsq_identity.py save /tmp/lsq_before.pt
    python benchmarks/lsq_identity.py compare /tmp/lsq_before.pt   # exit status 1 unless every tensor is equal
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

import sdq_lightning as sq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.quantized import scatter_levels  # noqa: E402 - the tests' searched-model setup
from sdq_lightning.integer.network import _weight_codes
from sdq_lightning.losses import EntropyBinRegularizer, bin_regularization
from sdq_lightning.modules import QuantConv2d, batch_weights, get_kernels, set_kernels
from sdq_lightning.modules.batched import segment_index, segment_quantize
from sdq_lightning.modules.fused import lsq_act_quantize, quant_conv2d, quant_linear
from sdq_lightning.quantizers import SDQWeightQuantizer
from sdq_lightning.quantizers.functional import (
    fake_quantize_dynamic,
    int_range,
    lsq_grad_factor,
    lsq_quantize,
    quantize_weight,
    weight_step_init,
)

BITS = range(1, 9)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(shape: tuple[int, ...], seed: int) -> Tensor:
    """Gaussian weights with a tail beyond any range, exact zeros of both signs."""
    w = torch.randn(shape, generator=_gen(seed)) * 0.1
    flat = w.view(-1)
    flat[:4] = torch.tensor([0.0, -0.0, 3.0, -3.0])
    return w


def _ties(w: Tensor, step: Tensor, per_channel: bool) -> Tensor:
    """``w`` with some entries at exact half-integer multiples of the step (rounding ties of ``w * (1/s)``)."""
    w = w.clone()
    s = step.view(-1)[0] if per_channel else step
    k = torch.arange(-9, 9, dtype=w.dtype) + 0.5
    w.view(-1)[4:4 + k.numel()] = k * s
    return w


def _grads(out: Tensor, leaves: list[Tensor], seed: int) -> list[Tensor]:
    gy = torch.randn(out.shape, generator=_gen(seed)).to(out.dtype)
    return list(torch.autograd.grad((out * gy).float().sum(), leaves, allow_unused=True))


def _record(res: dict, name: str, out: Tensor, leaves: dict[str, Tensor], seed: int = 1) -> None:
    res[f"{name}/out"] = out.detach().clone()
    if out.requires_grad:
        for (k, _), g in zip(leaves.items(), _grads(out, list(leaves.values()), seed)):
            if g is not None:
                res[f"{name}/grad_{k}"] = g


def functional(res: dict) -> None:
    for pc in (False, True):
        w0 = _weight((16, 8, 3, 3), 10)
        for b in BITS:
            tag = f"functional/pc{int(pc)}/b{b}"
            s0 = weight_step_init(w0, b, pc)
            w = _ties(w0, s0, pc).requires_grad_()
            s = s0.clone().requires_grad_()
            sv = s.view(-1, 1, 1, 1) if pc else s
            g = lsq_grad_factor(w[0].numel() if pc else w.numel(), max(int_range(b, True)[1], 1))
            _record(res, f"{tag}/quantize_weight", quantize_weight(w, sv, b, g), {"w": w, "s": s})
            qn, qp = int_range(b, signed=True)
            binary = torch.tensor(b == 1)
            dyn = fake_quantize_dynamic(w, sv, torch.tensor(float(qn)), torch.tensor(float(qp)), torch.tensor(g),
                                        binary)
            _record(res, f"{tag}/dynamic", dyn, {"w": w, "s": s})
            qn, qp = int_range(b, signed=False)  # an activation-like unsigned range, inputs of both signs
            _record(res, f"{tag}/unsigned", lsq_quantize(w, sv, qn, qp, g), {"w": w, "s": s})


def _act_range(b: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if signed else (0, 2**b - 1)


def fused(res: dict, kernels: str) -> None:
    set_kernels(kernels)
    try:
        for b in BITS:
            for signed in (False, True):
                qn, qp = _act_range(b, signed)
                tag = f"fused-{kernels}/b{b}/{'signed' if signed else 'unsigned'}"
                x0 = torch.randn(4, 8, 9, 9, generator=_gen(20 + b))
                x0.view(-1)[:2] = torch.tensor([0.0, -0.0])
                s = torch.tensor(float(x0.abs().mean()) * 2 / max(qp, 1)**0.5, requires_grad=True)
                x0.view(-1)[2:20] = (torch.arange(-9, 9) + 0.5) * s.detach()
                g = lsq_grad_factor(x0[0].numel(), qp)
                w = torch.randn(16, 8, 3, 3, generator=_gen(30 + b), requires_grad=True)
                bias = torch.randn(16, generator=_gen(40 + b), requires_grad=True)
                wl = torch.randn(5, 9, generator=_gen(50 + b), requires_grad=True)
                for dtype in (torch.float32, torch.bfloat16):
                    x = x0.to(dtype).requires_grad_()
                    d = str(dtype).split(".")[1]
                    _record(res, f"{tag}/{d}/act", lsq_act_quantize(x, s, qn, qp, g), {"x": x, "s": s})
                x = x0.clone().requires_grad_()
                for autocast in (False, True):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        y = quant_conv2d(x, s, w, bias, qn, qp, g, (2, 2), (1, 1), (1, 1), 1)
                        yl = quant_linear(x, s, wl, bias[:5], qn, qp, g)
                    _record(res, f"{tag}/conv-autocast{int(autocast)}", y, {"x": x, "s": s, "w": w, "b": bias})
                    _record(res, f"{tag}/linear-autocast{int(autocast)}", yl, {"x": x, "s": s, "w": wl, "b": bias})
        if get_kernels() != kernels:
            raise RuntimeError(f"the {kernels} kernels fell back to {get_kernels()}")
    finally:
        set_kernels("eager")


def _tables(bits: list[int], numels: list[int], dtype=torch.float32) -> Tensor:
    """``[segments, 4]`` rows (Qn, Qp, 1-bit flag, LSQ gradient factor), as ``_Group`` builds them."""
    rows = []
    for b, n in zip(bits, numels):
        qn, qp = int_range(b, signed=True)
        rows.append([qn, qp, float(b == 1), lsq_grad_factor(n, qp)])
    return torch.tensor(rows, dtype=dtype)


def segments(res: dict) -> None:
    layers = [nn.Conv2d(8, 16, 3), nn.Conv2d(16, 4, 1), nn.Linear(12, 6)]
    for pc in (False, True):
        for m, seed in zip(layers, (60, 61, 62)):
            m.weight = nn.Parameter(_weight(tuple(m.weight.shape), seed))
            m.weight_quant = SDQWeightQuantizer((1, 2, 3, 4, 5, 6, 7, 8), weight=m.weight, per_channel=pc)
        seg, seg_layer = segment_index(layers)
        w0 = torch.cat([m.weight.detach().reshape(-1) for m in layers])
        n_seg = seg_layer.numel()
        numel = [m.weight.numel() // (m.weight.shape[0] if pc else 1) for m in layers]
        seg_numel = [numel[i] for i in seg_layer.tolist()]
        mixes = {f"b{b}": ([b] * 3, [max(b - 1, 1)] * 3) for b in BITS}
        mixes["spread"] = ([1, 4, 8], [1, 3, 7])
        mixes["spread2"] = ([2, 1, 6], [1, 1, 5])
        for name, (hi, lo) in mixes.items():
            tag = f"segment/pc{int(pc)}/{name}"
            seg_hi = [hi[i] for i in seg_layer.tolist()]
            seg_lo = [lo[i] for i in seg_layer.tolist()]
            t_hi, t_lo = _tables(seg_hi, seg_numel), _tables(seg_lo, seg_numel)
            s_hi0 = torch.cat([weight_step_init(m.weight, b, pc).reshape(-1) for m, b in zip(layers, hi)])
            s_lo0 = torch.cat([weight_step_init(m.weight, b, pc).reshape(-1) for m, b in zip(layers, lo)])
            w = w0.clone().requires_grad_()
            s_hi, s_lo = s_hi0.clone().requires_grad_(), s_lo0.clone().requires_grad_()
            one_bit = [b == 1 for b in seg_hi]
            for has in (True, False, "all"):
                if (has is False and any(one_bit)) or (has == "all" and not all(one_bit)):
                    continue
                _record(res, f"{tag}/hi-{has}", segment_quantize(w, seg, s_hi, t_hi, has_binary=has),
                        {"w": w, "s_hi": s_hi})
            has = any(one_bit) or any(b == 1 for b in seg_lo)
            mask = torch.rand(n_seg, generator=_gen(70)).requires_grad_()
            _record(res, f"{tag}/soft", segment_quantize(w, seg, s_hi, t_hi, s_lo, t_lo, mask, False, has),
                    {"w": w, "s_hi": s_hi, "s_lo": s_lo, "mask": mask})
            _record(res, f"{tag}/hard", segment_quantize(w, seg, s_hi, t_hi, s_lo, t_lo, mask.detach().round(),
                                                         True, has), {"w": w, "s_hi": s_hi, "s_lo": s_lo})


def _resnet(per_channel: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("resnet20", num_classes=10)
    sq.quantize_model(model, sq.QuantSpec(weight_bits=tuple(BITS), activation_bits=4, per_channel=per_channel,
                                          seed=3))
    model.train()
    return scatter_levels(model, seed + 1)


def _net_step(res: dict, tag: str, net: nn.Module, x: Tensor) -> None:
    for p in net.parameters():
        p.grad = None
    out = net(x)
    out.square().mean().backward()
    res[f"{tag}/out"] = out.detach().clone()
    for n, p in net.named_parameters():
        if p.grad is not None:
            res[f"{tag}/grad/{n}"] = p.grad.clone()


def networks(res: dict) -> None:
    x = torch.randn(4, 3, 32, 32, generator=_gen(80))
    for pc in (False, True):
        for batched in (False, True):
            net = _resnet(pc)
            batch_weights(net, enabled=batched)
            tag = f"resnet/pc{int(pc)}/batched{int(batched)}"
            _net_step(res, f"{tag}/search-train", net, x)
            net.eval()
            with torch.no_grad():
                res[f"{tag}/search-eval/out"] = net(x)
            net.train()
            qs = [m for m in net.modules() if isinstance(m, SDQWeightQuantizer)]
            for i, q in enumerate(qs):
                q.freeze(q.candidates[i % len(q.candidates)])
            _net_step(res, f"{tag}/frozen-train", net, x)
            layers = [m for m in net.modules() if getattr(m, "weight_quant", None) is not None]
            reg = EntropyBinRegularizer("inv_bits", entropy_weight=0.5)
            for form in ("one_pass", "per_layer"):
                loss = reg(layers) if form == "one_pass" else reg.per_layer(layers)
                ws = [m.weight for m in layers]
                res[f"{tag}/ebr-{form}/loss"] = loss.detach().clone()
                for li, gw in enumerate(torch.autograd.grad(loss, ws)):
                    res[f"{tag}/ebr-{form}/grad/{li}"] = gw
            for li, m in enumerate(layers):
                codes, step, bits = m.weight_quant.integer_weight(m.weight)
                res[f"{tag}/integer_weight/{li}/codes"] = codes
                res[f"{tag}/integer_weight/{li}/step"] = step


def ebr(res: dict) -> None:
    for pc in (False, True):
        w0 = _weight((16, 8, 3, 3), 90)
        for b in BITS:
            s = weight_step_init(w0, b, pc)
            w = _ties(w0, s, pc).requires_grad_()
            loss, occ = bin_regularization(w, s, b)
            tag = f"ebr/pc{int(pc)}/b{b}"
            res[f"{tag}/loss"], res[f"{tag}/occupancy"] = loss.detach(), occ
            res[f"{tag}/grad_w"] = torch.autograd.grad(loss, w)[0]


def sdq(res: dict) -> None:
    for pc in (False, True):
        w0 = _weight((16, 8, 3, 3), 100)
        for b in BITS:
            tag = f"sdq/pc{int(pc)}/b{b}"
            q = SDQWeightQuantizer(tuple(BITS), weight=w0, per_channel=pc, seed=5, layer_id=b)
            w = _ties(w0, q.steps[b - 1].detach(), pc).requires_grad_()
            q.train()
            q.set_level(b - 1, reinit_dbp=0.6)
            q.set_draw_step(3)
            _record(res, f"{tag}/progressive", q(w), {"w": w, "steps": q.steps, "dbp": q.dbp})
            q.eval()
            _record(res, f"{tag}/progressive-eval", q(w), {"w": w, "steps": q.steps})
            q.train()
            q.freeze(b)
            _record(res, f"{tag}/frozen", q(w), {"w": w, "steps": q.steps})
            codes, step, _ = q.integer_weight(w)
            res[f"{tag}/integer_weight/codes"], res[f"{tag}/integer_weight/step"] = codes, step
            layer = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, bias=False), q)
            layer.weight = nn.Parameter(w.detach().clone())
            wf = layer.weight.float()
            codes_ste, exact, s_w = _weight_codes(layer, wf, True)
            res[f"{tag}/integer_codes/exact"] = exact
            _record(res, f"{tag}/integer_codes", codes_ste * s_w.view(-1, 1, 1, 1),
                    {"w": layer.weight, "steps": q.steps})
        q = SDQWeightQuantizer((1, 2, 4, 8), reading="cascade", estimator="ste", weight=w0, per_channel=pc)
        q.train()
        q.set_draw_step(7)
        w = w0.clone().requires_grad_()
        _record(res, f"sdq/pc{int(pc)}/cascade", q(w), {"w": w, "steps": q.steps, "dbp": q.dbp})


def run() -> dict[str, Tensor]:
    torch.set_num_threads(1)
    res: dict[str, Tensor] = {}
    functional(res)
    fused(res, "eager")
    fused(res, "compile")
    segments(res)
    ebr(res)
    sdq(res)
    networks(res)
    return res


def _bits(t: Tensor) -> Tensor:
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def compare(before: dict[str, Tensor], after: dict[str, Tensor]) -> bool:
    ok = before.keys() == after.keys()
    if not ok:
        print("keys differ:", sorted(before.keys() ^ after.keys())[:20])
    groups: dict[str, list[int]] = {}
    for k in sorted(before.keys() & after.keys()):
        a, b = before[k], after[k]
        equal = a.dtype == b.dtype and torch.equal(a, b)
        same_bits = equal and torch.equal(_bits(a), _bits(b))
        path = "/".join(k.split("/")[:2] if not k.startswith("fused") else k.split("/")[:1])
        n = groups.setdefault(path, [0, 0, 0])
        n[0] += 1
        n[1] += equal
        n[2] += same_bits
        if not same_bits:
            ok = False
            what = "bits differ (equal values: signs of zero)" if equal else \
                f"values differ (max |diff| {float((a.double() - b.double()).abs().max()):.3g})"
            print(f"  {k}: {what}")
    for path, (n, eq, same) in groups.items():
        print(f"{path:28s} {n:4d} tensors, torch.equal {eq}/{n}, same bits {same}/{n}")
    return ok


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "compare"):
        sys.exit(__doc__)
    res = run()
    if sys.argv[1] == "save":
        torch.save(res, sys.argv[2])
        print(f"{len(res)} tensors saved to {sys.argv[2]}")
        return
    ok = compare(torch.load(sys.argv[2]), res)
    print("identical" if ok else "DIFFERENT")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
