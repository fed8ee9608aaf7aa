#!/usr/bin/env bash
# `make gpu-bundle`: packs what `make gpu-check` needs on a GPU machine without network or toolchain into one file:
# the stripped CUDA binaries of `make build-cuda` and the fixtures the device checks read (~30 MB of the 57 MB set).
#   scripts/gpu-bundle.sh [BIN_DIR] [FIXTURES_DIR] [OUT_FILE]
# On the GPU machine:  tar -xJf gpu-bundle.tar.xz && scripts/gpu-check.sh gpu-bundle/bin gpu-bundle/fixtures
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/cuda/release}
FX=${2:-${ULTRAREFINER_SHARED:-../shared}/fixtures}
OUT_FILE=${3:-gpu-bundle.tar.xz}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/gpu-bundle/bin" "$TMP/gpu-bundle/fixtures"
for b in ultrarefiner phase1 phase2 phase3; do
  [[ -x $BIN/$b ]] || { echo "error: $BIN/$b missing (make build-cuda)" >&2; exit 1; }
  cp "$BIN/$b" "$TMP/gpu-bundle/bin/"
done
strip "$TMP"/gpu-bundle/bin/* 2>/dev/null || true
for f in transunet_narrow.safetensors transunet_narrow_io.safetensors sam_narrow.pth sam_narrow_medsam_style.pth \
  sam_narrow_io.safetensors e2e_narrow_io.safetensors; do
  cp "$FX/$f" "$TMP/gpu-bundle/fixtures/"
done
tar -cJf "$OUT_FILE" -C "$TMP" gpu-bundle
ls -l "$OUT_FILE"
