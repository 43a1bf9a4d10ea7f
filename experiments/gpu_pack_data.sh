#!/usr/bin/env bash
# Packs the CIFAR-10 ImageFolder JPEG tree into one gzip tarball inside the repo (.data/cifar10.tar.gz, git-ignored)
# so that the device tool can carry it (`carry: [".data", ".whl"]`). Run HERE, once, before the device call.
#
# Size decision: the tree is 60,000 JPEGs of ~0.9 KB, 55 MiB of content (236 MiB on disk because of 4 KiB blocks).
# Decoded uint8 it would be 60,000 x 3x32x32 = 184 MB, far over the 64 MiB the device tool carries, so the JPEGs
# themselves travel: 52.7 MiB of JPEG bytes, but every file repeats the same ~600-byte header (quantisation and
# Huffman tables), which gzip's window removes, so the tarball of the full train/ + test/ split is 18.7 MiB
# (measured 2026-11-26, 2 s to make). With the repo (<1 MiB) and the Hydra wheels (<1 MiB) that is ~20 MiB of the
# 64 MiB limit: the full data set travels, no subset.
# experiments/gpu_cifar10_resnet20.sh unpacks it to /tmp/sdq_data on the device (a few seconds).
#   CIFAR10_ROOT=../shared/data/cifar10 bash experiments/gpu_pack_data.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="${CIFAR10_ROOT:-../shared/data/cifar10}"
DEST="${DEST:-.data/cifar10.tar.gz}"
LIMIT_MIB="${LIMIT_MIB:-60}"
test -d "$SRC/train" && test -d "$SRC/test" || { echo "error: $SRC has no train/ and test/ (set CIFAR10_ROOT)" >&2; exit 2; }
mkdir -p "$(dirname "$DEST")"
src_abs="$(cd "$SRC" && pwd)"
tmp="$DEST.partial"
# Deterministic member order and metadata, so the tarball's checksum only changes when the data does.
tar -C "$(dirname "$src_abs")" --sort=name --owner=0 --group=0 --numeric-owner --mtime=2009-01-01 \
    -cf - "$(basename "$src_abs")/train" "$(basename "$src_abs")/test" \
    $(cd "$(dirname "$src_abs")" && ls -d "$(basename "$src_abs")/classes.txt" 2>/dev/null) \
  | gzip -6 -n > "$tmp"
mv "$tmp" "$DEST"
mib=$(( $(stat -c %s "$DEST") / 1048576 ))
files=$(tar -tzf "$DEST" | grep -c '\.jpg$' || true)
echo "packed $files JPEGs from $SRC into $DEST: ${mib} MiB"
if (( mib > LIMIT_MIB )); then
  echo "error: $DEST is ${mib} MiB, over ${LIMIT_MIB} MiB: the device tool carries at most 64 MiB in all" >&2
  exit 1
fi
