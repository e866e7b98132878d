#!/usr/bin/env bash
# The whole GPU validation in one command of at most 8 minutes (see fastadv/doctor.py):
#   scripts/gpu_validate.sh [--out gpu-results] [--dry-run] [--skip bench]
# Build with CUDA for sm_90, the GPU tests (Triton compiled, CUDA C++ vs the reference, torch.compile,
# compute-sanitizer memcheck), quick benchmarks, and beside them the register spills of every Lp Triton
# kernel (CompiledKernel.n_spills; summary.json "spills"); logs and JSON in one folder (<= 8 files).
# PYTHON: the interpreter to use (default: python3 on PATH).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PYTHON" -m fastadv.cli doctor --gpu "$@"
