"""Validate a command line before Hydra runs it, so a bad one fails fast with one line and no run folder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sdq_lightning.cli.errors import UserError, one_line


MAX_JOBS_CHECKED = 64  # a larger grid is checked value by value (each swept value with the others' first values)


def _choices(overrides: list[str]) -> list[list[str]]:
    """Per override, in order, its ``key=value`` choices: one for a plain override, every value of an enumerable
    sweep (lists, ``range``); Optuna's intervals, which cannot be enumerated, are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for text, ovr in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if not ovr.is_sweep_override():
            out.append([text])
            continue
        try:
            out.append([f"{ovr.get_key_element()}={v}" for v in ovr.sweep_string_iterator()])
        except Exception:  # noqa: BLE001 - interval() and friends: nothing to pick
            continue
    return out


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """Replace each sweep (``a=1,2,3``, ``range(...)``) by its first value; drop Optuna-style intervals."""
    return [values[0] for values in _choices(overrides)]


def sweep_jobs(overrides: list[str]) -> tuple[list[list[str]], bool]:
    """The override lists of the jobs a multirun launches (Hydra's grid, in its order) and True; for a grid of more
    than ``MAX_JOBS_CHECKED`` jobs, one list per swept value (the other sweeps at their first value) and False."""
    import itertools
    import math

    choices = _choices(overrides)
    if math.prod(len(values) for values in choices) <= MAX_JOBS_CHECKED:
        return [list(job) for job in itertools.product(*choices)], True
    firsts = [values[0] for values in choices]
    return [[*firsts[:i], value, *firsts[i + 1:]] for i, values in enumerate(choices) if len(values) > 1
            for value in values], False


