#!/usr/bin/env bash
# What to check first on a GPU machine (about 4 minutes on an H100/H200).
#   1. the `gpu`-marked tests (search and frozen training steps under torch.cuda.set_sync_debug_mode("error"));
#   2. benchmarks/bench_step.py at batch 128, bf16 autocast: fp / search / frozen, eager model, then the whole
#      model under torch.compile(fullgraph=True) in the modes of COMPILE_MODES (default "default,reduce-overhead";
#      reduce-overhead = CUDA graphs; empty: eager only), stopped after BENCH_TIMEOUT seconds (default 200);
#   3. the Hydra app (experiment=cifar10_resnet20: KD from the FP checkpoint + EBR, on-device data, 4096-image
#      subset, 1 search epoch + 1 frozen epoch) with two SyncAudit windows (search, frozen): every host-device
#      synchronisation of the app's training step, by call site (APP_AUDIT=0 skips it).
# On a GPU machine with the package installed (make install) and CIFAR-10:
#   CIFAR10_ROOT=/path/to/cifar10 bash benchmarks/gpu_check.sh
# Writes into $OUT (or benchmarks/results/gpu/): gpu_check.log, bench_step.md, bench_step.json, sync_search.json,
# sync_frozen.json.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT_DIR="${OUT:-benchmarks/results/gpu}"
COMPILE_MODES="${COMPILE_MODES-default,reduce-overhead}"
mkdir -p "$OUT_DIR"
PY="${PY:-python3}"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
source experiments/gpu_env.sh

echo "=== 1. gpu tests ($((SECONDS - T0)) s)"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/unit/test_compile.py

echo "=== 2. step benchmark ($((SECONDS - T0)) s)"
timeout "${BENCH_TIMEOUT:-200}" "$PY" benchmarks/bench_step.py --device cuda --batch 128 --bf16 --kernels eager \
  ${COMPILE_MODES:+--compile --compile-modes "$COMPILE_MODES"} --repeats 7 --steps 20 --warmup 3 --out "$OUT_DIR/bench"
for f in bench_step.md bench_step.json; do [[ -f "$OUT_DIR/bench/$f" ]] && mv "$OUT_DIR/bench/$f" "$OUT_DIR/$f"; done
rmdir "$OUT_DIR/bench" 2>/dev/null

echo "=== 3. app sync audit ($((SECONDS - T0)) s)"
ROOT="${CIFAR10_ROOT:-}"
if [[ "${APP_AUDIT:-1}" == 1 && -z "$ROOT" && -f .data/cifar10.tar.gz ]]; then
  mkdir -p /tmp/sdq_data && tar -xzf .data/cifar10.tar.gz -C /tmp/sdq_data && ROOT=/tmp/sdq_data/cifar10
fi
if [[ "${APP_AUDIT:-1}" != 1 ]]; then
  echo "APP_AUDIT=${APP_AUDIT:-}: app audit skipped"
elif [[ -n "$ROOT" ]]; then
  audit=sdq_lightning.utils.sync_audit.SyncAudit
  timeout 150 "$PY" -m sdq_lightning.train experiment=cifar10_resnet20 trainer=gpu trainer.precision=bf16-mixed \
    dataset.root="$ROOT" dataset.download=false dataset.on_device=true dataset.subset=4096 dataset.val_subset=1024 \
    fp_teacher.enabled=false model.init_checkpoint=checkpoints/resnet20_cifar10_fp.pt \
    sdq.teacher=checkpoints/resnet20_cifar10_fp.pt sdq.kd.teacher_arch=resnet20 sdq.ebr.weight=0.1 \
    trainer.max_epochs=2 phase.search_epochs=1 trainer.enable_progress_bar=false logger=csv save_checkpoint=false \
    run_test=false name=gpu_check hydra.run.dir=/tmp/gpu_check_run \
    "+callbacks.audit_search._target_=$audit" +callbacks.audit_search.start=5 +callbacks.audit_search.steps=20 \
    "+callbacks.audit_search.out=$OUT_DIR/sync_search.json" \
    "+callbacks.audit_frozen._target_=$audit" +callbacks.audit_frozen.start=38 +callbacks.audit_frozen.steps=20 \
    "+callbacks.audit_frozen.out=$OUT_DIR/sync_frozen.json"
else
  echo "no data (.data/cifar10.tar.gz or CIFAR10_ROOT): app audit skipped"
fi
echo "=== done in $((SECONDS - T0)) s"
