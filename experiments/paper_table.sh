#!/usr/bin/env bash
# The paper's table rows (sdq-method.md section 4) and their uniform baselines, one after another.
# Needs the data: CIFAR10_ROOT (binary release or ImageFolder tree) and IMAGENET_ROOT (train/, val/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
: "${CIFAR10_ROOT:?set CIFAR10_ROOT=/path/to/cifar10}"
"$PY" -m sdq_lightning.train experiment=cifar10_resnet20 dataset.root="$CIFAR10_ROOT" "$@"
"$PY" -m sdq_lightning.train experiment=uniform_cifar10_resnet20_w2 dataset.root="$CIFAR10_ROOT" "$@"
if [[ -n "${IMAGENET_ROOT:-}" ]]; then
  for e in imagenet_resnet18 imagenet_mobilenetv2 bitfusion_resnet18 resnet18_a2 \
           uniform_imagenet_resnet18_w4a4 uniform_imagenet_mobilenetv2_w4a4; do
    "$PY" -m sdq_lightning.train experiment=$e dataset.root="$IMAGENET_ROOT" "$@"
  done
fi
