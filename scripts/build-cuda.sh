#!/usr/bin/env bash
# `make build-cuda`: every binary (ultrarefiner, phase1, phase2, phase3) with `--features cuda`, on a machine that
# has the CUDA toolkit (nvcc; scripts/install-cuda-toolkit.sh) but needs neither a GPU nor a driver.
#
# The binaries load libcuda, libcublas(Lt), libcurand and libnvrtc with dlopen at run time, so they start on any
# machine and run on one with a newer driver and CUDA 11.8, 12.x or 13.x libraries. candle-core 0.11.1 asks its
# cudarc 0.19 for `dynamic-linking` (link-time -lcuda -lcublas ...; the sonames of the build machine's CUDA), and
# cudarc refuses `dynamic-loading` next to it, so a Cargo feature cannot switch it. This script therefore builds
# against two patched copies of crates that only the CUDA build uses (the CPU dependency graph is untouched):
#   * cudarc: `dynamic-linking` is turned into `dynamic-loading` (no link directives), and the run-time library
#     search also tries the `.so.13` sonames;
#   * candle-kernels: its MoE/GGUF kernels (used only by quantized models, never by this project) are replaced by
#     abort() stubs: compiling them takes most of an hour on a small machine and links `libcudart.so.11.0`, which a
#     CUDA 12/13 machine does not have.
# The copies live in $CARGO_TARGET_DIR/patched and reach cargo through `--config patch.crates-io...`. While the build
# runs, Cargo.lock names the two crates without registry source (do not commit it then); it is restored on exit.
#
# Environment:
#   CUDA_COMPUTE_CAP   PTX target of candle's kernels (default 80): the driver JIT-compiles compute_80 PTX for any
#                      newer GPU (A100 80, A10/RTX 30xx 86, L4/RTX 40xx 89, H100/H200 90). Keep 80 for Hopper with
#                      CUDA 11.8: candle's build asks for compute_90a at 90, which nvcc 11.8 does not know.
#   CARGO_TARGET_DIR   default target/cuda (never the CPU build's target/release).
#   CARGO_BUILD_JOBS   passed through to cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
CARGO=${CARGO:-cargo}

if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/lib/nvidia-cuda-toolkit/bin; do
    [[ -x $d/nvcc ]] && export PATH="$d:$PATH" && break
  done
fi
command -v nvcc >/dev/null 2>&1 || {
  echo "error: nvcc not found; install the CUDA toolkit first (scripts/install-cuda-toolkit.sh, README \"CUDA\")" >&2
  exit 1
}
echo "nvcc: $(nvcc --version | tail -n 2 | head -n 1)"
echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

lock_version() { # version of a crate in Cargo.lock
  awk -v n="$1" '$0 == "name = \"" n "\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock
}
CUDARC_V=$(lock_version cudarc)
KERNELS_V=$(lock_version candle-kernels)
[[ -n $CUDARC_V && -n $KERNELS_V ]] || { echo "error: cudarc/candle-kernels missing from Cargo.lock" >&2; exit 1; }