def _parse(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def _compose(conf_dir: Path, config_name: str | None, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return hydra_compose(config_name or "train", overrides=overrides)


def compose(argv: list[str], conf_dir: Path) -> DictConfig | None:
    """The config a command line composes to (first job of a sweep); ``None`` for help/info requests."""
    args = _parse(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun or args.cfg:
        return None  # printing help or a config (--cfg job|hydra|all) never needs data or a valid run
    if args.config_path or args.config_dir:
        return None  # a user-supplied config tree: let Hydra validate it
    overrides = _first_of_sweeps(list(args.overrides)) if args.multirun else list(args.overrides)
    return _compose(conf_dir, args.config_name, overrides)


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
    _check_trainer(cfg)
    hw = cfg.hardware
    try:
        validate_activation_bits(hw.activation_bits, "hardware.activation_bits")
    except ValueError as err:
        raise UserError(str(err)) from None
    if not OmegaConf.is_list(hw.weight_bits):
        raise UserError(f"hardware.weight_bits={hw.weight_bits} must be a list of candidate bitwidths in 1..8: "
                        f"hardware.weight_bits=[{hw.weight_bits}] for uniform quantization, [2,4,8] to search")
    weight_bits = validate_candidates(list(hw.weight_bits), "hardware.weight_bits")
    budget = Budget(metric=hw.metric, target=hw.target)
    searching = len(weight_bits) > 1 and not cfg.phase.get("plan")
    if searching and budget.metric == "avg_bits" and budget.target < min(weight_bits):
        raise UserError(f"impossible budget: hardware.target={budget.target:g} average bits is below the lowest "
                        f"candidate {min(weight_bits)} of hardware.weight_bits")
    if cfg.phase.get("plan") and not Path(str(cfg.phase.plan)).is_file():
        raise FileNotFoundError(f"phase.plan file not found: {cfg.phase.plan}")
    init = cfg.model.get("init_checkpoint")
    if init and not Path(str(init)).is_file():
        raise FileNotFoundError(f"model.init_checkpoint file not found: {init} (a .pt state dict or a .ckpt)")
    if init:
        from sdq_lightning.checkpoint import load_checkpoint

        try:
            load_checkpoint(str(init))
        except ValueError as err:
            raise UserError(f"model.init_checkpoint: {err}") from None
    if cfg.sdq.enabled:
        _check_schedule(cfg, searching)
        _check_sdq_arguments(cfg)
    _check_data(cfg)
    if cfg.sdq.enabled:
        _check_quantizable(cfg, weight_bits, budget, searching)


def _check_trainer(cfg: DictConfig) -> None:
    """Every ``trainer.*`` key must be a ``lightning.Trainer`` argument, and the run a whole number of epochs (the
    learning-rate schedule, the FP teacher and the search are laid out over them)."""
    import difflib
    import inspect

    import lightning

    allowed = [n for n in inspect.signature(lightning.Trainer.__init__).parameters if n != "self"]
    for key in cfg.trainer:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean trainer.{close[0]}?" if close else "see the arguments of lightning.Trainer"
            raise UserError(f"trainer.{key} is not a lightning.Trainer argument; {hint}")
    for key, value in (("trainer.max_epochs", cfg.trainer.get("max_epochs")),
                       ("fp_teacher.epochs", cfg.fp_teacher.epochs if cfg.fp_teacher.enabled else 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key}={value} must be a whole number of epochs >= 1 (the learning-rate schedule and "
                            "the search are laid out over them); bound a run by time with trainer.max_time=DD:HH:MM:SS")


def _check_schedule(cfg: DictConfig, searching: bool) -> None:
    """The search must end before the run does (else the FP teacher trains first and the SDQ fit then fails)."""
    if not searching or cfg.phase.get("search_only"):
        return
    search, max_epochs = int(cfg.phase.search_epochs), cfg.trainer.get("max_epochs")
    if search <= 0:
        raise UserError(f"phase.search_epochs={search}: a search over several hardware.weight_bits needs at least "
                        "1 epoch (or phase=train phase.plan=<plan.yaml>, or a single weight bitwidth)")
    if max_epochs not in (None, -1) and search >= int(max_epochs):
        raise UserError(f"phase.search_epochs={search} must be smaller than trainer.max_epochs={max_epochs} so that "
                        f"phase 2 trains under the frozen plan (e.g. trainer.max_epochs={search + 1} or more, or "
                        "phase=search to search only)")


def _check_sdq_arguments(cfg: DictConfig) -> None:
    """Construct the SDQ callback once from ``cfg.sdq``: any argument it refuses is refused here, before work."""
    from sdq_lightning.utils.instantiate import build_sdq

    try:
        build_sdq(cfg, save_dir=None)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise UserError(f"sdq: {one_line(err)}") from None


def _dataset_class(cfg: DictConfig) -> type:
    from sdq_lightning.data.registry import _builder

    node = {k: cfg.dataset[k] for k in ("name", "module", "_target_") if k in cfg.dataset}
    return _builder(node)[0]


def _check_data(cfg: DictConfig) -> None:
    from sdq_lightning.data import CIFAR10DataModule, ImageFolderDataModule

    cls = _dataset_class(cfg)
    if "root" in cfg.dataset.keys() and OmegaConf.is_missing(cfg.dataset, "root"):
        raise FileNotFoundError("dataset.root is not set; pass dataset.root=/path/to/data")
    root = cfg.dataset.get("root")
    if issubclass(cls, CIFAR10DataModule):
        from sdq_lightning.data.cifar10 import OFFLINE_HINT, _is_folder_tree

        if _is_folder_tree(root) or (Path(root) / "cifar-10-batches-py").is_dir():
            return
        if not cfg.dataset.get("download", True):
            raise FileNotFoundError(f"CIFAR-10 not found under dataset.root='{root}' and download=false; "
                                    f"{OFFLINE_HINT}")
        reason = _download_unreachable()
        if reason:
            raise FileNotFoundError(f"CIFAR-10 not found under dataset.root='{root}' and it cannot be downloaded "
                                    f"({reason}); {OFFLINE_HINT}")
    elif issubclass(cls, ImageFolderDataModule):
        from sdq_lightning.data.imagefolder import find_split_dirs

        find_split_dirs(root, cfg.dataset.get("val_dir"))


CIFAR10_HOST = ("www.cs.toronto.edu", 443)


def _download_unreachable(timeout: float = 5.0) -> str | None:
    """Why torchvision's CIFAR-10 download host cannot be reached (``None``: it can)."""
    import socket

    try:
        with socket.create_connection(CIFAR10_HOST, timeout=timeout):
            return None
    except OSError as err:
        return f"no network: {CIFAR10_HOST[0]} unreachable, {type(err).__name__}"


def _check_quantizable(cfg: DictConfig, weight_bits: tuple[int, ...], budget: object, searching: bool) -> None:
    """Build the model once on CPU: it must have layers to quantize, and (searching) the lowest bits must meet the
    budget."""
    import timm
    import torch
    from torch import nn

    from sdq_lightning.budget import CostModel, profile_model
    from sdq_lightning.surgery import QuantSpec, quant_layers, quantize_model

    ds = cfg.dataset
    in_chans = int(ds.get("in_chans") or 3)
    size = int(ds.get("image_size") or 32)
    num_classes = int(ds.get("num_classes") or 10)
    try:
        model = timm.create_model(cfg.model.backbone, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    except Exception:  # noqa: BLE001 - the run itself reports it
        return
    no_layers = (f"model.backbone={cfg.model.backbone} has no Conv2d/Linear layer for SDQ to quantize, so there is "
                 "no bit plan to search or train; pick a model with conv/linear layers or train it in floating "
                 "point with sdq.enabled=false")
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()):
        raise UserError(no_layers)
    try:
        spec = QuantSpec(weight_bits=weight_bits, activation_bits=cfg.hardware.activation_bits,
                         first_last=cfg.sdq.layers.first_last, include=tuple(cfg.sdq.layers.include),
                         exclude=tuple(cfg.sdq.layers.exclude))
        holder = nn.Module()  # names as the SDQ callback sees them in SDQClassifier: model.<layer>
        holder.model = model
        quantize_model(holder, spec)
    except Exception:  # noqa: BLE001 - the run itself reports anything else
        return
    if not quant_layers(model):
        raise UserError(no_layers.replace("has no Conv2d/Linear layer", "has no Conv2d/Linear layer left after "
                                          "sdq.layers.include/exclude"))
    if not searching:
        return
    try:
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


def precheck(argv: list[str], conf_dir: Path) -> DictConfig | None:
    """Compose the command line and check it; raises on the first problem. Returns the composed config (first job
    of a sweep), or ``None`` for help and config-printing requests."""
    from sdq_lightning.cli.resume import check_resume

    cfg = compose(argv, conf_dir)
    if cfg is None:
        return None
    check_config(cfg)
    check_resume(cfg)
    args = _parse(argv)
    if args.multirun:
        check_sweep(conf_dir, args.config_name, list(args.overrides))
    return cfg


def check_sweep(conf_dir: Path, config_name: str | None, overrides: list[str]) -> None:
    """Check every job of a multirun before the first one starts; the error names the job."""
    from sdq_lightning.cli.errors import USER_ERRORS

    jobs, whole_grid = sweep_jobs(overrides)
    if len(jobs) <= 1:
        return
    for number, job in enumerate(jobs):
        try:
            check_config(_compose(conf_dir, config_name, job))
        except USER_ERRORS as err:
            swept = " ".join(o for o in job if o not in overrides)
            which = f"sweep job {number} ({swept})" if whole_grid else f"a sweep job with {swept}"
            raise UserError(f"{which}: {one_line(err)}; no job was started") from None
