#!/usr/bin/env bash
# `make gpu-check` (SPEC §17.1 "device checks"): one script for a machine with an NVIDIA GPU. It needs no network
# and builds nothing: it runs the binaries of `make build-cuda` and reads the reference fixtures.
#
#   scripts/gpu-check.sh [BIN_DIR] [FIXTURES_DIR]
#     BIN_DIR       folder with ultrarefiner, phase1, phase2, phase3 built with --features cuda
#                   (default: target/cuda/release, then target/release)
#     FIXTURES_DIR  the fixture folder (default: $ULTRAREFINER_SHARED/fixtures, ../shared/fixtures, shared/fixtures)
#   Environment: OUT (results folder, default gpu-check-results), DEVICE (default cuda:0), QUICK=1 (skip benches),
#   TOTAL_LIMIT (seconds for all steps, default 570; a step never runs past it, later steps are skipped).
#
# Steps, each with its own time limit, all within TOTAL_LIMIT (expected 4-6 minutes on an H100):
#   1. environment: nvidia-smi, binary versions, that the binaries load CUDA at run time;
#   2. `ultrarefiner gpu-check`: CPU/GPU agreement of every model forward and backward at `narrow`
#      (TransUNet eval + train, SAM encoder f32, bf16 vs f32 encoder, SAM decoder + gradients, end-to-end Phase 3 loss
#      + gradients, embedding-cache round trip), SPEC §17.3 tolerances;
#   3. one training epoch per phase on CUDA at the `tiny` preset, on a phantom dataset generated on the spot;
#   4. `ultrarefiner bench` at `paper`: sam-encoder-forward (bf16, batch 1 and 8; f32 batch 1),
#      sam-decoder-train-step (batch 4), transunet-train-step (batch 24), phase3-step (batch 8; an unknown
#      workload is reported as skipped) and e2e-train-step (batch 8);
#   5. summary.txt / summary.json with every step's status and time, the targets of issue 11 (encoder >= 40
#      images/s in bf16 at batch 8; Phase 2 at batch 4 and Phase 3 at batch 8 within 24 GB of GPU memory).
# Exit status: 0 when every step passed (skips allowed), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${1:-}
if [[ -z $BIN ]]; then
  for d in target/cuda/release target/release; do
    [[ -x $d/ultrarefiner ]] && BIN=$d && break
  done
fi
FX=${2:-}
if [[ -z $FX ]]; then
  for d in "${ULTRAREFINER_SHARED:-/nonexistent}/fixtures" ../shared/fixtures shared/fixtures; do
    [[ -f $d/sam_narrow.pth ]] && FX=$d && break
  done
fi
OUT=${OUT:-gpu-check-results}
DEVICE=${DEVICE:-cuda:0}
TOTAL_LIMIT=${TOTAL_LIMIT:-570}   # seconds for all steps together (SPEC §17.1: within 10 minutes)
mkdir -p "$OUT/logs" "$OUT/bench"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ultrarefiner-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
STEPS=()      # name|status|seconds|note
FAILED=0

[[ -n $BIN && -x $BIN/ultrarefiner ]] || { echo "error: no ultrarefiner binary (run make build-cuda, or pass BIN_DIR)" >&2; exit 1; }
[[ -n $FX && -f $FX/sam_narrow.pth ]] || { echo "error: fixture folder not found (pass FIXTURES_DIR)" >&2; exit 1; }
BIN=$(cd "$BIN" && pwd)
FX=$(cd "$FX" && pwd)
export ULTRAREFINER_SHARED=$(dirname "$FX")
UR="$BIN/ultrarefiner"
echo "gpu-check: binaries $BIN, fixtures $FX, device $DEVICE, results $OUT"

# step NAME TIMEOUT_S CMD...: runs CMD with a time limit, log in logs/NAME.log, records pass/fail/timeout.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s) rc status note=""
  local left=$(( TOTAL_LIMIT - (t0 - START) ))
  if (( left < 15 )); then
    STEPS+=("$name|skip|0|no time left of the ${TOTAL_LIMIT}s budget")
    echo "--> $name: skip (time budget spent)"
    return 0
  fi
  (( limit > left )) && limit=$left
  printf '\n=== %s (limit %ss, at %ss)\n' "$name" "$limit" "$(( t0 - START ))"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  tail -n 15 "$OUT/logs/$name.log"
  if [[ $rc == 0 ]]; then
    status=pass
  elif [[ $rc == 124 || $rc == 137 ]]; then
    status=timeout; note="killed after ${limit}s"; FAILED=1
  elif grep -q "unknown workload" "$OUT/logs/$name.log"; then
    status=skip; note="workload not in this build"
  else
    status=fail; note="exit $rc: $(grep -m1 '^error' "$OUT/logs/$name.log" | cut -c1-200)"; FAILED=1
  fi
  STEPS+=("$name|$status|$(( $(date +%s) - t0 ))|$note")
  echo "--> $name: $status ${note}"
  return $rc
}

