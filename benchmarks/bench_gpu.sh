#!/usr/bin/env bash
# GPU step-time benchmark, under 3 minutes: ResNet20 fp / search / frozen, bf16
# autocast, eager model and whole-model torch.compile, batch 128 and 512; CUDA-synchronised medians of interleaved
# repeats. Writes $OUT/bench_step_b128.md and $OUT/bench_step_b512.md (or benchmarks/results/gpu/ without $OUT).
# On a GPU machine with the package installed (make install): bash benchmarks/bench_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT_DIR"
for b in 128 512; do
  timeout 80 "$PY" benchmarks/bench_step.py --device cuda --batch "$b" --bf16 --kernels eager --compile \
    --repeats 7 --steps 20 --warmup 5 --out "$OUT_DIR/b$b" || echo "batch $b: failed or timed out (rc $?)"
  [ -f "$OUT_DIR/b$b/bench_step.md" ] && cp "$OUT_DIR/b$b/bench_step.md" "$OUT_DIR/bench_step_b$b.md"
done
cat "$OUT_DIR"/bench_step_b*.md 2>/dev/null || true
