#!/usr/bin/env bash
# Accuracy against budget: one SDQ run per average-bit target, plus the sweep summary
# (sweep_summary.md + pareto.png in the multirun folder). Extra arguments go to Hydra, e.g.
#   experiments/sweep_budget.sh experiment=cifar10_resnet20 dataset.root=/path/to/cifar10 trainer=gpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec "$PY" -m sdq_lightning.train -m "hardware.target=${TARGETS:-2,3,4}" "$@"
