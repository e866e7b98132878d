#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc against the installed torch's headers
# (object files only, nothing is linked or run): the CUDA sources' compile
# check for machines without a GPU or without a CUDA build of torch.
#
#   scripts/check_nvcc.sh            # sm_90 (override: FASTADV_NVCC_ARCH=sm_80)
#
# Exits 0 with "nvcc not found, skipping" when nvcc is absent, nonzero when a
# file fails to compile. Flags follow torch.utils.cpp_extension's CUDA build
# (-std=c++20 for torch 2.13's headers, the __CUDA_NO_HALF* defines,
# --expt-relaxed-constexpr) so a file that passes here also builds in setup.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "nvcc not found, skipping"
  exit 0
fi
# The interpreter whose torch to compile against: $PYTHON (the tests pass sys.executable), else python3 on PATH.
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
TORCH_DIR="$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
ARCH="${FASTADV_NVCC_ARCH:-sm_90}"
# A CPU wheel of torch ships the c10/cuda headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h (it only sets C10_CUDA_BUILD_SHARED_LIBS,
# which matters for Windows DLL exports): skip it there.
EXTRA=()
if [[ ! -f "$TORCH_DIR/include/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  EXTRA+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

shopt -s nullglob
files=("$ROOT"/csrc/cuda/*.cu)
if [[ ${#files[@]} -eq 0 ]]; then
  echo "no csrc/cuda/*.cu files"
  exit 0
fi
status=0
for f in "${files[@]}"; do
  start=$(date +%s)
  if "$NVCC" -std=c++20 -O3 -arch="$ARCH" -c "$f" -o "$OUT/$(basename "$f").o" \
      -I"$TORCH_DIR/include" -I"$TORCH_DIR/include/torch/csrc/api/include" \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      --expt-relaxed-constexpr -DFASTADV_WITH_CUDA -Xcompiler -fPIC ${EXTRA[@]+"${EXTRA[@]}"}; then
    echo "ok   ${f#$ROOT/} ($(( $(date +%s) - start )) s, $ARCH)"
  else
    echo "FAIL ${f#$ROOT/}"
    status=1
  fi
done
exit $status
