#!/usr/bin/env bash
# Everything measured on a GPU, in one script of at most SESSION_S seconds (default 570):
#   1. benchmarks/gpu_check.sh without its app audit: the `gpu` tests (no host sync in search and frozen steps)
#      and the step benchmark at batch 128 bf16 (eager; whole-model torch.compile in COMPILE_MODES, default none:
#      on an H200 compiling the three models took longer than 130 s, so time the compiled modes in a call of their
#      own: COMPILE_MODES=reduce-overhead BENCH_TIMEOUT=300 APP_AUDIT=0 bash benchmarks/gpu_check.sh), at most
#      BENCH_TIMEOUT (default 130) seconds for the benchmark;
#   2. experiments/gpu_cifar10_resnet20.sh (the paper row: FP then SDQ with KD + EBR, through the Hydra app) with
#      the epochs sized from that benchmark's ms/step (BENCH_JSON) to fill what is left of SESSION_S (default 570)
#      seconds, a SyncAudit window in both runs (AUDIT=1) and the 5 result files (SLIM=1).
# $OUT gets 7 files: gpu_check.log, bench_step.md, log.txt, summary.json, fp/metrics.json, sdq/metrics.json,
# sdq/plan.yaml.
# On your GPU machine: clone the repository, `make install` (or `pip install -e '.[sweep]'`: torch, Lightning,
# timm, Hydra), get CIFAR-10 (an ImageFolder tree train/<class>/*, test/<class>/*, or torchvision's binary
# release) and run from the repository root:
#   CIFAR10_ROOT=/path/to/cifar10 bash experiments/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
SESSION_S="${SESSION_S:-570}"
OUT_DIR="${OUT:-outputs/gpu_session/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT_DIR"
APP_AUDIT=0 COMPILE_MODES="${COMPILE_MODES-}" BENCH_TIMEOUT="${BENCH_TIMEOUT:-130}" OUT="$OUT_DIR" \
  bash benchmarks/gpu_check.sh
BENCH_JSON=/tmp/sdq_bench_step.json
mv "$OUT_DIR/bench_step.json" "$BENCH_JSON" 2>/dev/null || BENCH_JSON=
[[ -d /tmp/site ]] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
echo "=== paper row: $(( SESSION_S - (SECONDS - T0) )) s left"
OUT="$OUT_DIR" TOTAL_S=$(( SESSION_S - (SECONDS - T0) )) BENCH_JSON="$BENCH_JSON" SLIM=1 AUDIT="${AUDIT:-1}" \
  bash experiments/gpu_cifar10_resnet20.sh
