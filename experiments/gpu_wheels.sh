#!/usr/bin/env bash
# Run HERE (not on the device), once, before a device call that uses the Hydra app: puts the wheels that the GPU
# machine lacks into .whl/ (git-ignored; carried with `carry: [".whl", ...]`).
#
# What the GPU image already has (.library/device/KINDS.md, read 2026-11-17): Python 3.12, torch 2.11, torchvision,
# lightning, pytorch-lightning, timm, torchmetrics, scikit-learn, matplotlib, pyyaml, tqdm, packaging, numpy,
# pillow, onnx, onnxruntime. Missing there and needed by `python -m sdq_lightning.train`: hydra-core, omegaconf and
# antlr4-python3-runtime 4.9.3 (the version omegaconf 2.3 pins; it is an sdist on PyPI, so it is built into a pure
# wheel here). wandb is missing too but only `logger=wandb` imports it; the GPU protocol logs with logger=csv.
# All three wheels are pure Python (py3-none-any): ~0.4 MiB together.
#   bash experiments/gpu_wheels.sh            # copies ../shared/wheels/gpu-py312 when present, else downloads
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
SHARED="${SHARED_WHEELS:-../shared/wheels/gpu-py312}"
PY="${PY:-python3}"
mkdir -p "$DEST"
have() { compgen -G "$DEST/$1-*.whl" >/dev/null; }
if [[ -d "$SHARED" ]]; then
  for name in hydra_core omegaconf antlr4_python3_runtime; do
    have "$name" || cp "$SHARED"/"$name"-*.whl "$DEST"/
  done
fi
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
have hydra_core || "$PY" -m pip download -q --no-deps "${plat[@]}" -d "$DEST" hydra-core==1.3.2
have omegaconf || "$PY" -m pip download -q --no-deps "${plat[@]}" -d "$DEST" omegaconf==2.3.0
have antlr4_python3_runtime || "$PY" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
for name in hydra_core omegaconf antlr4_python3_runtime; do
  n=$(compgen -G "$DEST/$name-*.whl" | wc -l)
  [[ $n == 1 ]] || { echo "error: $n wheels of $name in $DEST (need exactly one; the device install stops on two)" >&2; exit 1; }
done
ls -l "$DEST"/*.whl
du -sh "$DEST"
