"""Validate a command line before Hydra runs it, so a bad one fails fast with one line and no run folder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sdq_lightning.cli.errors import UserError


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """Replace each sweep (``a=1,2,3``, ``range(...)``) by its first value; drop Optuna-style intervals."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for text, ovr in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if not ovr.is_sweep_override():
            out.append(text)
            continue
        try:
            first = next(iter(ovr.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - interval() and friends: nothing to pick
            continue
        out.append(f"{ovr.get_key_element()}={first}")
    return out


def compose(argv: list[str], conf_dir: Path) -> DictConfig | None:
    """The config a command line composes to (first job of a sweep); ``None`` for help/info requests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun:
        return None
    if args.config_path or args.config_dir:
        return None  # a user-supplied config tree: let Hydra validate it
    overrides = _first_of_sweeps(list(args.overrides)) if args.multirun else list(args.overrides)
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return hydra_compose(args.config_name or "train", overrides=overrides)


def check_config(cfg: DictConfig) -> None:
    """Check what can be checked without training; raises ``ValueError`` / ``FileNotFoundError``."""
    import timm

    import sdq_lightning  # noqa: F401  (registers resnet20 & co. in timm)
    from sdq_lightning.budget import Budget
    from sdq_lightning.quantizers import validate_candidates
    from sdq_lightning.surgery import validate_activation_bits

    backbone = cfg.model.backbone
    if isinstance(backbone, str) and not timm.is_model(backbone):
        raise UserError(f"unknown model '{backbone}': not a timm model name (list them with timm.list_models())")
    hw = cfg.hardware
    try:
        validate_activation_bits(hw.activation_bits, "hardware.activation_bits")
    except ValueError as err:
        raise UserError(str(err)) from None
    weight_bits = validate_candidates(list(hw.weight_bits), "hardware.weight_bits")
    budget = Budget(metric=hw.metric, target=hw.target)
    searching = len(weight_bits) > 1 and not cfg.phase.get("plan")
    if searching and budget.metric == "avg_bits" and budget.target < min(weight_bits):
        raise UserError(f"impossible budget: hardware.target={budget.target:g} average bits is below the lowest "
                        f"candidate {min(weight_bits)} of hardware.weight_bits")
    if cfg.phase.get("plan") and not Path(str(cfg.phase.plan)).is_file():
        raise FileNotFoundError(f"phase.plan file not found: {cfg.phase.plan}")
    _check_data(cfg)
    if searching and cfg.sdq.enabled:
        _check_feasible(cfg, weight_bits, budget)


def _check_data(cfg: DictConfig) -> None:
    target = str(cfg.dataset.get("_target_", ""))
    root = cfg.dataset.get("root")
    if OmegaConf.is_missing(cfg.dataset, "root") if "root" in cfg.dataset.keys() else False:
        raise FileNotFoundError("dataset.root is not set; pass dataset.root=/path/to/data")
    if target.endswith("ImageFolderDataModule"):
        from sdq_lightning.data.imagefolder import find_split_dirs

        find_split_dirs(root, cfg.dataset.get("val_dir"))
    elif target.endswith("CIFAR10DataModule") and not cfg.dataset.get("download", True):
        from sdq_lightning.data.cifar10 import OFFLINE_HINT, _is_folder_tree

        if not (_is_folder_tree(root) or (Path(root) / "cifar-10-batches-py").is_dir()):
            raise FileNotFoundError(f"CIFAR-10 not found under dataset.root='{root}' and download=false; {OFFLINE_HINT}")


def _check_feasible(cfg: DictConfig, weight_bits: tuple[int, ...], budget: object) -> None:
    """Build the model once on CPU and ask the cost model whether the lowest bits meet the budget."""
    import timm
    import torch

    from sdq_lightning.budget import CostModel, profile_model
    from sdq_lightning.surgery import QuantSpec, quantize_model

    ds = cfg.dataset
    in_chans = int(ds.get("in_chans") or 3)
    size = int(ds.get("image_size") or 32)
    num_classes = int(ds.get("num_classes") or 10)
    try:
        model = timm.create_model(cfg.model.backbone, pretrained=False, num_classes=num_classes, in_chans=in_chans)
        spec = QuantSpec(weight_bits=weight_bits, activation_bits=cfg.hardware.activation_bits,
                         first_last=cfg.sdq.first_last, include=tuple(cfg.sdq.include or ()),
                         exclude=tuple(cfg.sdq.exclude or ()))
        quantize_model(model, spec)
        model.eval()
        with torch.no_grad():
            profile = profile_model(model, torch.zeros(1, in_chans, size, size))
        cost_model = CostModel(model, profile)
    except Exception:  # noqa: BLE001 - the run itself reports anything else
        return
    try:
        cost_model.check_feasible(budget)
    except ValueError as err:
        raise UserError(f"impossible budget: {err}") from None


def precheck(argv: list[str], conf_dir: Path) -> None:
    """Compose the command line and check it; raises on the first problem."""
    cfg = compose(argv, conf_dir)
    if cfg is not None:
        check_config(cfg)
