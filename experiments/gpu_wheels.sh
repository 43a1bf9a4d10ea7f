#!/usr/bin/env bash
# For a GPU machine without internet whose Python (3.12) has torch, Lightning, timm, torchmetrics, scikit-learn and
# matplotlib but not Hydra: puts the wheels `python -m sdq_lightning.train` needs besides them into .whl/
# (git-ignored): hydra-core, omegaconf and antlr4-python3-runtime 4.9.3 (the version omegaconf 2.3 pins; an sdist
# on PyPI, built into a pure wheel here), ~0.4 MiB together. Run it on a machine with internet and copy .whl/ along
# with the repository; the GPU scripts install from it when Hydra is missing. wandb is only needed for logger=wandb.
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
