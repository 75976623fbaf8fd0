#!/usr/bin/env bash
# The kernel tests once more at each lower instruction set, so that every code path of our
# CPU kernels is tested on every change whatever CPU CI runs on (README's test command runs
# the CPU's best path). Each run sets the level of our kernels (LORA_EXT_CPU_CAPABILITY) and
# of PyTorch's and MKL's (whose results the tests compare against), as a CPU with that
# instruction set would run them. A level above this CPU's is skipped.
# Usage: bash scripts/run_isa_tests.sh [level ...]   (default: avx2 default); needs the build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

# The op tests of every CPU kernel family (fused LoRA linear with its Philox dropout, DoRA,
# BGMV/SGMV, NF4, and their property tests), and the whole-model DoRA comparison with PEFT
# that once failed on an AVX2-only CPU. tests/test_cpu_capability.py is not among them: it
# starts one process per level itself. Left out too: opcheck and torch.compile cases, which
# check the ops' registration (schemas, fake kernels, autograd), the same at every level, and
# cost the most (a fresh inductor cache compiles every kernel again).
KERNEL_TESTS=(
  tests/test_lora_linear.py
  tests/test_dora_ops.py
  tests/test_bgmv.py
  tests/test_nf4_ops.py
  tests/test_properties_ops.py
  "tests/test_peft_interop_config.py::test_dora_adapters_cross_over"
)

best=$("$PY" -c "import lora_ext; print(lora_ext._C.cpu_capability()[1])")
rank() { case "$1" in default) echo 0 ;; avx2) echo 1 ;; avx512) echo 2 ;; *) echo -1 ;; esac; }

levels=("$@")
[ ${#levels[@]} -gt 0 ] || levels=(avx2 default)
for level in "${levels[@]}"; do
  if [ "$(rank "$level")" -lt 0 ]; then
    echo "unknown level '$level': expected avx512, avx2 or default" >&2
    exit 2
  fi
done
for level in "${levels[@]}"; do
  if [ "$(rank "$level")" -gt "$(rank "$best")" ]; then
    echo "== kernel tests at $level: skipped, this CPU's best is $best"
    continue
  fi
  case "$level" in
    avx512) mkl=AVX512 ;;
    avx2) mkl=AVX2 ;;
    default) mkl=SSE4_2 ;;
  esac
  export LORA_EXT_CPU_CAPABILITY=$level ATEN_CPU_CAPABILITY=$level MKL_ENABLE_INSTRUCTIONS=$mkl
  # A fresh torch.compile cache: inductor's cache key leaves ATEN_CPU_CAPABILITY out, and a
  # kernel cached by the run at the CPU's best level, reused under a lower one, gives NaN
  # (seen with torch 2.14 on an AVX-512 CPU forced to avx2).
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
  export TORCHINDUCTOR_CACHE_DIR
  echo "== kernel tests at $level (LORA_EXT_CPU_CAPABILITY, ATEN_CPU_CAPABILITY=$level, MKL_ENABLE_INSTRUCTIONS=$mkl)"
  start=$SECONDS
  # Both switches must have taken effect, or this run would test the wrong path.
  "$PY" -c "
import sys, torch, lora_ext
ours, aten = lora_ext.cpu_capability(), torch.backends.cpu.get_cpu_capability().lower()
sys.exit(None if ours == aten == '$level' else f'asked for $level, got lora_ext {ours}, ATen {aten}')"
  "$PY" -m pytest -q -p no:cacheprovider -k "not opcheck and not compile" "${KERNEL_TESTS[@]}"
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  echo "== kernel tests at $level: $((SECONDS - start)) s"
done
