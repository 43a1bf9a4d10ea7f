#!/usr/bin/env bash
# The search against its controls on one GPU, with a longer schedule than a CPU allows.
# Rows (experiments/cifar10_compare.sh, all without KD, FP activations, avg_bits <= 2.0, from
# checkpoints/resnet20_cifar10_fp.pt, the full training set): sdq_nokd budget_only projection_only size_greedy random uniform2,
# seeds SEEDS (default "0 1"), EPOCHS (default 6) with SEARCH (default 3) search epochs (the CPU table: 4 and 2),
# batch 128 at lr 0.02 as on the CPU, bf16, on-device data, sdq.runtime.compile=cuda-graphs. Every run is its own process
# and all run AT ONCE (16 cores decode the data in parallel; the GPU interleaves the graphed steps); each stops
# training at MAX_TIME (default 00:00:07:00, then tests: its metrics.json says how many epochs it ran) and is killed
# after RUN_TIMEOUT seconds (default 480).
# On your GPU machine: clone the repository, `make install` (or `pip install -e '.[sweep]'`: torch, Lightning,
# timm, Hydra), get CIFAR-10 (an ImageFolder tree train/<class>/*, test/<class>/*, or torchvision's binary
# release) and run from the repository root:
#   CIFAR10_ROOT=/path/to/cifar10 bash experiments/gpu_controls.sh      (each run stops training at MAX_TIME)
# $OUT gets log.txt and runs.tar.gz (one log per run and, per run, metrics.json, history.json and plan.yaml under
# runs/c10cmp_<row>_<tag>/<run>/): unpack it and run python experiments/controls_table.py runs/c10cmp_*
# SDQ_GPU_CONTROLS_CPU_SMOKE=1: the same on the CPU with a 256-image subset, 2 epochs (1 search), batch 32.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
SMOKE="${SDQ_GPU_CONTROLS_CPU_SMOKE:-0}"
OUT_DIR="${OUT:-outputs/gpu_controls/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT_DIR/runs"
exec > >(tee "$OUT_DIR/log.txt") 2>&1
if [[ -z "${PY:-}" ]]; then PY=python3; [[ -x .venv/bin/python ]] && PY=.venv/bin/python; fi
export OMP_NUM_THREADS=1 PY
source experiments/gpu_env.sh
ROOT="$(gpu_data_root)"
[[ -n "$ROOT" ]] || { echo "error: no data: set CIFAR10_ROOT=/path/to/cifar10 (or put .data/cifar10.tar.gz from experiments/gpu_pack_data.sh)" >&2; exit 2; }
export CIFAR10_ROOT="$ROOT"
if [[ "$SMOKE" == 1 ]]; then
  knobs=(EPOCHS=2 SEARCH=1 BATCH=32 LR=0.02 TRAINER=cpu ON_DEVICE=false COMPILE=null WORKERS=0 SUBSET=256)
  extra=(dataset.val_subset=256 run_test=false)
else
  knobs=(EPOCHS="${EPOCHS:-6}" SEARCH="${SEARCH:-3}" BATCH="${BATCH:-128}" LR="${LR:-0.02}" TRAINER=gpu
         ON_DEVICE=true COMPILE="${COMPILE:-cuda-graphs}" WORKERS=0 SUBSET=null)
  extra=(sdq.runtime.kernels=eager trainer.max_time="${MAX_TIME:-00:00:07:00}")
fi
# EXTRA: more app overrides for every run, e.g. EXTRA="sdq.freeze.rounding=budget" TAG=gpu_budget (a separate tag keeps
# the run folders apart)
read -r -a more <<<"${EXTRA:-}"
extra+=("${more[@]}")
TAG="${TAG:-gpu}"
echo "=== gpu_controls $(date -u +%FT%TZ) smoke=$SMOKE ${knobs[*]} tag=$TAG"
pids=()
for seed in ${SEEDS:-0 1}; do
  for row in ${ROWS:-sdq_nokd budget_only projection_only size_greedy random uniform2}; do
    env "${knobs[@]}" SEED="$seed" ROWS="$row" TAG="$TAG" timeout "${RUN_TIMEOUT:-480}" \
      bash experiments/cifar10_compare.sh "${extra[@]}" >"$OUT_DIR/${row}_s${seed}.log" 2>&1 &
    pids+=($!)
  done
done
fails=0
for p in "${pids[@]}"; do wait "$p" || fails=$((fails + 1)); done
echo "=== all runs ended after $((SECONDS - T0)) s, $fails failed"
for top in outputs/runs/c10cmp_*_"$TAG"*; do
  [[ -d "$top" ]] || continue
  for run in "$top"/*/; do
    [[ -f "$run/metrics.json" ]] || continue
    dst="$OUT_DIR/runs/$(basename "$top")/$(basename "$run")"
    mkdir -p "$dst" && cp "$run"/{metrics.json,history.json,plan.yaml} "$dst"/ 2>/dev/null
  done
done
for f in "$OUT_DIR"/*_s*.log; do echo "--- $(basename "$f"): $(grep -E 'test/acc|froze the plan|error' "$f" | tail -3)"; done
"$PY" experiments/controls_table.py "$OUT_DIR"/runs/c10cmp_* 2>&1 | tail -30
# the run folders and logs as one archive, easy to copy off the GPU machine
tar -czf "$OUT_DIR/runs.tar.gz" -C "$OUT_DIR" runs $(cd "$OUT_DIR" && ls ./*_s*.log) && rm -rf "$OUT_DIR"/runs "$OUT_DIR"/*_s*.log
echo "=== done in $((SECONDS - T0)) s"
