"""User errors: one ``error: ...`` line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import re
import sys
from typing import NoReturn

from hydra.errors import HydraException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import OmegaConfBaseException


class UserError(ValueError):
    """A configuration the app refuses, with a message meant for the user."""


from sdq_lightning.callbacks.guard import DivergenceError  # noqa: E402

USER_ERRORS = (ValueError, FileNotFoundError, HydraException, OmegaConfBaseException, MisconfigurationException,
               DivergenceError)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (Hydra's option lists folded in, OmegaConf's context dropped)."""
    cause = err.__cause__
    if isinstance(err, HydraException) and cause is not None and str(err).startswith("Error in call to target"):
        return one_line(cause)  # hydra.utils.instantiate wraps the constructor's own error
    if isinstance(err, HydraException) and isinstance(cause, OmegaConfBaseException):  # an override the schema refuses
        return f"{str(err).strip().splitlines()[0].rstrip('.')}: {one_line(cause)}"
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and getattr(err, "filename", None) and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and lines[1].startswith("Available options in"):
        options = []
        for ln in lines[2:]:
            if ln.startswith("Config search path"):
                break
            options.append(ln)
        return f"{lines[0]}; available: {', '.join(options)}"
    lines = [ln for ln in lines if not re.match(r"^(full_key|reference_type|object_type|key|value):", ln)]
    return "; ".join(lines[:2]) if lines else type(err).__name__


def fail(err: BaseException) -> NoReturn:
    print(f"error: {one_line(err)}", file=sys.stderr)
    sys.exit(2)
