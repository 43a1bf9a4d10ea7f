"""How far the oracle's ranking of one-level drops depends on the context it is measured in.

    python experiments/oracle_context.py --data <cifar10 root> [--checkpoint checkpoints/resnet20_cifar10_fp.pt]
        [--oracle outputs/fixed_plan/plans/oracle.json] [--batches 4] [--out context.json]

The oracle (``sdq-plan --method oracle``) quantizes one layer alone, every other layer in floating point, BatchNorm in
eval mode. A search decides its drops in another context. Printed, as Spearman correlations over the searched layers
against the oracle file's one-level drops (the same held-out batches as sdq-plan, a seeded random order):

* ``train-mode BN``: the same finite differences with BatchNorm on batch statistics (what a train-mode probe sees);
* ``others at b bits``: the drop b -> b-1 of each layer while every other searched layer is at b bits (the oracle's
  quantizer, eval mode), for b = 4, 3 and 2, with the split-half Spearman of those drops (even against odd batches).

``--weights-from RUN`` measures at a search's weights instead of the checkpoint's: the latent weights and BatchNorm
statistics of the run's ``checkpoints/last.ckpt`` (a search adapts its weights to the widths it trains at; the oracle
quantizes the FP weights). The in-context drops only (no train-mode line).

``--out`` writes the in-context drops as a sensitivity file (``{layer: {bits: loss_increase}}``, read by
``experiments/sensitivity_agreement.py``): S(4) = 0 and S(b-1) = S(b) + the drop b -> b-1 measured with the others at
b bits, so every one-level drop in the file is the in-context one, the context a search near that level decides in.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sdq_lightning.cli.plan import _batches, _model, _parser
from sdq_lightning.planning import PlanProblem, Sensitivity, spearman
from sdq_lightning.planning.sensitivity import quantize_alone, weight_step
from sdq_lightning.quantizers.functional import quantize_weight


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint", default="checkpoints/resnet20_cifar10_fp.pt")
    p.add_argument("--oracle", default="outputs/fixed_plan/plans/oracle.json")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--out", default=None, help="write the in-context one-level drops here (JSON)")
    p.add_argument("--weights-from", default=None, help="a search run folder: measure at its weights")
    p.add_argument("--own-steps", action="store_true", help="with --weights-from: the run's learned step per width")
    p.add_argument("--train-bn", action="store_true",
                   help="the in-context drops with BatchNorm on batch statistics (default: eval mode)")
    a = p.parse_args()
    if a.own_steps and not a.weights_from:
        p.error("--own-steps needs --weights-from RUN (the run whose learned steps to use)")
    args = _parser().parse_args(["--checkpoint", a.checkpoint, "--model", "resnet20", "--data", a.data,
                                 "--dataset", "imagefolder", "--method", "oracle", "--budget", "avg_bits=2.0",
                                 "--batches", str(a.batches), "--out", "unused.yaml"])
    model, in_chans = _model(args)
    steps = {}
    if a.weights_from:
        ckpt = torch.load(f"{a.weights_from}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items()
                 if k.startswith("model.") and "_quant." not in k}
        model.load_state_dict(state)  # strict: every FP weight and statistic, nothing else
        steps = {k[len("model."):-len(".weight_quant.steps")]: v for k, v in ckpt["state_dict"].items()
                 if k.endswith(".weight_quant.steps")}
    batches = _batches(args)
    problem = PlanProblem.from_model(model, torch.zeros(1, in_chans, 32, 32), tuple(range(1, 9)), None, "8bit")
    oracle = Sensitivity.from_json(a.oracle, "oracle")
    modules = dict(model.named_modules())
    names = problem.names
    original = {n: modules[n].weight.detach().clone() for n in names}
    if not a.own_steps:
        quantized = {(n, b): quantize_alone(original[n], b) for n in names for b in (1, 2, 3, 4)}
    else:
        missing = [n for n in names if n not in steps or steps[n].dim() != 1 or len(steps[n]) != 8]
        if missing:
            raise SystemExit(f"error: --own-steps needs one per-tensor step per width 1..8; layer {missing[0]} has "
                             f"{tuple(steps[missing[0]].shape) if missing[0] in steps else 'none'}")
        for b in (1, 2, 3, 4):
            ratio = sorted(float(steps[n][b - 1] / weight_step(original[n], b)) for n in names)
            print(f"{b}-bit: the run's step / the MSE step at its weights: median {ratio[len(ratio) // 2]:.2f}, "
                  f"range {ratio[0]:.2f}-{ratio[-1]:.2f}")
        quantized = {(n, b): quantize_weight(original[n], steps[n][b - 1].to(original[n].dtype), b)
                     for n in names for b in (1, 2, 3, 4)}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    torch.set_grad_enabled(False)

    def losses(train: bool) -> torch.Tensor:
        model.train(train)
        saved = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
        out = torch.tensor([float(F.cross_entropy(model(x).float(), y)) for x, y in batches], dtype=torch.float64)
        for m, (mean, var) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        return out

    def loss(train: bool) -> float:
        return float(losses(train).mean())

    def set_all(bits: int | None) -> None:
        for n in names:
            modules[n].weight.copy_(original[n] if bits is None else quantized[(n, bits)])

    if not a.weights_from:  # train-mode BatchNorm, every other layer FP (the FP checkpoint's question only)
        set_all(None)
        base = loss(True)
        values = {}
        for n in names:
            values[n] = {}
            for b in (1, 2, 3, 4):
                modules[n].weight.copy_(quantized[(n, b)])
                values[n][b] = loss(True) - base
            modules[n].weight.copy_(original[n])
        agree = oracle.agreement(Sensitivity(values, "train_bn"), [(2, 1), (3, 2), (4, 3)])
        print("train-mode BN, others FP: " + ", ".join(f"{k} {v:.3f}" for k, v in agree.items()))
    # the others at b bits, eval mode
    drops, halves = {}, ({}, {})
    mode = "train-mode BN" if a.train_bn else "eval"
    for b in (4, 3, 2):
        set_all(b)
        base = losses(a.train_bn)
        for n in names:
            modules[n].weight.copy_(quantized[(n, b - 1)])
            d = losses(a.train_bn) - base
            drops[(n, b, b - 1)] = float(d.mean())
            halves[0][(n, b, b - 1)], halves[1][(n, b, b - 1)] = float(d[0::2].mean()), float(d[1::2].mean())
            modules[n].weight.copy_(quantized[(n, b)])
        level = {k: v for k, v in drops.items() if k[1] == b}
        r = spearman(oracle.increments([(b, b - 1)]), level)
        split = spearman(*({k: v for k, v in h.items() if k[1] == b} for h in halves)) if len(batches) > 1 else None
        print(f"others at {b} bits ({mode}), drop {b}->{b - 1}: Spearman {r:.3f} against the FP-context oracle "
              f"(loss with every searched layer at {b} bits: {float(base.mean()):.3f}"
              + (f"; split-half {split:.3f})" if split is not None else ")"))
    set_all(None)
    if a.out:
        values = {n: {4: 0.0} for n in names}
        for n in names:
            for b in (4, 3, 2):
                values[n][b - 1] = values[n][b] + drops[(n, b, b - 1)]
        print(f"wrote {Sensitivity(values, 'oracle_in_context').to_json(a.out)}")


if __name__ == "__main__":
    main()
