#!/usr/bin/env bash
# At most about 8 minutes on an H100/H200 (150 + 170 + 2 x 75 s of timeouts): CUDA
# graphs for the quantized training step (sdq_lightning.modules.graphs.GraphedNetwork, what SDQ(compile=
# "cuda-graphs") / sdq.runtime.compile=cuda-graphs runs), with the batched weight pass (SDQ(batched=True), the default).
#   1. the `gpu` tests: no host sync in eager and graphed search/frozen steps (per-layer and batched weights),
#      graphed steps against eager ones, the SDQ callback with compile="cuda-graphs" (search, freeze, KD) against
#      eager, the graphs around the network (teacher, KD, EBR, DBP step: against eager, no sync; all five graphs
#      replayed in the callback);
#   2. benchmarks/bench_step.py at batch 128, bf16: fp / search / frozen eager with batched and per-layer (+pl)
#      weights, then CUDA graphs around each (GRAPH_MODES; BENCH_TIMEOUT, default 170 s);
#   3. the Hydra app, FP and then SDQ with sdq.runtime.compile=cuda-graphs (experiment=cifar10_resnet20: KD + EBR, on-device
#      data, an 8192-image subset, batch 256; FP 2 epochs, SDQ 1 search + 1 frozen epoch), in the same call so that
#      their images/s compare: fp_app_metrics.json and app_metrics.json.
# On a GPU machine with the package installed (make install) and CIFAR-10:
#   CIFAR10_ROOT=/path/to/cifar10 bash benchmarks/gpu_graphs_check.sh
# Writes into $OUT (or benchmarks/results/gpu_graphs/): log.txt, bench_step.md, bench_step.json, fp_app_metrics.json,
# app_metrics.json.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT_DIR="${OUT:-benchmarks/results/gpu_graphs}"
mkdir -p "$OUT_DIR"
PY="${PY:-python3}"
exec > >(tee "$OUT_DIR/log.txt") 2>&1
source experiments/gpu_env.sh

echo "=== 1. gpu tests ($((SECONDS - T0)) s)"
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/unit/test_compile.py \
  tests/unit/test_cuda_graphs.py 2>&1 | tail -40

echo "=== 2. step benchmark ($((SECONDS - T0)) s)"
timeout "${BENCH_TIMEOUT:-170}" "$PY" benchmarks/bench_step.py --device cuda --batch 128 --bf16 --kernels eager \
  --weights both --compile --compile-modes "${GRAPH_MODES:-cuda-graphs,cuda-graphs+pl}" --repeats 7 --steps 20 \
  --warmup 3 \
  --out "$OUT_DIR/bench"
for f in bench_step.md bench_step.json; do [[ -f "$OUT_DIR/bench/$f" ]] && mv "$OUT_DIR/bench/$f" "$OUT_DIR/$f"; done
rmdir "$OUT_DIR/bench" 2>/dev/null

echo "=== 3. the app, FP then SDQ with sdq.runtime.compile=cuda-graphs ($((SECONDS - T0)) s)"
ROOT="$(gpu_data_root)"
if [[ -n "$ROOT" && "${APP:-1}" == 1 ]]; then
  COMMON=(experiment=cifar10_resnet20 trainer=gpu trainer.precision=bf16-mixed dataset.root="$ROOT"
    dataset.download=false dataset.on_device=true dataset.subset=8192 dataset.val_subset=2048 dataset.batch_size=256
    fp_teacher.enabled=false model.init_checkpoint=checkpoints/resnet20_cifar10_fp.pt trainer.max_epochs=2
    trainer.enable_progress_bar=false logger=csv save_checkpoint=false run_test=false)
  timeout "${APP_TIMEOUT:-75}" "$PY" -m sdq_lightning.train "${COMMON[@]}" sdq.enabled=false name=gpu_fp_app \
    hydra.run.dir=/tmp/gpu_fp_run
  cp /tmp/gpu_fp_run/metrics.json "$OUT_DIR/fp_app_metrics.json" 2>/dev/null || echo "no FP app metrics.json"
  timeout "${APP_TIMEOUT:-75}" "$PY" -m sdq_lightning.train "${COMMON[@]}" sdq.teacher=checkpoints/resnet20_cifar10_fp.pt \
    sdq.kd.teacher_arch=resnet20 sdq.ebr.weight=0.1 sdq.runtime.compile=cuda-graphs sdq.runtime.kernels=eager phase.search_epochs=1 \
    name=gpu_graphs hydra.run.dir=/tmp/gpu_graphs_run
  cp /tmp/gpu_graphs_run/metrics.json "$OUT_DIR/app_metrics.json" 2>/dev/null || echo "no app metrics.json"
else
  echo "no data (.data/cifar10.tar.gz or CIFAR10_ROOT) or APP=0: app run skipped"
fi
echo "=== done in $((SECONDS - T0)) s"
