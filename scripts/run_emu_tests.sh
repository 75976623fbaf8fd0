#!/usr/bin/env bash
# The CUDA kernels of csrc/cuda/, executed on the CPU through the emulation in
# csrc/tests/cuda_emu/, built with AddressSanitizer and UndefinedBehaviorSanitizer: an
# out-of-bounds or misaligned access, a race that a shuffled schedule exposes, or a wrong
# result in any kernel fails. Needs only cmake, ninja and g++ (no torch, no GPU).
#   bash scripts/run_emu_tests.sh            (build dir: build/emu-sanitize)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"  # cmake and ninja of the venv, if any

build=build/emu-sanitize
# No CUDA compiler here: this build only needs the host compiler.
cmake -S . -B "$build" -G Ninja -DLORA_EXT_EMU_SANITIZE=ON -DCMAKE_CUDA_COMPILER=OFF \
  > "$build.log" 2>&1 || { cat "$build.log"; exit 1; }
cmake --build "$build" --target emu_tests
ctest --test-dir "$build" -R emu --output-on-failure -j "$(nproc)"
