#!/usr/bin/env bash
# Optuna (TPE) over the SDQ search settings on digits, maximising val accuracy (needs the `sweep` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec "$PY" -m sdq_lightning.train -m experiment=digits_demo compare.enabled=false sweep=optuna \
  hydra.sweeper.n_trials="${TRIALS:-8}" "$@"
