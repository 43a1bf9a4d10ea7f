#!/usr/bin/env bash
# Packs the CIFAR-10 ImageFolder JPEG tree into one gzip tarball inside the repo (.data/cifar10.tar.gz, git-ignored),
# to copy the data to a GPU machine in one file: the 60,000 JPEGs (52.7 MiB, each repeating the same ~600-byte
# header, which gzip removes) make an 18.7 MiB tarball (2 s to make). Run it where the data is; the GPU scripts
# unpack it to /tmp/sdq_data (a few seconds) when CIFAR10_ROOT is not set.
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
  echo "error: $DEST is ${mib} MiB, over LIMIT_MIB=${LIMIT_MIB} MiB: is $SRC the CIFAR-10 tree?" >&2
  exit 1
fi
