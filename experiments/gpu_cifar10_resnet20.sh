#!/usr/bin/env bash
# The paper's CIFAR-10 row on one GPU in a fixed wall-time budget (TOTAL_S, default 510 s):
# ResNet-20, weights searched in 1..8 bits under avg_bits <= 1.93, FP activations, FP teacher + KD, EBR.
#   1. FP ResNet-20 (one-cycle, lr 0.2)                          guard trainer.max_time=FP_MAX_TIME (2:30)
#   2. SDQ from the FP weights, KD from the FP model, EBR 0.1      guard trainer.max_time=SDQ_MAX_TIME (4:15)
# both through the Hydra app (experiment=cifar10_resnet20), bf16-mixed, data decoded once and kept on the GPU
# (dataset.on_device=true: batched crop/flip/normalise there). Prints images/s and accuracy of both runs and copies
# metrics.json, plan.yaml and report.md of each, summary.json and log.txt into $OUT (8 files).
#
# On your GPU machine: clone the repository, `make install` (or `pip install -e '.[sweep]'`: torch, Lightning,
# timm, Hydra), get CIFAR-10 (an ImageFolder tree train/<class>/*, test/<class>/*, or torchvision's binary
# release) and run from the repository root:
#   CIFAR10_ROOT=/path/to/cifar10 bash experiments/gpu_cifar10_resnet20.sh
# A machine without internet: Hydra's wheels in .whl/ (experiments/gpu_wheels.sh) and the data as
# .data/cifar10.tar.gz (experiments/gpu_pack_data.sh), both made on a machine that has them, are used when present.
#
# Measured on an H200 (docs/RESULTS.md section 17): FP 4.5 s/epoch, SDQ about 35 s per search epoch and 16 s per
# frozen epoch. The cosine/one-cycle schedules are set from the epoch counts, so max_time is only a guard: if it
# stops a run early, its summary says so (epochs < planned); lower the epochs then. Env overrides: FP_EPOCHS
# SDQ_EPOCHS SEARCH_EPOCHS FP_MAX_TIME SDQ_MAX_TIME BATCH FP_LR SDQ_LR TOTAL_S CIFAR10_ROOT PY WORK OUT.
#
# SDQ_GPU_PROTOCOL_CPU_SMOKE=1: the same commands on the CPU with tiny limits (trainer=cpu, fp32, subset=256,
# batch 32, FP 1 epoch, SDQ 1 search epoch (freezes the plan) + 1 train epoch): the test tests/integration/test_gpu_protocol.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
SMOKE="${SDQ_GPU_PROTOCOL_CPU_SMOKE:-0}"
WORK="${WORK:-outputs/gpu_protocol/$(date -u +%Y%m%dT%H%M%SZ)}"
OUT_DIR="${OUT:-$WORK/out}"
if [[ -z "${PY:-}" ]]; then PY=python3; [[ -x .venv/bin/python ]] && PY=.venv/bin/python; fi
mkdir -p "$WORK" "$OUT_DIR/fp" "$OUT_DIR/sdq"
WORK="$(cd "$WORK" && pwd)"
exec > >(tee "$OUT_DIR/log.txt") 2>&1
echo "=== gpu_cifar10_resnet20 $(date -u +%FT%TZ) smoke=$SMOKE work=$WORK out=$OUT_DIR"

# --- Python packages: the GPU image has torch/lightning/timm, not Hydra (wheels from experiments/gpu_wheels.sh).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  compgen -G ".whl/*.whl" >/dev/null || { echo "error: Hydra is missing and .whl/ is empty: install Hydra (make install) or put its wheels in .whl/ (experiments/gpu_wheels.sh)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" -c "import torch, lightning, timm, hydra; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'hydra', hydra.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# --- Data: CIFAR10_ROOT, else .data/cifar10 (a tree), else .data/cifar10.tar.gz unpacked to /tmp.
ROOT="${CIFAR10_ROOT:-}"
if [[ -z "$ROOT" ]]; then
  if [[ -d .data/cifar10/train ]]; then ROOT=.data/cifar10
  elif [[ -f .data/cifar10.tar.gz ]]; then
    mkdir -p /tmp/sdq_data && tar -xzf .data/cifar10.tar.gz -C /tmp/sdq_data || exit 2
    ROOT=/tmp/sdq_data/cifar10
  else echo "error: no data: set CIFAR10_ROOT=/path/to/cifar10 (or put .data/cifar10.tar.gz from experiments/gpu_pack_data.sh)" >&2; exit 2; fi
fi
echo "data: $ROOT after $((SECONDS - T0)) s"

