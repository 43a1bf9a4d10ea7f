"""Rank-zero logging: one logger per module whose methods only emit on global rank 0; the app's filter of library
lines a user cannot act on."""

from __future__ import annotations

import logging
import re
import warnings

from lightning.pytorch.utilities import rank_zero_only


class _RankZeroAdapter(logging.LoggerAdapter):
    def log(self, level: int, msg: object, *args, **kwargs) -> None:  # type: ignore[override]
        if rank_zero_only.rank == 0 and self.isEnabledFor(level):
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str = __name__) -> logging.LoggerAdapter:
    """A ``logging`` logger that is silent on every rank but 0 (Hydra configures its handlers)."""
    return _RankZeroAdapter(logging.getLogger(name), {})


# Lines of the libraries under a fit that carry nothing to act on: an advertisement printed at every Trainer, a
# deprecation inside Lightning's own pytree helper, and torch's note that the CPU build found no CUDA toolkit when it
# compiles the fake-quantization kernels.
NOISE = {
    "lightning.pytorch.utilities.rank_zero": re.compile(r"Tip: For seamless cloud"),
    "torch.utils.cpp_extension": re.compile(r"No CUDA runtime is found"),
}
NOISY_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_library_noise() -> None:
    """Drop the :data:`NOISE` log lines and :data:`NOISY_WARNINGS` (idempotent)."""
    for name, pattern in NOISE.items():
        lib = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in lib.filters):
            lib.addFilter(_DropMatching(pattern))
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
