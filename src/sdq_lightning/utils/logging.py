"""Rank-zero logging: one logger per module whose methods only emit on global rank 0."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only


class _RankZeroAdapter(logging.LoggerAdapter):
    def log(self, level: int, msg: object, *args, **kwargs) -> None:  # type: ignore[override]
        if rank_zero_only.rank == 0 and self.isEnabledFor(level):
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str = __name__) -> logging.LoggerAdapter:
    """A ``logging`` logger that is silent on every rank but 0 (Hydra configures its handlers)."""
    return _RankZeroAdapter(logging.getLogger(name), {})
