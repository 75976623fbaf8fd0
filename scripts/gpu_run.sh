#!/usr/bin/env bash
# Everything a GPU machine runs, end to end, with every result in one folder:
#   1. environment facts (nvidia-smi, torch, packages)            env.log
#   2. build in place with the CUDA kernels for the visible GPU   build.log, info.json
#   3. native core tests (ctest), when cmake is installed         ctest.log
#   4. the GPU tests: pytest -m gpu                                pytest-gpu.log, pytest-gpu.xml
#   5. the full benchmark, every family, on cuda                   bench.log, bench/*.json|png|md
#   5b. DoRA with dropout: the sparse correction against the dense product (both forced)
#                                                                  bench-dora-routes.log, bench-dora-routes/
#   6. summary.md: the status of each step and the benchmark tables
#
#   scripts/gpu_run.sh [OUTDIR]      (default: $OUT when set, else benchmarks/results/gpu-run-<UTC date>/)
#
# Needs no network: it builds against the torch already installed (any series; the build
# pins nothing it has to download) with --no-build-isolation --no-deps. PYTHON picks the
# interpreter (default: .venv/bin/python when present, else python3). A failing step does
# not stop the later ones; the exit status is 1 when any step failed.
# Knobs: TORCH_CUDA_ARCH_LIST (default: the visible GPUs' architectures), MAX_JOBS,
# CUDA_HOME (default /usr/local/cuda), BENCH_ARGS (default: --full --family all),
# GPU_RUN_BUDGET_S (default 660: the whole run, so that it ends inside one 12-minute device
# call; every step has a timeout and the benchmark shares out what the earlier steps left).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUTDIR=${1:-${OUT:-$ROOT/benchmarks/results/gpu-run-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# the interpreter's own bin (ninja, cmake, pytest of a venv) and nvcc
PYTHON=$(command -v "$PYTHON") || { echo "gpu_run: no python ($PYTHON)" >&2; exit 2; }
export PATH="$(dirname "$PYTHON"):$CUDA_HOME/bin:$PATH"
# torch builds with ninja when it finds one on PATH (else one file at a time)
command -v ninja > /dev/null || PATH="$("$PYTHON" -c "import ninja; print(ninja.BIN_DIR)" 2> /dev/null):$PATH"
export FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print(';'.join(sorted({'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))" 2>/dev/null)
fi
export TORCH_CUDA_ARCH_LIST
BENCH_ARGS=${BENCH_ARGS:---full --family all}
BUDGET_S=${GPU_RUN_BUDGET_S:-660}
# CMake's spelling of the same architectures: 9.0 -> 90, 8.6+PTX -> 86
CMAKE_ARCHS=$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' '\n' | sed 's/+PTX//; s/\.//' | grep -E '^[0-9]+$' | paste -sd';')

SUMMARY="$OUTDIR/summary.md"
failed=0
start_all=$SECONDS
{
  echo "# lora-ext GPU run"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo n/a)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "- python: $PYTHON, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---:|---|"
} > "$SUMMARY"

step() {  # step NAME SECONDS COMMAND...: runs it under a timeout, output in NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== [$((SECONDS - start_all)) s] $name (at most $limit s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "step $name stopped after its $limit s" >> "$OUTDIR/$name.log"
  if [ $rc -eq 0 ]; then state=ok; else state="FAILED ($rc)"; failed=1; tail -n 20 "$OUTDIR/$name.log"; fi
  echo "   $state in $((SECONDS - t0)) s"
  echo "| $name | $state | $((SECONDS - t0)) | $name.log |" >> "$SUMMARY"
  return $rc
}

environment() {
  nvidia-smi || true
  "$PYTHON" - <<'PY'
import platform, torch
print("python", platform.python_version(), platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB {p.multi_processor_count} SMs")
PY
  "$CUDA_HOME/bin/nvcc" --version || true
  "$PYTHON" -m pip list 2>/dev/null || true
}

build() {
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v -e . &&
    "$PYTHON" -m lora_ext.cli info --json | tee "$OUTDIR/info.json" &&
    "$PYTHON" -c "import lora_ext, sys; sys.exit(0 if lora_ext.BUILD_INFO['with_cuda'] else 'built without CUDA')"
}

native_tests() {
  # cmake and ninja from PATH, else from the Python packages of that name
  local bin gen=()
  bin=$(command -v cmake > /dev/null && dirname "$(command -v cmake)" ||
        "$PYTHON" -c "import cmake; print(cmake.CMAKE_BIN_DIR)" 2> /dev/null) ||
    { echo "cmake not installed: native core tests skipped"; return 0; }
  if command -v ninja > /dev/null || "$PYTHON" -c "import ninja" 2> /dev/null; then
    command -v ninja > /dev/null || PATH="$("$PYTHON" -c "import ninja; print(ninja.BIN_DIR)"):$PATH"
    gen=(-G Ninja)
  fi
  # The native tests include the CUDA kernels run in emulation (ctest -R emu), in Release.
  "$bin/cmake" -S . -B "$OUTDIR/cmake-build" "${gen[@]}" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
      ${CMAKE_ARCHS:+-DCMAKE_CUDA_ARCHITECTURES="$CMAKE_ARCHS"} &&
    "$bin/cmake" --build "$OUTDIR/cmake-build" -j "$MAX_JOBS" &&
    "$bin/ctest" --test-dir "$OUTDIR/cmake-build" --output-on-failure
}

gpu_tests() {
  "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUTDIR/pytest-gpu.xml" tests
}

benchmark() {
  # Each family gets an equal share of the time left (--max-seconds is per family), less a
  # margin for loading models and writing charts.
  local families=6 left=$((BUDGET_S - (SECONDS - start_all) - 60))
  [ "$left" -lt 60 ] && left=60
  # shellcheck disable=SC2086  (BENCH_ARGS is a list of options)
  "$PYTHON" -m lora_ext.cli bench --device cuda $BENCH_ARGS --max-seconds $((left * 3 / 4 / families)) \
    --no-progress --output "$OUTDIR/bench"
}

dora_routes() {
  # Decides LORA_EXT_DORA_CUDA_SPARSE's default per dtype (csrc/dora.cpp: sparse_correction).
  "$PYTHON" -m lora_ext.cli bench --device cuda --family dora --full --dropout 0.05 --no-progress \
    --contestants base,peft_dora,lora_ext_dora,lora_ext_dora_sparse,lora_ext_dora_dense \
    --max-seconds 45 --output "$OUTDIR/bench-dora-routes"
}

left() { local l=$((BUDGET_S - (SECONDS - start_all))); [ $l -lt 30 ] && l=30; echo $l; }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }  # a step's limit within what is left

step env 60 environment
if step build 360 build; then
  step ctest "$(cap 120)" native_tests
  step pytest-gpu "$(cap 240)" gpu_tests
  step bench-dora-routes "$(cap 75)" dora_routes
  step bench "$(left)" benchmark
else
  echo "| (later steps) | skipped: the build failed | | |" >> "$SUMMARY"
fi
rm -rf "$OUTDIR/cmake-build"

{
  echo
  grep -E "[0-9]+ (passed|failed|skipped|errors?|deselected)" "$OUTDIR/pytest-gpu.log" 2>/dev/null |
    tail -n 1 | sed 's/^/pytest -m gpu: /'
  echo
  for md in "$OUTDIR"/bench/*.md; do
    [ -e "$md" ] || continue
    cat "$md"
    echo
  done
} >> "$SUMMARY"
echo "== [$((SECONDS - start_all)) s] done: $OUTDIR (summary.md)"
exit $failed
