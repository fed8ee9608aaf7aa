#!/usr/bin/env bash
# Install the CUDA toolkit (nvcc, headers, cuBLAS/cuRAND/NVRTC dev files) needed by `make build-cuda`
# on a Debian machine WITHOUT a GPU. Idempotent: running it twice changes nothing.
#
# Debian ships CUDA in its `non-free` component (bookworm: nvidia-cuda-toolkit 11.8). This script
#   1. writes /etc/apt/sources.list.d/ultrarefiner-cuda.sources with `contrib non-free non-free-firmware`
#      for this machine's Debian release (read from /etc/os-release),
#   2. runs `apt-get update` and `apt-get install --no-install-recommends nvidia-cuda-toolkit`,
#   3. prints `nvcc --version`.
# Only the toolkit is installed, no driver: the binaries built with `--features cuda` load libcuda,
# libcublas, libcurand and libnvrtc with dlopen at run time (see README "CUDA"), so the GPU machine may
# have a newer driver and CUDA 12/13 libraries.
#
# Needs root (or sudo). Environment: CUDA_APT_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

if command -v nvcc >/dev/null 2>&1 && [[ "${FORCE:-0}" != 1 ]]; then
  echo "nvcc already installed: $(command -v nvcc)"
  nvcc --version
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "error: run as root or install sudo" >&2; exit 1; }
  SUDO="sudo"
fi

[[ -r /etc/os-release ]] || { echo "error: /etc/os-release missing; this script supports Debian only" >&2; exit 1; }
# shellcheck disable=SC1091
. /etc/os-release
if [[ "${ID:-}" != debian ]]; then
  echo "error: this script supports Debian (found ID=${ID:-unknown}); on Ubuntu use NVIDIA's CUDA repository" >&2
  exit 1
fi
CODENAME="${VERSION_CODENAME:-}"
[[ -n "$CODENAME" ]] || { echo "error: VERSION_CODENAME missing in /etc/os-release" >&2; exit 1; }

MIRROR="${CUDA_APT_MIRROR:-http://deb.debian.org/debian}"
SRC=/etc/apt/sources.list.d/ultrarefiner-cuda.sources
WANT="Types: deb
URIs: ${MIRROR}
Suites: ${CODENAME} ${CODENAME}-updates
Components: contrib non-free non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
if [[ ! -f "$SRC" ]] || [[ "$(cat "$SRC")" != "$WANT" ]]; then
  echo "writing $SRC (contrib non-free for $CODENAME)"
  printf '%s\n' "$WANT" | $SUDO tee "$SRC" >/dev/null
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
# nvidia-cuda-toolkit asks to accept no licence on Debian; recommends pull in the driver stack, which we skip.
$SUDO apt-get install -y --no-install-recommends nvidia-cuda-toolkit

nvcc --version