# --- Schedule. With BENCH_JSON (benchmarks/bench_step.py --device cuda ... output, same call), the epoch counts
# that fill FP_S / SDQ_S seconds are computed from the measured ms/step (measure throughput first, then size).
if [[ "$SMOKE" == 1 ]]; then
  hw=(trainer=cpu trainer.precision=32-true dataset.subset=256 dataset.num_workers=0)
  BATCH=32 FP_EPOCHS=1 SDQ_EPOCHS=2 SEARCH_EPOCHS=1 FP_MAX_TIME=00:00:02:00 SDQ_MAX_TIME=00:00:02:00 TOTAL_S="${TOTAL_S:-300}"
else
  hw=(trainer=gpu trainer.precision=bf16-mixed dataset.num_workers=8 sdq.runtime.kernels="${KERNELS:-eager}")
  BATCH="${BATCH:-256}" TOTAL_S="${TOTAL_S:-510}"
  if [[ -n "${BENCH_JSON:-}" && -f "${BENCH_JSON}" && -z "${FP_EPOCHS:-}" ]]; then
    read -r FP_EPOCHS SDQ_EPOCHS SEARCH_EPOCHS FP_MAX_TIME SDQ_MAX_TIME FP_KILL < <("$PY" - "$BENCH_JSON" "$BATCH" \
      "${FP_S:-$(( (TOTAL_S - (SECONDS - T0) - 90) * 40 / 100 ))}" \
      "${SDQ_S:-$(( (TOTAL_S - (SECONDS - T0) - 90) * 60 / 100 ))}" <<'PY'
import json, statistics, sys
bench, batch, fp_s, sdq_s = json.load(open(sys.argv[1])), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
ms = {m: statistics.median(bench["eager"][m]) for m in ("fp", "search", "frozen")}
steps = 50000 // batch
# app step at `batch` over the benchmark's raw step at 128, measured on an H200 (2026-11-27, batch 256, see
# docs/RESULTS.md section 17): FP 1.42, search 1.07, frozen 1.24 (the quantized steps are launch-bound: a larger batch
# costs them little); 10 % margin on top
scale_fp, scale_q = 1.55 * max(batch / 256, 1.0), 1.4 * max(batch / 256, 1.0) ** 0.5
val = 2.0                                       # validation of 10,000 images and epoch-end work, seconds
fp_epoch = steps * ms["fp"] * scale_fp / 1e3 + val
kd = 0.5 * ms["fp"]                             # the teacher's forward (KD)
search_epoch = steps * (ms["search"] + kd) * scale_q / 1e3 + val
frozen_epoch = steps * (ms["frozen"] + kd) * scale_q / 1e3 + val
fp_epochs = int(min(max(fp_s // fp_epoch, 5), 80))
n = 2
for total in range(2, 81):  # the longest SDQ schedule, a quarter of it searching, that fits sdq_s
    if max(total // 4, 1) * search_epoch + (total - max(total // 4, 1)) * frozen_epoch <= sdq_s:
        n = total
s = max(n // 4, 1)
hms = lambda t: f"00:00:{int(t) // 60:02d}:{int(t) % 60:02d}"
print(fp_epochs, n, s, hms(fp_s * 1.25 + 30), hms(sdq_s * 1.25 + 30), int(fp_s * 1.25 + 90))
print(f"sizing: ms/step at batch 128 {ms}; est. s/epoch fp {fp_epoch:.1f}, search {search_epoch:.1f}, "
      f"frozen {frozen_epoch:.1f} at batch {batch}", file=sys.stderr)
PY
)
  fi
  FP_EPOCHS="${FP_EPOCHS:-30}" SDQ_EPOCHS="${SDQ_EPOCHS:-18}" SEARCH_EPOCHS="${SEARCH_EPOCHS:-6}"
  FP_MAX_TIME="${FP_MAX_TIME:-00:00:02:30}" SDQ_MAX_TIME="${SDQ_MAX_TIME:-00:00:04:15}"
fi
audit=()
if [[ "${AUDIT:-0}" == 1 ]]; then  # count the host-device syncs of 20 training steps (printed in the log)
  audit=("+callbacks.sync_audit._target_=sdq_lightning.utils.sync_audit.SyncAudit" +callbacks.sync_audit.start=30)
fi
common=(experiment=cifar10_resnet20 "${hw[@]}" dataset.root="$ROOT" dataset.download=false
  dataset.in_memory=true dataset.on_device=true dataset.batch_size="$BATCH"
  fp_teacher.enabled=false save_checkpoint=true trainer.enable_progress_bar=false trainer.log_every_n_steps=50 logger=csv
  "${audit[@]}")
left() { echo $(( TOTAL_S - (SECONDS - T0) )); }

# --- 1. FP teacher.
echo "=== FP: $FP_EPOCHS epochs, max_time $FP_MAX_TIME, $(left) s left"
FP_KILL="${FP_KILL:-$(( $(left) - 200 ))}"  # hard stop of the FP run (max_time is the soft one)
timeout --signal=INT --kill-after=10 "$(( FP_KILL > 60 ? FP_KILL : 60 ))" \
  "$PY" -m sdq_lightning.train "${common[@]}" name=gpu_c10_r20_fp hydra.run.dir="$WORK/fp" sdq.enabled=false \
  model.scheduler=onecycle model.lr="${FP_LR:-$(awk "BEGIN{print 0.2*$BATCH/128}")}" trainer.max_epochs="$FP_EPOCHS" trainer.max_time="$FP_MAX_TIME"
fp_rc=$?
FP_PT="$WORK/fp/resnet20_fp.pt"
"$PY" - "$WORK/fp" "$FP_PT" <<'PY' || fp_rc=3
import glob, sys, torch
ckpt = sorted(glob.glob(f"{sys.argv[1]}/checkpoints/*.ckpt"))[-1]
state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
torch.save({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, sys.argv[2])
print(f"FP weights: {sys.argv[2]}")
PY

# --- 2. SDQ (search 1..8 bits, avg_bits <= 1.93 from the experiment, FP activations, KD from FP, EBR).
sdq_rc=9
if [[ $fp_rc == 0 ]]; then
  echo "=== SDQ: $SDQ_EPOCHS epochs ($SEARCH_EPOCHS search), max_time $SDQ_MAX_TIME, $(left) s left"
  timeout --signal=INT --kill-after=10 "$(( $(left) - 20 > 30 ? $(left) - 20 : 30 ))" \
    "$PY" -m sdq_lightning.train "${common[@]}" name=gpu_c10_r20_sdq hydra.run.dir="$WORK/sdq" \
    model.init_checkpoint="$FP_PT" sdq.teacher="$FP_PT" sdq.kd.teacher_arch=resnet20 sdq.ebr.weight=0.1 \
    model.scheduler=cosine model.lr="${SDQ_LR:-$(awk "BEGIN{print 0.02*$BATCH/128}")}" trainer.max_epochs="$SDQ_EPOCHS" \
    phase.search_epochs="$SEARCH_EPOCHS" trainer.max_time="$SDQ_MAX_TIME"
  sdq_rc=$?
fi

# --- Results: print, then copy into $OUT (at most 8 files, 1 folder deep).
for run in fp sdq; do
  files="metrics.json plan.yaml report.md"
  [[ "${SLIM:-0}" == 1 ]] && { files=metrics.json; [[ $run == sdq ]] && files="metrics.json plan.yaml"; }
  for f in $files; do [[ -f "$WORK/$run/$f" ]] && cp "$WORK/$run/$f" "$OUT_DIR/$run/$f"; done
done
"$PY" - "$WORK" "$OUT_DIR/summary.json" "$FP_EPOCHS" "$SDQ_EPOCHS" "$fp_rc" "$sdq_rc" "$((SECONDS - T0))" <<'PY'
import json, sys
from pathlib import Path
work, dest, planned, rcs, wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3:5], sys.argv[5:7], int(sys.argv[7])
rows = {}
for run, plan_epochs, rc in zip(("fp", "sdq"), planned, rcs):
    p = work / run / "metrics.json"
    m = json.loads(p.read_text()) if p.is_file() else {}
    rows[run] = {"rc": int(rc), "epochs_planned": int(plan_epochs), "epochs": m.get("epochs"),
                 **{k: m.get(k) for k in ("test/acc", "val/acc", "avg_bits", "budget_met", "train_images_per_s",
                                          "wall_time_s")}}
summary = {"runs": rows, "script_wall_s": wall}
Path(dest).write_text(json.dumps(summary, indent=2))
print(f"\n{'run':4s} {'rc':>3s} {'epochs':>9s} {'test/acc':>9s} {'avg_bits':>8s} {'images/s':>10s} {'wall s':>7s}")
for run, r in rows.items():
    acc = "-" if r["test/acc"] is None else f"{100 * r['test/acc']:.2f}%"
    bits = "-" if r["avg_bits"] is None else f"{r['avg_bits']:.3f}"
    ips = "-" if r["train_images_per_s"] is None else f"{r['train_images_per_s']:.0f}"
    ep = f"{r['epochs']}/{r['epochs_planned']}"
    print(f"{run:4s} {r['rc']:>3d} {ep:>9s} {acc:>9s} {bits:>8s} {ips:>10s} {r['wall_time_s'] or '-':>7}")
print(f"script wall: {wall} s")
PY
echo "=== done in $((SECONDS - T0)) s: fp rc=$fp_rc sdq rc=$sdq_rc; files in $OUT_DIR"
[[ $fp_rc == 0 && $sdq_rc == 0 ]]
