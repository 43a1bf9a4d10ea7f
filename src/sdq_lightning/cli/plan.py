"""``sdq-plan``: a bit plan without a search, from a trained floating-point model.

    sdq-plan --checkpoint checkpoints/resnet20_cifar10_fp.pt --model resnet20 --data /path/to/cifar10 \\
        --method hawq --budget avg_bits=2.0 --out plan.yaml --sensitivities sens.json

Methods: ``oracle`` (finite differences on held-out batches) and ``hawq`` (Hessian trace times quantization error)
measure sensitivities and solve the exact plan under the budget; ``search`` reads what an SDQ search measured
(``--run``, a run folder or checkpoint) and solves the same way; ``file`` plans from ``--from-sensitivities``
without measuring; the controls ``random`` (uniform over the plans within 1 % under the target), ``size_greedy``
and ``uniform`` need no data. The plan applies with ``sdq-train phase=train phase.plan=plan.yaml`` or
``SDQ(plan="plan.yaml")``. Held-out batches come from the training images (``--val-size``, the same split as the
app's ``dataset.val_size``), never the test set.

Bad arguments print one ``sdq-plan: error: ...`` line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from sdq_lightning.cli import OneLineParser

METHODS = ("oracle", "hawq", "search", "file", "random", "size_greedy", "uniform")
MEASURED = ("oracle", "hawq")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sdq-plan", formatter_class=argparse.RawDescriptionHelpFormatter,
                description=__doc__.split("\n\n")[0].strip(),
                epilog="Example: sdq-plan --checkpoint checkpoints/resnet20_cifar10_fp.pt --model resnet20 "
                       "--data /path/to/cifar10 --method hawq --budget avg_bits=2.0 --out plan.yaml "
                       "--sensitivities sens.json")
    p.add_argument("--method", required=True, choices=METHODS, help="how the plan is made (see above)")
    p.add_argument("--budget", required=True, metavar="METRIC=TARGET",
                   help="avg_bits=2.0, size=<bytes> or bitops=<per sample>; the plan never exceeds it")
    p.add_argument("--out", required=True, help="plan file to write (.yaml, .yml or .json); never overwritten "
                                                "unless --force")
    p.add_argument("--checkpoint", help="trained FP weights: a state dict (.pt) or a Lightning .ckpt")
    p.add_argument("--model", default="resnet20", help="timm model name (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the model (default: %(default)s)")
    p.add_argument("--data", help="CIFAR-10 root (binary release or ImageFolder tree), an ImageFolder root with "
                                  "--dataset imagefolder, or 'digits'")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "imagefolder", "digits"),
                   help="how --data is read (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="input side (default: %(default)s)")
    p.add_argument("--val-size", type=int, default=5000,
                   help="training images held out for the measurements (default: %(default)s; 0 reads the test "
                        "split, which a fair comparison must not use)")
    p.add_argument("--batches", type=int, default=10, help="held-out batches measured (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--weight-bits", default="1,2,3,4,5,6,7,8", help="candidate bits (default: %(default)s)")
    p.add_argument("--activation-bits", type=int, default=None,
                   help="activation bits of the searched layers, for the bitops cost only (default: FP)")
    p.add_argument("--first-last", default="8bit", choices=("8bit", "fp", "search"),
                   help="policy for the first conv and the classifier, as SDQ's first_last (default: %(default)s)")
    p.add_argument("--step", default="mse", choices=("mse", "lsq_init"),
                   help="weight step at each width when measuring (default: %(default)s)")
    p.add_argument("--probes", type=int, default=64, help="Hutchinson probes for hawq (default: %(default)s)")
    p.add_argument("--run", help="method search: an sdq-train run folder or a .ckpt written during/after its search")
    p.add_argument("--from-sensitivities", help="method file: a JSON {layer: {bits: loss_increase}}")
    p.add_argument("--sensitivities", help="also write the sensitivities used as JSON {layer: {bits: loss_increase}}")
    p.add_argument("--uniform-bits", type=int, default=None,
                   help="method uniform: this width (any cost; default: the highest that fits)")
    p.add_argument("--seed", type=int, default=0, help="random / size_greedy draws, hawq probes (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device for the measurements (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite --out / --sensitivities if they exist")
    return p


def _parse_budget(text: str):
    from sdq_lightning.budget import Budget

    metric, sep, value = text.partition("=")
    try:
        target = float(value)
    except ValueError:
        target = None
    if not sep or target is None:
        raise ValueError(f"--budget must look like avg_bits=2.0 (metric=target), got {text!r}")
    return Budget(metric.strip(), target)


def _parse_bits(text: str) -> tuple[int, ...]:
    from sdq_lightning.quantizers import validate_candidates

    try:
        bits = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--weight-bits must be comma-separated integers such as 1,2,3,4, got {text!r}") from None
    return validate_candidates(bits, "--weight-bits")


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be refused before a model or data is touched."""
    for key in ("out", "sensitivities"):
        path = getattr(args, key)
        if path and Path(path).exists() and not args.force:
            raise ValueError(f"--{key} {path} exists; pick another path or pass --force to overwrite it")
    if Path(args.out).suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ValueError(f"--out must end in .yaml, .yml or .json, got {args.out!r}")
    if args.method in MEASURED and not args.checkpoint:
        raise ValueError(f"--method {args.method} measures a trained model: pass --checkpoint")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint file not found: {args.checkpoint}")
    if args.method in MEASURED and not args.data:
        raise ValueError(f"--method {args.method} measures on held-out data: pass --data (a CIFAR-10 root, an "
                         "ImageFolder root with --dataset imagefolder, or 'digits')")
    if args.method == "search" and not args.run:
        raise ValueError("--method search reads a run's measurements: pass --run <run folder or .ckpt>")
    if args.method == "file" and not args.from_sensitivities:
        raise ValueError("--method file plans from measured sensitivities: pass --from-sensitivities <json>")
    for key in ("batches", "batch_size", "probes"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.val_size < 0:
        raise ValueError(f"--val-size must be >= 0, got {args.val_size}")


def _model(args: argparse.Namespace):
    import timm

    import sdq_lightning  # noqa: F401 - registers resnet20 & co. in timm

    if not timm.is_model(args.model):
        raise ValueError(f"unknown --model {args.model!r}: not in timm's registry (see timm.list_models())")
    in_chans = 1 if args.dataset == "digits" and args.image_size == 8 else 3
    from sdq_lightning.lit import SDQClassifier

    module = SDQClassifier(backbone=args.model, num_classes=args.num_classes, in_chans=in_chans,
                           init_checkpoint=args.checkpoint or None)
    return module.model.to(args.device), in_chans


def _batches(args: argparse.Namespace) -> list[Any]:
    if args.dataset == "digits":
        from sdq_lightning.data import DigitsDataModule

        dm = DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size,
                              in_chans=1 if args.image_size == 8 else 3, val_size=args.val_size or 0)
    else:
        from sdq_lightning.data import CIFAR10DataModule, ImageFolderDataModule

        cifar = args.dataset == "cifar10"
        cls, extra = (CIFAR10DataModule, {"download": False}) if cifar else (ImageFolderDataModule, {})
        dm = cls(root=args.data, image_size=args.image_size, batch_size=args.batch_size, num_workers=0,
                 val_size=args.val_size, augment=False, **extra)
    dm.setup("fit")
    return held_out_batches(dm.val_set, args.batch_size, args.batches)


