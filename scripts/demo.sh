#!/usr/bin/env bash
# `make demo`: the method end to end on the built-in phantom dataset, `tiny` preset, CPU (SPEC §1.4, issue 10).
# Every artefact goes under $DEMO_DIR (default ./demo); rerunning resumes/skips finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
DEMO_DIR=${DEMO_DIR:-demo}
CONFIG=${CONFIG:-tiny}
SEED=${SEED:-7}
UR="$BIN/ultrarefiner"
start=$(date +%s)
step() { printf '\n=== demo: %s (%ds)\n' "$1" "$(( $(date +%s) - start ))"; }

step "phantom dataset (48 images, BUSI layout)"
"$UR" prepare phantom --out "$DEMO_DIR/raw/PHANTOM" --count 48 --seed "$SEED" --size-h 112-144 --size-w 128-176
step "prepare + verify"
"$UR" prepare datasets --raw-root "$DEMO_DIR/raw" --output-root "$DEMO_DIR/processed" --datasets PHANTOM
"$UR" prepare verify --output-root "$DEMO_DIR/processed"
step "failure simulation for Phase 2 (480 samples)"
"$UR" augment synthetic --processed-root "$DEMO_DIR/processed" --datasets PHANTOM \
  --output-root "$DEMO_DIR/augmented" --target-samples 480 --exclude-fold 0
step "Phase 1: TransUNet, fold 0"
"$BIN/phase1" --config "$CONFIG" --data-root "$DEMO_DIR/processed" --dataset PHANTOM --fold 0 \
  --output-dir "$DEMO_DIR/checkpoints/transunet" --resume auto --device cpu
echo "demo finished in $(( $(date +%s) - start )) s"
