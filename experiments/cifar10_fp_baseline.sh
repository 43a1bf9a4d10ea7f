#!/usr/bin/env bash
# The converged floating-point ResNet-20 for CIFAR-10 that every plan comparison starts from, on a CPU.
#
# Recipe: 80 epochs, one-cycle LR (peak 0.2, 25 % warm-up), SGD with Nesterov momentum 0.9, weight decay 5e-4,
# batch 128, bf16 autocast. 45,000 training images; 5,000 held out (dataset.val_size=5000, class-balanced, fixed
# split) are the validation split every later choice uses; the 10,000 test images are read once, at the end.
# The images are decoded once and batched in memory (dataset.on_device=true on the CPU): each epoch's order and
# augmentation come from seed + epoch, so an interrupted run resumes exactly.
#
#   CIFAR10_ROOT=/path/to/cifar10 bash experiments/cifar10_fp_baseline.sh        # starts, or resumes the last
#                                                                                # unfinished run of this name
# About 65 s per epoch on an idle 2-core machine (about 90 min in all). When the run has finished, its weights
# are saved as checkpoints/resnet20_cifar10_fp.pt (a state dict of the timm backbone, 1.1 MB).
#
# Across machines: `SAVE_UNFINISHED=1 bash experiments/cifar10_fp_baseline.sh` copies the newest unfinished run of NAME
# (config.yaml with dataset.root blanked, metrics.csv, checkpoints/last.ckpt: about 2.3 MB) to
# checkpoints/unfinished/NAME/ and stops; on a machine with no run of NAME under outputs/, the script restores that
# folder and resumes it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${CIFAR10_ROOT:?set CIFAR10_ROOT to the CIFAR-10 ImageFolder tree (train/, test/)}"
EPOCHS="${EPOCHS:-80}"
NAME="${NAME:-cifar10_resnet20_fp}"
OUT_PT="${OUT_PT:-checkpoints/resnet20_cifar10_fp.pt}"
PY="${PY:-.venv/bin/python}"
OUTPUTS="${SDQ_OUTPUT_DIR:-outputs}"
KEEP="checkpoints/unfinished/$NAME"
RESUME=()
LAST=$(ls -td "$OUTPUTS/runs/$NAME"/*/ 2>/dev/null | head -1 || true)
if [ "${SAVE_UNFINISHED:-0}" = 1 ]; then
  if [ -z "$LAST" ] || [ ! -f "$LAST/checkpoints/last.ckpt" ] || [ -f "$LAST/metrics.json" ]; then
    echo "error: no unfinished run of $NAME under $OUTPUTS/runs with a checkpoint to save" >&2; exit 2
  fi
  rm -rf "$KEEP" && mkdir -p "$KEEP/checkpoints"
  cp "$LAST/checkpoints/last.ckpt" "$KEEP/checkpoints/"
  cp "$LAST/metrics.csv" "$KEEP/" 2>/dev/null || true
  sed 's|^\(  root:\).*|\1 null|' "$LAST/config.yaml" > "$KEEP/config.yaml"
  "$PY" - "$KEEP/checkpoints/last.ckpt" <<'PY'
import sys, torch
path = sys.argv[1]  # the checkpoint callback's own folders name this machine: not kept
ckpt = torch.load(path, map_location="cpu", weights_only=False)
for state in ckpt.get("callbacks", {}).values():
    for key in ("dirpath", "best_model_path", "last_model_path", "kth_best_model_path"):
        if isinstance(state, dict) and isinstance(state.get(key), str):
            state[key] = ""
torch.save(ckpt, path)
PY
  echo "copied $LAST to $KEEP (commit it; the next sitting resumes from it)"
  exit 0
fi
if [ -z "$LAST" ] && [ -f "$KEEP/checkpoints/last.ckpt" ]; then
  LAST="$OUTPUTS/runs/$NAME/restored/"
  mkdir -p "$LAST" && cp -r "$KEEP"/. "$LAST"
  echo "restored $KEEP to $LAST"
fi
if [ -n "$LAST" ] && [ -f "$LAST/checkpoints/last.ckpt" ] && [ ! -f "$LAST/metrics.json" ]; then
  echo "resuming $LAST"
  RESUME=("resume=$LAST")
fi
$PY -m sdq_lightning.train name="$NAME" sdq.enabled=false \
  dataset=imagefolder dataset.root="$ROOT" dataset.image_size=32 \
  'dataset.mean=[0.4914,0.4822,0.4465]' 'dataset.std=[0.2470,0.2435,0.2616]' \
  dataset.val_size=5000 dataset.on_device=true dataset.batch_size=128 \
  model.scheduler=onecycle model.lr=0.2 model.weight_decay=5e-4 trainer.max_epochs="$EPOCHS" \
  trainer.precision=bf16-mixed trainer.enable_progress_bar=false logger=csv "${RESUME[@]}" "$@"
RUN=$(ls -td "$OUTPUTS/runs/$NAME"/*/ | head -1)
test -f "$RUN/metrics.json" || { echo "the run in $RUN did not finish; run this script again to resume it"; exit 1; }
$PY - "$RUN" "$OUT_PT" <<'PY'
import sys, torch
run, out = sys.argv[1], sys.argv[2]
state = torch.load(f"{run}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
torch.save(state, out)
print(f"saved {out} from {run}checkpoints/last.ckpt")
PY
