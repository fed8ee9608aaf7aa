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
step "Phase 1: TransUNet, fold 0"
# The tiny preset's Phase 1 defaults (12 epochs, batch 4, base LR 0.05; configs/tiny.toml says why) apply.
"$BIN/phase1" --config "$CONFIG" --data-root "$DEMO_DIR/processed" --dataset PHANTOM --fold 0 \
  ${PHASE1_EPOCHS:+--max-epochs "$PHASE1_EPOCHS"} \
  --output-dir "$DEMO_DIR/checkpoints/transunet" --resume auto --device cpu --plain
step "failure simulation for Phase 2 (480 samples at the tiny TransUNet grid, fold 0's validation images excluded)"
"$UR" augment synthetic --processed-root "$DEMO_DIR/processed" --datasets PHANTOM \
  --output-root "$DEMO_DIR/augmented" --target-samples 480 --exclude-fold 0 --store-size 96 --resume
step "Phase 2: SAM refiner on simulated failures"
# ROI crop (SPEC §7.7) in Phases 2 and 3: the tiny SAM (256 px input, 16×16 token grid, 64×64 low-res masks) sees a
# 96-px image, so one token covers 6×6 TransUNet pixels and the refined logits live on a grid coarser than the coarse
# mask itself (64 < 96). The phantom lesions are small: median equivalent diameter 21 px at 96 (5.6–35 px over the 26
# fold-0 training images), i.e. ~3.5 tokens across; in the paper geometry (224 → 1024, 64×64 tokens, 256×256 low-res
# masks) a token covers 3.5×3.5 TransUNet pixels. The crop (≥ 64 px of the 256 grid around the coarse mask, SPEC §7.7)
# zooms the lesion ≈ 2.5–4×.
# Measured on the seed-7 demo (fold-0 validation, 6 images, best Phase 3 epoch): whole image: baseline 0.7804,
# coarse 0.7835, refined 0.7729 (−0.011); ROI crop: baseline 0.7804, coarse 0.7876, refined 0.7903 (+0.003; per-image
# mean +0.028); Phase 2 validation (synthetic, 3 held-out sources) +0.028 → +0.044; test split +0.005 → +0.015.
# Other phantom seeds with ROI crop (baseline / coarse / refined): SEED=8 0.6156 / 0.6211 / 0.6405, SEED=9 0.8641 /
# 0.8642 / 0.8665, SEED=10 0.8119 / 0.8048 / 0.8269, SEED=11 0.8125 / 0.8126 / 0.8370 (whole image: SEED=8 0.6156 /
# 0.6104 / 0.6412, SEED=9 0.8641 / 0.8613 / 0.8568). Test split, coarse → refined: seeds 7–11 0.7727 → 0.7872,
# 0.7295 → 0.6927 (one small under-segmented lesion erased), 0.7256 → 0.7335, 0.7344 → 0.7516, 0.8505 → 0.8447. The margins at seeds 7 and 9 (+0.002–0.003) are within the noise of a 6-image fold: measured and not
# kept (seed 7, refined − coarse at the best epoch): Phase 3 SAM LR 3e-4 −0.004; 6 Phase 3 epochs +0.001 (seed 8
# +0.021, seed 9 +0.013); augment --critical-fraction 0.12 (12% of the Phase 1 fold-0 training masks have Dice < 0.6)
# −0.001; augment --temperature 2-5 (transition band 0.1 < P < 0.9 of the stored masks 10 px at 96, as the Phase 1
# probabilities' 9 px, instead of 14 px) +0.002.
# Cost: the encoder runs on the crop in every step (no embedding cache): Phase 2 at one thread 39 → 65 CPU s.
ROI=(--use-roi-crop)
[ "${ROI_CROP:-1}" = 0 ] && ROI=()
# No pretrained SAM is downloaded: the tiny SAM starts from random weights, hence a higher LR than the paper's 1e-4
# (measured: 1e-4 × 2 epochs leaves refined Dice ≈ 0.07; 2e-3 × 3 epochs (≈300 steps) lifts it above the coarse input).
"$BIN/phase2" --config "$CONFIG" --data-root "$DEMO_DIR/augmented" --processed-root "$DEMO_DIR/processed" \
  --dataset PHANTOM --sam-checkpoint random --transunet-img-size 96 --lr "${PHASE2_LR:-2e-3}" \
  --epochs "${PHASE2_EPOCHS:-3}" "${ROI[@]}" --output-dir "$DEMO_DIR/checkpoints/sam_finetuned" --resume auto --device cpu --plain
sam_best=$(ls "$DEMO_DIR"/checkpoints/sam_finetuned/PHANTOM*/best_sam.safetensors | head -n 1)
step "Phase 3: end to end, fold 0"
"$BIN/phase3" --config "$CONFIG" --data-root "$DEMO_DIR/processed" --dataset PHANTOM --fold 0 \
  --transunet-checkpoint "$DEMO_DIR/checkpoints/transunet/PHANTOM/fold_0/best.safetensors" \
  --sam-checkpoint "$sam_best" --max-epochs "${PHASE3_EPOCHS:-3}" --sam-lr 1e-3 --transunet-lr 1e-5 \
  --refined-loss-size 96 "${ROI[@]}" --output-dir "$DEMO_DIR/checkpoints/ultra_refiner" --resume auto --device cpu --plain
step "evaluate on the phantom test split"
"$UR" evaluate --config "$CONFIG" --data-root "$DEMO_DIR/processed" --datasets PHANTOM --split test \
  --checkpoint "$DEMO_DIR/checkpoints/ultra_refiner/PHANTOM/fold_0/best.safetensors" \
  --output-dir "$DEMO_DIR/results" --visualize --device cpu | tee "$DEMO_DIR/evaluate.log"
echo "pictures: $DEMO_DIR/results/summary.png, $DEMO_DIR/results/PHANTOM/visualizations/,"
echo "          $DEMO_DIR/checkpoints/{transunet,ultra_refiner}/PHANTOM/fold_0/progress.png"
echo "demo finished in $(( $(date +%s) - start )) s"
tail -n 1 "$DEMO_DIR/evaluate.log" | grep '^demo:' || true
