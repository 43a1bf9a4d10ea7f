#!/usr/bin/env bash
# Issue 24: accuracy of phase 2 in the integer-only mode against the fake-quant model, same plan, same schedule.
# Every row through the Hydra app from the FP checkpoint: plan given (no search), SGD LR cosine, batch 128, fp32, no
# KD, no EBR (the integer-only mode does not apply EBR), EPOCHS epochs on a class-balanced SUBSET of the training
# set, validated and tested on the same VAL_SUBSET seeded test images (default 2,000; dataset.val_subset limits both;
# VAL_SUBSET=10000 is the whole test set). Plans (tests/export/integer_helpers.py): w8a8, w4a8 (first conv and
# classifier 8/8), sdq2 (ResNet20's SDQ plan at 1.998 average weight bits, 8-bit inputs).
#   CIFAR10_ROOT=/path/to/cifar10 [PLANS="w8a8 w4a8 sdq2"] [EPOCHS=3] [SUBSET=10000] [VAL_SUBSET=2000] [WORKERS=0] \
#     bash experiments/integer_only_accuracy.sh
# Then: the test/acc of each run's metrics.json (printed at the end); over seeds (SEED=1, 2, ...), paired by seed with
# 95 % intervals: python experiments/integer_only_table.py outputs/runs/io24_*_<tag without _s<seed>>_s*
# Extra arguments go to every run: e.g. sdq.freeze.bn_fold_steps=20 where phase 2 has fewer than 100 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${CIFAR10_ROOT:?set CIFAR10_ROOT to the CIFAR-10 ImageFolder tree (train/, test/)}"
PLANS="${PLANS:-w8a8 w4a8 sdq2}"
EPOCHS="${EPOCHS:-3}"
SUBSET="${SUBSET:-10000}"
VAL_SUBSET="${VAL_SUBSET:-2000}"
SEED="${SEED:-0}"
LR="${LR:-0.02}"
FP="${FP_CKPT:-checkpoints/resnet20_cifar10_fp.pt}"
PY="${PY:-.venv/bin/python}"
WORKERS="${WORKERS:-0}"
TAG="${TAG:-e${EPOCHS}_sub${SUBSET}_s${SEED}}"
OUT="outputs/integer_only_accuracy/$TAG"
mkdir -p "$OUT"
for plan in $PLANS; do
  PYTHONPATH=tests/export $PY - "$plan" "$OUT/$plan.yaml" <<'EOF'
import sys
import torch
from integer_helpers import float_model, plan_bits
from sdq_lightning import BitPlan, LayerBits
model = float_model()
w, a = plan_bits(model, sys.argv[1])
BitPlan({n: LayerBits(w[n], a[n], 0, 0) for n in w}).apply(model)
BitPlan.from_model(model, torch.zeros(1, 3, 32, 32)).save(sys.argv[2])
EOF
done
common=(dataset=imagefolder dataset.root="$ROOT" dataset.image_size=32
  'dataset.mean=[0.4914,0.4822,0.4465]' 'dataset.std=[0.2470,0.2435,0.2616]'
  dataset.in_memory=true dataset.num_workers="$WORKERS" dataset.batch_size=128 dataset.subset="$SUBSET" dataset.val_subset="$VAL_SUBSET"
  trainer=cpu model.init_checkpoint="$FP" model.lr="$LR" model.scheduler=cosine trainer.max_epochs="$EPOCHS"
  trainer.enable_progress_bar=false phase=train sdq.teacher=null sdq.ebr.weight=0 seed="$SEED" logger=csv
  compare.enabled=false fp_teacher.enabled=false hardware.target=8.0)
for plan in $PLANS; do
  for mode in fakequant integer_only; do
    flag=false; [ "$mode" = integer_only ] && flag=true
    echo "=== $plan $mode $(date -u +%FT%TZ)"
    $PY -m sdq_lightning.train name="io24_${plan}_${mode}_${TAG}" "${common[@]}" phase.plan="$OUT/$plan.yaml" \
      sdq.integer_only="$flag" "$@"
  done
done
$PY - "$TAG" <<'EOF'
import json, sys
from pathlib import Path
for p in sorted(Path("outputs/runs").glob(f"io24_*_{sys.argv[1]}/*/metrics.json")):
    m = json.loads(p.read_text())
    print(p.parent.parent.name, p.parent.name, "test/acc", m.get("test/acc"))
EOF
