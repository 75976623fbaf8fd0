#!/usr/bin/env bash
# Creates .venv (torch 2.14.1 + build, test and benchmark dependencies) on first use, then
# builds lora_ext._C in place. Re-running it only rebuilds.
# Honours FORCE_CUDA, TORCH_CUDA_ARCH_LIST, CUDA_HOME and MAX_JOBS (see docs/install.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  # torch first and pinned: on this kind of machine pip takes it from local disk.
  "$VENV/bin/python" -m pip install -q "torch==2.14.1"
  "$VENV/bin/python" -m pip install -q ninja cmake numpy pytest pytest-benchmark hypothesis tqdm \
    matplotlib peft transformers bitsandbytes safetensors accelerate
fi

if [ "${FORCE_CUDA:-0}" = "1" ]; then
  # Without CUDA_HOME, torch guesses the toolkit root from nvcc on PATH and cannot link cudart.
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

echo "== building lora_ext (FORCE_CUDA=${FORCE_CUDA:-0} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-auto})"
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/lora-ext" info
