#!/usr/bin/env bash
# Builds the lora-ext sdist, then a wheel from that sdist, for the torch installed in
# $PYTHON's environment:
#   dist/lora_ext-0.1.0.tar.gz
#   dist/lora_ext-0.1.0+cu130torch2.14-cp39-abi3-linux_x86_64.whl   (needs torch>=2.14,<2.15)
#   dist/lora_ext-0.1.0+cputorch2.14-...whl                         (FORCE_CUDA=0, or no CUDA)
# then checks the wheel (contents, metadata, what its .so links to: scripts/check_wheel.py).
#
# Usage: scripts/build_wheel.sh [OUTDIR]          (default OUTDIR: dist)
# Environment:
#   PYTHON                 interpreter whose torch the wheel is built for (default: python)
#   FORCE_CUDA             1: CUDA kernels (needs nvcc), 0: CPU-only; default 1 when torch is a
#                          CUDA build and nvcc is found, else 0
#   TORCH_CUDA_ARCH_LIST   default: Ampere..Blackwell datacenter + consumer archs the CUDA
#                          toolkit knows, PTX for the newest (setup.py, DEFAULT_ARCHS)
#   CUDA_HOME              CUDA toolkit matching torch.version.cuda (default /usr/local/cuda)
#   MAX_JOBS               parallel compiles (default: number of cores)
# Building from the sdist, not the checkout, means the wheel never picks up in-place build
# outputs and the sdist is proven to build.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python}
OUTDIR=$(mkdir -p "${1:-$ROOT/dist}" && cd "${1:-$ROOT/dist}" && pwd)

torch_cuda=$("$PYTHON" -c "import torch; print(torch.version.cuda or '')")
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ -z "${FORCE_CUDA:-}" ]; then
  if [ -n "$torch_cuda" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then FORCE_CUDA=1; else FORCE_CUDA=0; fi
fi
export FORCE_CUDA
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ "$FORCE_CUDA" = "1" ]; then
  nvcc_cuda=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
  if [ "${nvcc_cuda%%.*}" != "${torch_cuda%%.*}" ]; then
    echo "build_wheel: nvcc at $CUDA_HOME is CUDA $nvcc_cuda but torch was built with CUDA $torch_cuda;" \
         "set CUDA_HOME to a CUDA $torch_cuda toolkit" >&2
    exit 2
  fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== sdist"
# the sdist is build-neutral (0.1.0, torch>=2.6): the local part and the torch series belong
# to a wheel's build
sdist=$(cd "$ROOT" && LORA_EXT_SDIST=1 FORCE_CUDA=0 "$PYTHON" -c \
  "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))" "$OUTDIR" \
  2> "$work/sdist.log" | tail -n 1) || { cat "$work/sdist.log" >&2; exit 1; }
echo "$OUTDIR/$sdist"

echo "== wheel (FORCE_CUDA=$FORCE_CUDA TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default} MAX_JOBS=$MAX_JOBS)"
tar -xzf "$OUTDIR/$sdist" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)
"$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -q -w "$work/wheel" "$src"
wheel=$(ls "$work"/wheel/*.whl)
mv "$wheel" "$OUTDIR/"
wheel="$OUTDIR/$(basename "$wheel")"
echo "$wheel"

echo "== check"
"$PYTHON" "$ROOT/scripts/check_wheel.py" "$wheel"
