#!/usr/bin/env bash
# Issue 6, step 2: same-budget comparison on the real CIFAR-10 copy, every row through the Hydra app, every row
# initialised from checkpoints/resnet20_cifar10_fp.pt (made by experiments/cifar10_fp_baseline.sh), same seed,
# same schedule length (EPOCHS), FP activations as in the paper's CIFAR-10 row.
#   rows: uniform2_kd | sdq | sdq_noebr | sdq_nokd | uniform2 (no KD; the control of sdq_nokd)
#   search controls (no KD, issue 13): budget_only | projection_only | size_greedy | random (same epochs, same
#   budget as sdq_nokd; random is a size-neutral random plan, size_greedy the size heuristic runs before 2026-12-05
#   called random)
#   SUBSET=10000 trains on a fixed class-balanced subset of the training set (and evaluates on the full test set)
#   (default: the first four; ROWS="sdq uniform2_kd" to pick)
#   CIFAR10_ROOT=/path/to/cifar10 EPOCHS=6 SEARCH=2 bash experiments/cifar10_compare.sh
# Then: python experiments/summarize.py outputs/runs/c10cmp_* > the table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${CIFAR10_ROOT:?set CIFAR10_ROOT to the CIFAR-10 ImageFolder tree (train/, test/)}"
EPOCHS="${EPOCHS:-6}"
SEARCH="${SEARCH:-2}"
SEED="${SEED:-0}"
ABITS="${ABITS:-null}"
TARGET="${TARGET:-2.0}"
ROWS="${ROWS:-uniform2_kd sdq sdq_noebr sdq_nokd}"
SUBSET="${SUBSET:-null}"
FP="${FP_CKPT:-checkpoints/resnet20_cifar10_fp.pt}"
BATCH="${BATCH:-128}"             # GPU: BATCH=256 LR=0.04 TRAINER=gpu ON_DEVICE=true COMPILE=cuda-graphs
LR="${LR:-0.02}"
TRAINER="${TRAINER:-cpu}"
ON_DEVICE="${ON_DEVICE:-false}"
COMPILE="${COMPILE:-null}"
WORKERS="${WORKERS:-2}"
PY="${PY:-.venv/bin/python}"
test -f "$FP" || { echo "error: $FP not found; run experiments/cifar10_fp_baseline.sh first" >&2; exit 2; }
common=(dataset=imagefolder dataset.root="$ROOT" dataset.image_size=32
  'dataset.mean=[0.4914,0.4822,0.4465]' 'dataset.std=[0.2470,0.2435,0.2616]'
  dataset.in_memory=true dataset.num_workers="$WORKERS" dataset.batch_size="$BATCH" dataset.subset="$SUBSET"
  dataset.val_subset=10000 dataset.on_device="$ON_DEVICE" trainer="$TRAINER" sdq.runtime.compile="$COMPILE"
  model.init_checkpoint="$FP" model.lr="$LR" model.scheduler=cosine
  trainer.max_epochs="$EPOCHS" trainer.precision=bf16-mixed trainer.enable_progress_bar=false
  hardware.activation_bits="$ABITS" seed="$SEED" logger=csv)
kd=(sdq.teacher="$FP" sdq.kd.teacher_arch=resnet20)
tag="a${ABITS}_s${SEED}${TAG:+_$TAG}"
[ "$SUBSET" = null ] || tag="${tag}_sub${SUBSET}"  # TAG=e8 (say) keeps a longer schedule apart
for row in $ROWS; do
  case "$row" in
    uniform2_kd) args=(hardware.weight_bits=[2] hardware.target=2.1 phase.search_epochs=0 "${kd[@]}") ;;
    uniform2)    args=(hardware.weight_bits=[2] hardware.target=2.1 phase.search_epochs=0 sdq.teacher=null) ;;
    sdq)         args=(hardware.target="$TARGET" phase.search_epochs="$SEARCH" "${kd[@]}") ;;
    sdq_noebr)   args=(hardware.target="$TARGET" phase.search_epochs="$SEARCH" sdq.ebr.weight=0 "${kd[@]}") ;;
    sdq_nokd)    args=(hardware.target="$TARGET" phase.search_epochs="$SEARCH" sdq.teacher=null) ;;
    budget_only|projection_only|size_greedy|random)
                 args=(hardware.target="$TARGET" phase.search_epochs="$SEARCH" sdq.teacher=null
                       sdq.search.search_signal="$row") ;;
    *) echo "error: unknown row '$row' (allowed: uniform2_kd sdq sdq_noebr sdq_nokd uniform2 budget_only" \
            "projection_only size_greedy random)" >&2; exit 2 ;;
  esac
  echo "=== $row ($tag) $(date -u +%FT%TZ)"
  $PY -m sdq_lightning.train name="c10cmp_${row}_${tag}" "${common[@]}" "${args[@]}" "$@"
done
