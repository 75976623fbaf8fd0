#!/usr/bin/env bash
# The main job: sets up .venv and builds if needed, then runs the benchmark harness on the
# available device (CUDA when a GPU is visible, else CPU). Arguments go to `lora-ext bench`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import lora_ext" 2>/dev/null; then
  bash scripts/setup_env.sh
fi
exec .venv/bin/lora-ext bench "$@"
