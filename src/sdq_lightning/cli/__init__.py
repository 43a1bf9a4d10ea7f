"""Entry points: the Hydra app (``train``), ``sdq-export`` (``cli.export``) and ``sdq-plan`` (``cli.plan``)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``<prog>: error: ... (see --help)`` line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
