#!/usr/bin/env bash
# Builds one lora-ext wheel per torch/CUDA pair, each in its own virtual environment with that
# torch from the PyTorch index (and the sdist, which is the same for all):
#
#   scripts/build_wheels_matrix.sh [-o OUTDIR] TORCH CUDA [TORCH CUDA ...]
#   scripts/build_wheels_matrix.sh 2.14.1 cu130 2.14.1 cu128 2.13.0 cu126 2.14.1 cpu
#     -> OUTDIR/lora_ext-0.1.0+cu130torch2.14-cp39-abi3-linux_x86_64.whl, ...+cu128torch2.14...,
#        ...+cu126torch2.13..., ...+cputorch2.14..., lora_ext-0.1.0.tar.gz
#
# CUDA is the PyTorch index tag (cu130, cu128, cu126, ..., cpu). Each CUDA pair needs the
# matching CUDA toolkit (same major version as torch's; nvcc only, no GPU): taken from
# CUDA_HOME_<tag> (e.g. CUDA_HOME_cu128=/usr/local/cuda-12.8), else /usr/local/cuda-<X.Y>,
# else /usr/local/cuda when its nvcc has that version.
# Environment: PYTHON (interpreter for the venvs, default python3), TORCH_INDEX (default
# https://download.pytorch.org/whl; a mirror or local wheelhouse works), MATRIX_DIR (venvs,
# default build/matrix), TORCH_CUDA_ARCH_LIST and MAX_JOBS as for build_wheel.sh.
# The venvs are kept: a second run with the same pair skips the torch download.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="$ROOT/dist"
if [ "${1:-}" = "-o" ]; then OUTDIR=$2; shift 2; fi
if [ $# -eq 0 ] || [ $(($# % 2)) -ne 0 ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
mkdir -p "$OUTDIR"
PYTHON=${PYTHON:-python3}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl}
MATRIX_DIR=${MATRIX_DIR:-$ROOT/build/matrix}

toolkit_for() {  # cu128 -> a CUDA 12.8 toolkit root
  local tag=$1 var="CUDA_HOME_$1" ver
  ver="${tag#cu}"; ver="${ver:0:${#ver}-1}.${ver: -1}"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  if [ -x "/usr/local/cuda-$ver/bin/nvcc" ]; then echo "/usr/local/cuda-$ver"; return; fi
  if [ -x /usr/local/cuda/bin/nvcc ] && /usr/local/cuda/bin/nvcc --version | grep -q "release $ver"; then
    echo /usr/local/cuda; return
  fi
  echo "build_wheels_matrix: no CUDA $ver toolkit (set $var)" >&2
  return 1
}

status=0
while [ $# -gt 0 ]; do
  torch_version=$1 tag=$2
  shift 2
  venv="$MATRIX_DIR/torch$torch_version-$tag"
  echo "=== torch $torch_version ($tag) in $venv"
  if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip "setuptools>=77" wheel ninja numpy
  fi
  "$venv/bin/python" -m pip install -q "torch==$torch_version" --index-url "$TORCH_INDEX/$tag"
  if [ "$tag" = "cpu" ]; then
    env FORCE_CUDA=0 PYTHON="$venv/bin/python" bash "$ROOT/scripts/build_wheel.sh" "$OUTDIR" || status=1
  else
    home=$(toolkit_for "$tag") || { status=1; continue; }
    env FORCE_CUDA=1 CUDA_HOME="$home" PYTHON="$venv/bin/python" \
      bash "$ROOT/scripts/build_wheel.sh" "$OUTDIR" || status=1
  fi
done
echo "=== wheels in $OUTDIR"
ls -1 "$OUTDIR"
exit $status