# The binaries dlopen libcuda, libcublas(Lt), libcurand and libnvrtc. When the dynamic loader does not know libcublas
# (a toolkit outside ld.so.conf, or PyTorch's pip wheels only), add the usual folders that hold it.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
  extra=""
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | xargs -n1 2>/dev/null | sed 's|$|/nvidia|'); do
    [[ -d $d ]] || continue
    for l in $(ls -d "$d" "$d"/*/lib "$d"/cu*/lib 2>/dev/null); do
      ls "$l"/libcublas.so* "$l"/libcurand.so* "$l"/libnvrtc.so* >/dev/null 2>&1 && extra="$extra:$l"
    done
  done
  export LD_LIBRARY_PATH="${extra#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# 1. Environment.
{
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libcublas\.so|libcurand\.so|libnvrtc\.so' | head -n 8
  date -u
  uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi not found"
  "$UR" --version
  for b in ultrarefiner phase1 phase2 phase3; do
    echo "$b: $(ldd "$BIN/$b" 2>/dev/null | grep -Eci 'libcuda|libcublas|libcurand|libnvrtc') CUDA libraries linked at build time (expected 0)"
  done
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# 2. Agreement of every model forward/backward (ultrarefiner gpu-check).
step devcheck 240 "$UR" gpu-check --device "$DEVICE" --reference cpu --fixtures "$FX" --out "$OUT"

# 3. One epoch per phase on CUDA (tiny preset, phantom data).
D="$WORK/data"
step data 180 bash -c "
  set -e
  '$UR' prepare phantom --out '$D/raw/PHANTOM' --count 24 --seed 7 --size-h 112-144 --size-w 128-176
  '$UR' prepare datasets --raw-root '$D/raw' --output-root '$D/processed' --datasets PHANTOM
  '$UR' augment synthetic --processed-root '$D/processed' --datasets PHANTOM --output-root '$D/augmented' \
    --target-samples 48 --store-size 96 --exclude-fold 0"
# flag NAME BINARY: prints NAME when BINARY --help lists it (the trainers' flags are still settling).
has_flag() { "$BIN/$2" --help 2>/dev/null | grep -q -- "$1\b"; }
epochs_flag() { if has_flag --max-epochs "$1"; then echo --max-epochs; else echo --epochs; fi; }
CK="$WORK/checkpoints"
step phase1-epoch 150 "$BIN/phase1" --config tiny --data-root "$D/processed" --dataset PHANTOM --fold 0 \
  "$(epochs_flag phase1)" 1 --batch-size 8 --output-dir "$CK/transunet" --device "$DEVICE" --plain
step phase2-epoch 150 "$BIN/phase2" --config tiny --data-root "$D/augmented" --dataset PHANTOM \
  --processed-root "$D/processed" --sam-checkpoint random --transunet-img-size 96 \
  "$(epochs_flag phase2)" 1 --batch-size 4 --output-dir "$CK/sam" --device "$DEVICE"
if has_flag --transunet-checkpoint phase3; then
  SAM_CK=$(ls "$CK"/sam/PHANTOM*/best_sam.safetensors "$CK"/sam/*/best_sam.safetensors 2>/dev/null | head -n 1)
  step phase3-epoch 150 "$BIN/phase3" --config tiny --data-root "$D/processed" --dataset PHANTOM --fold 0 \
    --transunet-checkpoint "$CK/transunet/PHANTOM/fold_0/best.safetensors" \
    --sam-checkpoint "${SAM_CK:-random}" --img-size 96 "$(epochs_flag phase3)" 1 --batch-size 4 \
    --output-dir "$CK/ultra" --device "$DEVICE"
else
  STEPS+=("phase3-epoch|skip|0|phase3 binary has no trainer in this build")
  echo "--> phase3-epoch: skip (no trainer in this build)"
fi

# 4. Benchmarks at the paper preset (JSON per workload in bench/).
bench() { # NAME TIMEOUT WORKLOAD ARGS...
  local name=$1 limit=$2 w=$3
  shift 3
  step "bench-$name" "$limit" "$UR" bench --workload "$w" --config paper --device "$DEVICE" "$@"
  grep -h '^{' "$OUT/logs/bench-$name.log" | tail -n 1 >"$OUT/bench/$name.json" || true
  [[ -s $OUT/bench/$name.json ]] || rm -f "$OUT/bench/$name.json"
}
if [[ ${QUICK:-0} != 1 ]]; then
  bench sam-encoder-bf16-b1 90 sam-encoder-forward --encoder-dtype bf16 --batch 1 --n 5 --warmup 2
  bench sam-encoder-bf16-b8 120 sam-encoder-forward --encoder-dtype bf16 --batch 8 --n 5 --warmup 1
  bench sam-encoder-f32-b1 90 sam-encoder-forward --encoder-dtype f32 --batch 1 --n 3 --warmup 1
  bench sam-decoder-train-step-b4 90 sam-decoder-train-step --batch 4 --n 5 --warmup 2
  bench transunet-train-step-b24 120 transunet-train-step --batch 24 --n 5 --warmup 2
  bench phase3-step-b8 150 phase3-step --batch 8 --n 3 --warmup 1
  bench e2e-train-step-b8 150 e2e-train-step --batch 8 --n 3 --warmup 1
fi

# 5. Summary.
json_num() { # FILE KEY
  [[ -f $1 ]] && sed -n "s/.*\"$2\":\([0-9.eE+-]*\).*/\1/p" "$1" | head -n 1
}
TARGETS=()
target() { # NAME OK(1/0/"") TEXT
  local s=n/a
  [[ $2 == 1 ]] && s=met
  [[ $2 == 0 ]] && s=missed
  TARGETS+=("$1|$s|$3")
}
ips=$(json_num "$OUT/bench/sam-encoder-bf16-b8.json" items_per_s)
target "SAM vit_b encoder bf16 batch 8 >= 40 images/s" "$([[ -n $ips ]] && awk -v x="$ips" 'BEGIN{print (x>=40)?1:0}')" "${ips:-no result} images/s"
GB24=$(awk 'BEGIN{print 24e9/1048576}')
for pair in "Phase 2 batch 4 (sam-decoder-train-step)|sam-decoder-train-step-b4" "Phase 3 batch 8 (phase3-step)|phase3-step-b8" "Phase 3 batch 8 (e2e-train-step)|e2e-train-step-b8"; do
  label=${pair%%|*}
  mb=$(json_num "$OUT/bench/${pair##*|}.json" gpu_peak_mb)
  target "$label within 24 GB" "$([[ -n $mb ]] && awk -v x="$mb" -v l="$GB24" 'BEGIN{print (x<=l)?1:0}')" "${mb:-no result} MiB peak"
done
TOTAL=$(( $(date +%s) - START ))
{
  echo "gpu-check on $DEVICE: $(grep -m1 -o 'NVIDIA [A-Za-z0-9 -]*' "$OUT/environment.txt" || echo unknown GPU), total ${TOTAL}s"
  printf '%-28s %-8s %6s  %s\n' step status seconds note
  for s in "${STEPS[@]}"; do IFS='|' read -r n st sec note <<<"$s"; printf '%-28s %-8s %6s  %s\n' "$n" "$st" "$sec" "$note"; done
  echo
  for t in "${TARGETS[@]}"; do IFS='|' read -r n st v <<<"$t"; printf 'target %-50s %-7s %s\n' "$n" "$st" "$v"; done
  echo
  [[ -f $OUT/devcheck.txt ]] && cat "$OUT/devcheck.txt"
} | tee "$OUT/summary.txt"
{
  printf '{"device":"%s","total_s":%s,"steps":[' "$DEVICE" "$TOTAL"
  sep=""
  for s in "${STEPS[@]}"; do
    IFS='|' read -r n st sec note <<<"$s"
    note=${note//\\/\\\\}; note=${note//\"/\\\"}
    printf '%s{"name":"%s","status":"%s","seconds":%s,"note":"%s"}' "$sep" "$n" "$st" "$sec" "$note"
    sep=","
  done
  printf '],"targets":['
  sep=""
  for t in "${TARGETS[@]}"; do
    IFS='|' read -r n st v <<<"$t"
    printf '%s{"target":"%s","status":"%s","value":"%s"}' "$sep" "$n" "$st" "$v"
    sep=","
  done
  printf ']}\n'
} >"$OUT/summary.json"
exit $FAILED
