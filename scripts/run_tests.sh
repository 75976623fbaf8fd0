#!/usr/bin/env bash
# The test command: sets up .venv and builds if needed, runs the native core tests (ctest),
# then the pytest suite. Extra arguments go to pytest (e.g. -m gpu on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import lora_ext" 2>/dev/null; then
  bash scripts/setup_env.sh
fi
export PATH="$PWD/.venv/bin:$PATH"

echo "== native core tests (ctest)"
mkdir -p build
cmake_args=()
if [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  cmake_args+=("-DCMAKE_CUDA_COMPILER=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
fi
cmake -S . -B build/cmake -G Ninja "${cmake_args[@]}" > build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure

echo "== pytest"
# pytest exits 5 when it collects no tests: that is a failure here too, as is any other.
python -m pytest -q "$@"