def held_out_batches(dataset: Any, batch_size: int, batches: int, seed: int = 0) -> list[Any]:
    """The first ``batches`` batches of a seeded random order of the held-out set: every batch mixes the classes
    (an ImageFolder split is sorted by class, so its first batches would each hold one class)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    subset = Subset(dataset, order[:batch_size * batches].tolist())
    return list(DataLoader(subset, batch_size=batch_size, shuffle=False))


def _search_layers_checkpoint(run: str) -> str:
    path = Path(run)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"--run {run}: no checkpoint (expected a .ckpt or a run folder with "
                                "checkpoints/last.ckpt)")
    return str(path)


def make_plan(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """(BitPlan, Sensitivity or None, report lines) for parsed arguments."""
    import torch

    from sdq_lightning.planning import (
        PlanProblem,
        Sensitivity,
        exact_plan,
        finite_difference,
        from_search,
        hawq,
        random_plan,
        size_greedy_plan,
        uniform_plan,
    )

    budget = _parse_budget(args.budget)
    weight_bits = _parse_bits(args.weight_bits)
    model, in_chans = _model(args)
    example = torch.zeros(1, in_chans, args.image_size, args.image_size)
    problem = PlanProblem.from_model(model, example, weight_bits, args.activation_bits, args.first_last)
    problem.check_budget(budget)
    lines, sens = [], None
    started = time.time()
    if args.method in MEASURED:
        batches = _batches(args)
        if args.method == "oracle":
            sens = finite_difference(model, batches, problem.names, weight_bits, step=args.step, progress=True)
            if len(batches) >= 2:
                a, b = sens.halves()
                agree = a.agreement(b)
                lines.append(f"split-half Spearman of the one-level drops: {agree.pop('all'):.3f} (all levels)")
                if len(problem.names) >= 3:  # per level: a rank correlation over the layers
                    lines[-1] += "; " + ", ".join(f"{level}: {r:.3f}" for level, r in agree.items())
        else:
            sens = hawq(model, batches, problem.names, weight_bits, probes=args.probes, step=args.step,
                        seed=args.seed, progress=True)
        lines.append(f"measured {args.method} on {sum(len(b[1]) for b in batches)} held-out images "
                     f"in {time.time() - started:.0f} s")
    elif args.method == "search":
        sens = from_search(_search_layers_checkpoint(args.run), problem.names, weight_bits)
    elif args.method == "file":
        sens = Sensitivity.from_json(args.from_sensitivities)
    if sens is not None:
        bits = exact_plan(problem, sens.values, budget)
    elif args.method == "random":
        bits = random_plan(problem, budget, seed=args.seed)
    elif args.method == "size_greedy":
        bits = size_greedy_plan(problem, budget)
    else:
        bits = uniform_plan(problem, budget, args.uniform_bits)
    meta = {"method": args.method, "budget": {"metric": budget.metric, "target": budget.target},
            "seed": args.seed, "source_checkpoint": args.checkpoint}
    plan = problem.plan(bits, **meta)
    if sens is not None:
        lines.append(f"summed sensitivity of the plan: {sum(sens.values[n][b] for n, b in bits.items()):.5g}")
    return plan, sens, lines


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _check_args(args)
        plan, sens, lines = make_plan(args)
    except (ValueError, FileNotFoundError) as err:
        from sdq_lightning.cli.errors import one_line

        parser.error(one_line(err))
    if args.sensitivities and sens is not None:
        sens.to_json(args.sensitivities)
        lines.append(f"sensitivities: {args.sensitivities}")
    plan.save(args.out)
    budget = _parse_budget(args.budget)
    cost = plan.cost(budget.metric)
    print("\n".join([*lines, f"plan ({args.method}): {budget.metric} {cost:.6g} <= {budget.target:g}, "
                              f"average bits {plan.average_bits:.4f} -> {args.out}"]))


if __name__ == "__main__":
    main()
