#!/usr/bin/env bash
# Issue 6, step 1: the full-precision ResNet20 baseline on the real CIFAR-10 copy, trained by the project's own app.
# CPU schedule that fits one working session: 12 epochs, one-cycle LR (max 0.2), SGD momentum 0.9, wd 5e-4,
# batch 128, bf16 autocast (AMX), data decoded once into memory. Then the state dict is extracted to
# checkpoints/resnet20_cifar10_fp.pt (used as initialisation and KD teacher by experiments/cifar10_compare.sh).
#   CIFAR10_ROOT=/path/to/cifar10 bash experiments/cifar10_fp_baseline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${CIFAR10_ROOT:?set CIFAR10_ROOT to the CIFAR-10 ImageFolder tree (train/, test/)}"
EPOCHS="${EPOCHS:-12}"
PY="${PY:-.venv/bin/python}"
$PY -m sdq_lightning.train name=cifar10_resnet20_fp sdq.enabled=false \
  dataset=imagefolder dataset.root="$ROOT" dataset.image_size=32 \
  'dataset.mean=[0.4914,0.4822,0.4465]' 'dataset.std=[0.2470,0.2435,0.2616]' \
  dataset.in_memory=true dataset.num_workers=2 dataset.batch_size=128 \
  model.scheduler=onecycle model.lr=0.2 trainer.max_epochs="$EPOCHS" trainer.precision=bf16-mixed \
  trainer.enable_progress_bar=false logger=csv "$@"
RUN=$(ls -td outputs/runs/cifar10_resnet20_fp/*/ | head -1)
$PY - "$RUN" <<'PY'
import sys, glob, torch
run = sys.argv[1]
ckpt = sorted(glob.glob(f"{run}/checkpoints/*.ckpt"))[-1]
state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
torch.save(state, "checkpoints/resnet20_cifar10_fp.pt")
print(f"saved checkpoints/resnet20_cifar10_fp.pt from {ckpt}")
PY
