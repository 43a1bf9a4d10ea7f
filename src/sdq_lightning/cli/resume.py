"""``sdq-train ... resume=<run folder>``: continue an interrupted run in its own folder from its last checkpoint.

The command line must compose to the same run: every key that changes what is trained (model, data, budget,
candidate and activation bits, SDQ options, schedule, seed) must equal the saved ``config.yaml``; a difference is a
one-line error naming the keys, before anything is written. Keys that only change how the run is watched or how
long one sitting may take (``trainer.max_time``, progress bar, loggers, data workers) may differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdq_lightning.cli.errors import UserError

# Dotted prefixes that may differ between the interrupted run and its resume.
FREE_KEYS = ("resume", "paths", "logger", "callbacks", "hydra", "trainer.max_time", "trainer.enable_progress_bar",
             "trainer.log_every_n_steps", "dataset.num_workers", "dataset.root", "compare.enabled")
CHECKPOINT = Path("checkpoints") / "last.ckpt"


def run_folder(resume: str | Path) -> Path:
    """The run folder named by ``resume`` (the folder, or its ``checkpoints/last.ckpt``); raises a ``UserError``."""
    path = Path(str(resume)).expanduser()
    folder = path.parent.parent if path.suffix == ".ckpt" else path
    if not (folder / "config.yaml").is_file():
        raise UserError(f"resume={resume}: not a run folder (no config.yaml); pass the folder the run printed as "
                        "'run folder: ...'")
    if not (folder / CHECKPOINT).is_file():
        raise UserError(f"resume={resume}: the run folder has no {CHECKPOINT.as_posix()} (it stopped before its first "
                        "epoch ended, or ran with save_checkpoint=false); start it again without resume=")
    return folder.resolve()


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in FREE_KEYS)


def changed_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two resolved configs, except ``FREE_KEYS``. A key the saved run
    did not have (an option added to the configs since) counts as unchanged while it is null, its 'not set' value."""
    a, b = _flat(saved), _flat(now)
    return sorted(k for k in set(a) | set(b)
                  if not _free(k) and a.get(k, "<unset>") != b.get(k, "<unset>")
                  and not (k not in a and b[k] is None))


def check_resume(cfg: DictConfig) -> Path | None:
    """The run folder to resume (``None`` without ``resume``); raises a ``UserError`` if the command line composes to a
    different run or the run cannot be resumed."""
    resume = cfg.get("resume")
    if not resume:
        return None
    folder = run_folder(resume)
    if cfg.get("fp_teacher", {}).get("enabled") or cfg.get("compare", {}).get("enabled"):
        raise UserError("resume= continues single-stage runs; a run with fp_teacher or compare trains several models "
                        "(resume each stage's own folder, or start it again)")
    saved = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=False)
    if isinstance(saved.get("sdq"), dict):  # a run of a version whose sdq node was flat
        from sdq_lightning.options import nest_flat_node

        saved["sdq"] = nest_flat_node(saved["sdq"])
    now = OmegaConf.to_container(cfg, resolve=True)
    diff = changed_keys(saved, now)
    if diff:
        shown = ", ".join(f"{k} ({_flat(saved).get(k, '<unset>')!r} -> {_flat(now).get(k, '<unset>')!r})"
                          for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise UserError(f"resume={resume}: the command line changes what the run trains: {shown}{more}; resume with "
                        "the run's own overrides (its .hydra/overrides.yaml), or start a new run without resume=")
    from sdq_lightning.checkpoint import load_checkpoint

    try:
        load_checkpoint(folder / CHECKPOINT)
    except ValueError as err:
        raise UserError(f"resume={resume}: {err}") from None
    return folder


def checkpoint_of(cfg: DictConfig) -> str | None:
    """The checkpoint ``trainer.fit`` continues from (``None`` without ``resume``)."""
    resume = cfg.get("resume")
    return str(run_folder(resume) / CHECKPOINT) if resume else None