# Sources of the two crates from cargo's registry cache (downloaded if missing).
find_src() { ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$1-$2" 2>/dev/null | head -n 1; }
if [[ -z $(find_src cudarc "$CUDARC_V") || -z $(find_src candle-kernels "$KERNELS_V") ]]; then
  $CARGO fetch --locked
fi
CUDARC_SRC=$(find_src cudarc "$CUDARC_V")
KERNELS_SRC=$(find_src candle-kernels "$KERNELS_V")
[[ -d $CUDARC_SRC && -d $KERNELS_SRC ]] || { echo "error: cannot find the cudarc/candle-kernels sources" >&2; exit 1; }

case $CARGO_TARGET_DIR in /*) PATCHED="$CARGO_TARGET_DIR/patched" ;; *) PATCHED="$ROOT/$CARGO_TARGET_DIR/patched" ;; esac
PATCH_VERSION=2   # bump when the patches below change
mkdir -p "$PATCHED"
copy_if_changed() { # src dst: fresh copy unless an identical patched copy exists (keeps cargo's fingerprints)
  local stamp="$2.source" want="$1 patch-$PATCH_VERSION"
  if [[ -f $stamp && $(cat "$stamp") == "$want" && -d $2 ]]; then return 1; fi
  rm -rf "$2"
  cp -r "$1" "$2"
  chmod -R u+w "$2"
  echo "$want" >"$stamp"
}

if copy_if_changed "$CUDARC_SRC" "$PATCHED/cudarc"; then
  b="$PATCHED/cudarc/build.rs"
  # 1. Both features on is not an error any more ...
  sed -i 's|^\(\s*\)panic!("Both `dynamic-loading` and `dynamic-linking` features are active, this is a bug");|\1let _ = "ultrarefiner: dynamic-linking is served by dynamic-loading";|' "$b"
  # 2. ... and dynamic-linking emits no link directives but selects the dlopen code paths.
  sed -i 's|^\(\s*\)dynamic_linking(major, minor);|\1println!("cargo:rustc-cfg=feature=\\"dynamic-loading\\"");|' "$b"
  # 3. Run-time search: CUDA 13 sonames too (the crate lists .so.12/.11/.10/.9 besides the build's major).
  l="$PATCHED/cudarc/src/lib.rs"
  sed -i 's|^\(\s*\)std::format!("{DLL_PREFIX}{lib_name}{DLL_SUFFIX}.12"),|\1std::format!("{DLL_PREFIX}{lib_name}{DLL_SUFFIX}.13"),\n&|' "$l"
  grep -q 'served by dynamic-loading' "$b" && grep -q 'rustc-cfg=feature=\\"dynamic-loading\\"");$' "$b" \
    && ! grep -q '^\s*dynamic_linking(major, minor);' "$b" && grep -q 'DLL_SUFFIX}.13"' "$l" || {
    echo "error: patching $b / $l failed (cudarc $CUDARC_V changed?)" >&2
    rm -f "$PATCHED/cudarc.source"
    exit 1
  }
fi
if copy_if_changed "$KERNELS_SRC" "$PATCHED/candle-kernels"; then
  b="$PATCHED/candle-kernels/build.rs"
  # Replace the MoE/GGUF static library (15 template-heavy .cu files: most of an hour of nvcc on a small machine, and
  # a link-time libcudart.so.11.0) by abort() stubs of its C symbols; candle calls them only for quantized models.
  perl -0pi -e 's{    let mut moe_sources = vec!\[.*?moe_builder\.build_lib\(out_dir\.join\("libmoe\.a"\)\)\?;\n}{    // ultrarefiner build-cuda.sh: abort() stubs instead of the MoE/GGUF kernels (never used by this project).
    let is_target_msvc = env::var("TARGET").map(|t| t.contains("msvc")).unwrap_or(false);
    let ffi = std::fs::read_to_string("src/ffi.rs").expect("src/ffi.rs");
    let mut stubs = String::from("#include <stdlib.h>\\n");
    for l in ffi.lines() {
        if let Some(name) = l.trim().strip_prefix("pub fn ").and_then(|r| r.split(\x27(\x27).next()) {
            stubs.push_str(&format!("void {}(void) {{ abort(); }}\\n", name.trim()));
        }
    }
    let c_path = out_dir.join("moe_stubs.c");
    let o_path = out_dir.join("moe_stubs.o");
    let a_path = out_dir.join("libmoe.a");
    std::fs::write(&c_path, stubs).expect("write moe_stubs.c");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let ok = std::process::Command::new(cc).args(["-c", "-fPIC", "-O1", "-o"]).arg(&o_path).arg(&c_path)
        .status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "compiling moe_stubs.c failed");
    let _ = std::fs::remove_file(&a_path);
    let ok = std::process::Command::new("ar").arg("crs").arg(&a_path).arg(&o_path)
        .status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "ar failed");
}s' "$b"
  sed -i '/cargo:rustc-link-lib=dylib=cudart"/d' "$b"
  grep -q 'abort() stubs instead of the MoE' "$b" && ! grep -q 'moe_builder' "$b" && ! grep -q 'dylib=cudart' "$b" || {
    echo "error: patching $b failed (candle-kernels $KERNELS_V changed?)" >&2
    rm -f "$PATCHED/candle-kernels.source"
    exit 1
  }
fi


cp Cargo.lock "$PATCHED/Cargo.lock.orig"
restore_lock() { cp "$PATCHED/Cargo.lock.orig" Cargo.lock; }
trap restore_lock EXIT
start=$(date +%s)
$CARGO build --release \
  --config "patch.crates-io.cudarc.path=\"$PATCHED/cudarc\"" \
  --config "patch.crates-io.candle-kernels.path=\"$PATCHED/candle-kernels\"" \
  -p ultrarefiner-cli -p phase1 -p phase2 -p phase3 --features ultrarefiner/cuda "$@"
echo "build-cuda: $(( $(date +%s) - start )) s"

# The contract: no link-time dependency on the driver or on a particular CUDA release.
fail=0
for b in ultrarefiner phase1 phase2 phase3; do
  f="$CARGO_TARGET_DIR/release/$b"
  [[ -x $f ]] || { echo "error: $f was not built" >&2; fail=1; continue; }
  if command -v ldd >/dev/null 2>&1; then
    bad=$(ldd "$f" | grep -Ei 'libcuda|libcudart|libcublas|libcurand|libnvrtc|libcudnn' || true)
    if [[ -n $bad ]]; then
      echo "error: $f links CUDA libraries at link time:" >&2
      echo "$bad" >&2
      fail=1
    fi
  fi
done
[[ $fail == 0 ]] && echo "build-cuda: $CARGO_TARGET_DIR/release/{ultrarefiner,phase1,phase2,phase3} (CUDA loaded at run time)"
exit $fail
