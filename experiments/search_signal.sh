#!/usr/bin/env bash
# Issue 26: what the search's task signal measures, against the oracle. Searches ResNet20 on CIFAR-10 from the FP
# checkpoint (phase=search: the search alone, then plan.yaml), once per task estimate and seed, and compares what
# each search measured with the oracle's finite differences (experiments/sensitivity_agreement.py: Spearman per
# level, over the layer-levels the search measured).
#
#   CIFAR10_ROOT=/path/to/cifar10 [ESTIMATES="paired pathwise"] [SEEDS="0 1"] [BUDGET=2.0] [SEARCH_EPOCHS=2] \
#     [SUBSET=10000] [LR=0.02] [PROBES=4] [LOOKAHEAD=0] [REPEATS=4] bash experiments/search_signal.sh [more app overrides]
# PROBES: layers measured per step by the paired estimate (sdq.search.probes_per_step). LOOKAHEAD, REPEATS: the
# lowest levels measured at the start of the search, and how often each (sdq.search.lookahead_levels / _repeats).
# SUFFIX: appended to the run names (for searches that differ by the app overrides given after the script).
#
# The oracle is measured once (sdq-plan --method oracle, 4,096 held-out images) into outputs/fixed_plan/plans/,
# shared with experiments/fixed_plan_protocol.sh; each search's plan.yaml can be trained there with
# EXTRA="2.0:sdq_paired_s0=<run>/plan.yaml". A finished search is not run again (the script resumes).
# Data and training as in the fixed-plan protocol (conf/experiment/cifar10_plan_protocol.yaml): the 5,000 held-out
# training images are never trained on; the search sees a class-balanced SUBSET of the other 45,000 (seeded), FP
# activations, no KD, no EBR. On a GPU: TRAINER=gpu SUBSET=null.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${CIFAR10_ROOT:?set CIFAR10_ROOT to the CIFAR-10 ImageFolder tree (train/, test/)}"
ESTIMATES="${ESTIMATES:-paired pathwise}"
SEEDS="${SEEDS:-0 1}"
BUDGET="${BUDGET:-2.0}"
SEARCH_EPOCHS="${SEARCH_EPOCHS:-2}"
SUBSET="${SUBSET:-10000}"
LR="${LR:-0.02}"
PROBES="${PROBES:-4}"
LOOKAHEAD="${LOOKAHEAD:-0}"
REPEATS="${REPEATS:-4}"
TRAINER="${TRAINER:-cpu}"
PRECISION="${PRECISION:-32}"
FP="${FP_CKPT:-checkpoints/resnet20_cifar10_fp.pt}"
PY="${PY:-.venv/bin/python}"
PLANS="outputs/fixed_plan/plans"
OUTPUTS="${SDQ_OUTPUT_DIR:-outputs}"
ARGS=("$@")
test -f "$FP" || { echo "error: $FP not found; run experiments/cifar10_fp_baseline.sh first" >&2; exit 2; }
for e in $ESTIMATES; do
  case "$e" in paired|paired_train|paired_isolated|pathwise) ;; *) echo "error: unknown estimate '$e' (allowed: paired paired_train paired_isolated pathwise)" >&2; exit 2 ;; esac
done
mkdir -p "$PLANS"
[ -f "$PLANS/oracle.json" ] || "$PY" -m sdq_lightning.cli.plan --checkpoint "$FP" --model resnet20 --data "$ROOT" \
  --dataset imagefolder --val-size 5000 --method oracle --budget avg_bits=2.0 --batches 16 \
  --out "$PLANS/oracle_measure.yaml" --sensitivities "$PLANS/oracle.json" --force

runs=()
for s in $SEEDS; do
  for e in $ESTIMATES; do
    tag="$e"; extra=()
    [ "$e" != pathwise ] && { tag="${e}${PROBES}"; extra=(sdq.search.probes_per_step="$PROBES"); }
    [ "$e" != pathwise ] && [ "$LOOKAHEAD" != 0 ] && { tag="${tag}_la${LOOKAHEAD}x${REPEATS}"
      extra+=(sdq.search.lookahead_levels="$LOOKAHEAD" sdq.search.lookahead_repeats="$REPEATS"); }
    name="search26_${tag}_b${BUDGET}_s${s}_e${SEARCH_EPOCHS}_sub${SUBSET}${SUFFIX:-}"
    if ! ls "$OUTPUTS/runs/$name"/*/plan.yaml >/dev/null 2>&1; then
      echo "=== $name $(date -u +%FT%TZ)"
      "$PY" -m sdq_lightning.train experiment=cifar10_plan_protocol name="$name" phase=search \
        phase.search_epochs="$SEARCH_EPOCHS" dataset.root="$ROOT" dataset.subset="$SUBSET" trainer="$TRAINER" \
        trainer.precision="$PRECISION" model.init_checkpoint="$FP" model.lr="$LR" hardware.target="$BUDGET" \
        sdq.search.task_estimate="$e" "${extra[@]}" logger=csv seed="$s" "${ARGS[@]}"
    fi
    run_dir=$(ls -d "$OUTPUTS/runs/$name"/*/ | tail -1)
    runs+=("${tag}_s${s}=${run_dir%/}")
  done
done
"$PY" experiments/sensitivity_agreement.py "$PLANS/oracle.json" "${runs[@]}"
