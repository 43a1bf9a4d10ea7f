#!/usr/bin/env bash
# Issue 22: one fixed-plan protocol. Every plan, whatever made it, is trained by the same phase-2 schedule from the
# same converged FP checkpoint, so that the table compares plans and nothing else.
#
# 1. Plans (sdq-plan, weights 1..8 bits, first conv and classifier at 8 bits, FP activations), per budget:
#      oracle       finite-difference sensitivities on the 5,000 held-out training images (measured once), exact plan
#      hawq         Hutchinson trace x quantization error on the same images (measured once), exact plan
#      random       one size-neutral plan per seed (uniform over the plans within 1 % under the target)
#      size_greedy  the size heuristic (largest layers down first)
#      uniform      the highest uniform width that fits
#    and any plan file given as EXTRA="budget:name=path/to/plan.yaml ..." (e.g. 2.0:sdq=<search run>/plan.yaml);
#    "{seed}" in the path is replaced by the seed, so each seed trains its own plan (e.g. a search with that seed).
# 2. Runs through the Hydra app: phase=train phase.plan=<plan> model.init_checkpoint=$FP_CKPT, no KD, no EBR, SGD
#    with cosine LR from LR, batch 128, bf16 autocast, EPOCHS epochs on a class-balanced SUBSET of the 45,000
#    training images left after the held-out split (the subset depends on the seed, the same for every plan of a
#    seed); validated on the 5,000 held-out images (val/acc: for choices), tested on the 10,000 test images
#    (test/acc: for the final table). A finished run is not run again, so the script resumes after an interruption.
# 3. Table: python experiments/fixed_plan_table.py outputs/runs/fixedplan_*_$TAG*
#
#   CIFAR10_ROOT=/path/to/cifar10 [BUDGETS="2.0 1.5"] [METHODS="oracle hawq random size_greedy"] \
#     [SEEDS="0 1 2 3 4 5 6 7"] [EPOCHS=1] [SUBSET=10000] [LR=0.02] bash experiments/fixed_plan_protocol.sh
# On an idle 2-core CPU one run (SUBSET=10000, EPOCHS=1) takes about a minute; on a GPU use SUBSET=null EPOCHS=10
# (the full training set) and TRAINER=gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${CIFAR10_ROOT:?set CIFAR10_ROOT to the CIFAR-10 ImageFolder tree (train/, test/)}"
BUDGETS="${BUDGETS:-2.0 1.5}"
METHODS="${METHODS:-oracle hawq random size_greedy}"
SEEDS="${SEEDS:-0 1 2 3 4 5 6 7}"
EPOCHS="${EPOCHS:-1}"
SUBSET="${SUBSET:-10000}"
LR="${LR:-0.02}"
TRAINER="${TRAINER:-cpu}"
PRECISION="${PRECISION:-bf16-mixed}"
FP="${FP_CKPT:-checkpoints/resnet20_cifar10_fp.pt}"
PY="${PY:-.venv/bin/python}"
TAG="${TAG:-e${EPOCHS}_sub${SUBSET}}"
PLANS="outputs/fixed_plan/plans"
OUTPUTS="${SDQ_OUTPUT_DIR:-outputs}"
ARGS=("$@")    # further app overrides, the same for every run
test -f "$FP" || { echo "error: $FP not found; run experiments/cifar10_fp_baseline.sh first" >&2; exit 2; }
for m in $METHODS; do
  case "$m" in oracle|hawq|random|size_greedy|uniform) ;;
    *) echo "error: unknown method '$m' (allowed: oracle hawq random size_greedy uniform; other plans: EXTRA=budget:name=file)" >&2
       exit 2 ;;
  esac
done
mkdir -p "$PLANS"
plan=("$PY" -m sdq_lightning.cli.plan --checkpoint "$FP" --model resnet20 --data "$ROOT" --dataset imagefolder
      --val-size 5000)

# The measured sensitivities, once (oracle: 4,096 held-out images, about 13 min on 2 cores; hawq: 32 probes on
# 2,048 images).
for m in oracle hawq; do
  case " $METHODS " in *" $m "*) ;; *) continue ;; esac
  case "$m" in oracle) how=(--batches 16) ;; hawq) how=(--batches "${HAWQ_BATCHES:-8}" --probes "${HAWQ_PROBES:-32}") ;; esac
  [ -f "$PLANS/$m.json" ] || "${plan[@]}" --method "$m" --budget avg_bits=2.0 "${how[@]}" \
    --out "$PLANS/${m}_measure.yaml" --sensitivities "$PLANS/$m.json" --force
done

plan_file() {  # budget method seed -> the plan file (made when missing)
  local b="$1" m="$2" s="$3" f
  case "$m" in
    oracle|hawq) f="$PLANS/${m}_b${b}.yaml"
                 [ -f "$f" ] || "${plan[@]}" --method file --from-sensitivities "$PLANS/$m.json" \
                   --budget avg_bits="$b" --out "$f" >&2 ;;
    random)      f="$PLANS/random_b${b}_s${s}.yaml"
                 [ -f "$f" ] || "${plan[@]}" --method random --seed "$s" --budget avg_bits="$b" --out "$f" >&2 ;;
    size_greedy|uniform)
                 f="$PLANS/${m}_b${b}.yaml"
                 [ -f "$f" ] || "${plan[@]}" --method "$m" --budget avg_bits="$b" --out "$f" >&2 ;;
  esac
  echo "$f"
}

common=(experiment=cifar10_plan_protocol dataset.root="$ROOT" dataset.subset="$SUBSET" trainer="$TRAINER"
  trainer.precision="$PRECISION" model.init_checkpoint="$FP" model.lr="$LR" trainer.max_epochs="$EPOCHS"
  save_checkpoint=false logger=csv phase=train)

run() {  # name plan seed
  local name="$1" f="$2" s="$3"
  if ls "$OUTPUTS/runs/$name"/*/metrics.json >/dev/null 2>&1; then
    echo "=== $name: done"
    return
  fi
  echo "=== $name ($f) $(date -u +%FT%TZ)"
  "$PY" -m sdq_lightning.train name="$name" "${common[@]}" phase.plan="$f" seed="$s" "${ARGS[@]}"
}

for s in $SEEDS; do            # seeds outermost: an interrupted table still pairs every plan on the seeds it has
  for b in $BUDGETS; do
    for m in $METHODS; do
      run "fixedplan_b${b}_${m}_s${s}_${TAG}" "$(plan_file "$b" "$m" "$s")" "$s"
    done
    for e in ${EXTRA:-}; do          # budget:name=file
      # {seed} in the file name: one plan per seed (e.g. a search run with that seed), trained with that seed
      [ "${e%%:*}" = "$b" ] && { n="${e#*:}"; f="${n#*=}"; run "fixedplan_b${b}_${n%%=*}_s${s}_${TAG}" "${f//\{seed\}/$s}" "$s"; }
    done
  done
done
echo "table: $PY experiments/fixed_plan_table.py $OUTPUTS/runs/fixedplan_*_${TAG}"
