#!/usr/bin/env bash
# Run PEFT's own tests/test_custom_models.py (the LoraConfig cases) against lora-ext.
#
#   scripts/peft_suite/run_peft_suite.sh MODE PEFT_SOURCE [pytest args...]
#
# MODE: stock (plain PEFT, the baseline) | ours (lora_ext's get_peft_model / PeftModel) |
#       accelerate (plain PEFT plus lora_ext.accelerate; prints the fused share).
# PEFT_SOURCE: a PEFT checkout or a bare git dir of PEFT's repository (HEAD is used; set
#       PEFT_REF to use another commit), e.g. git clone https://github.com/huggingface/peft.
#
# PEFT's test files are copied into a scratch folder (SCRATCH, default a fresh temp dir)
# and stay outside this repository. The only change to them: the module-level imports of
# diffusers and datasets (used by other tests) are guarded. Runs offline. The summary
# (outcome counts, every test's outcome, first error lines) is written as JSON to
# $SUMMARY (default $SCRATCH/summary-MODE.json); scripts/peft_suite/compare.py compares two.
# PYTHON selects the interpreter (default: python).
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
mode=$1
source_dir=$2
shift 2
case "$mode" in stock|ours|accelerate) ;; *) echo "MODE must be stock, ours or accelerate, got '$mode'" >&2; exit 2;; esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-python}
ref=${PEFT_REF:-HEAD}
scratch=${SCRATCH:-$(mktemp -d -t peft-suite-XXXXXX)}
summary=${SUMMARY:-$scratch/summary-$mode.json}
files="__init__.py conftest.py testing_common.py testing_utils.py test_custom_models.py"

mkdir -p "$scratch/tests"
if git -C "$source_dir" rev-parse --is-bare-repository 2>/dev/null | grep -q true; then
    for f in $files; do git --git-dir="$source_dir" show "$ref:tests/$f" > "$scratch/tests/$f"; done
    commit=$(git --git-dir="$source_dir" rev-parse "$ref")
elif [ -f "$source_dir/tests/test_custom_models.py" ]; then
    for f in $files; do cp "$source_dir/tests/$f" "$scratch/tests/$f"; done
    commit=$(git -C "$source_dir" rev-parse HEAD 2>/dev/null || echo "unknown (not a git checkout)")
else
    echo "PEFT_SOURCE '$source_dir' is neither a bare git dir of PEFT nor a checkout with tests/test_custom_models.py" >&2
    exit 2
fi

# diffusers and datasets are imported at module level for tests we do not run.
for f in "$scratch"/tests/*.py; do
    sed -i -E 's/^from (diffusers|datasets) import ([A-Za-z_, ]+)$/try:\n    from \1 import \2\nexcept ImportError:  # added by run_peft_suite.sh\n    \2 = None/' "$f"
done
# The guard must be syntactically complete: "a, b = None" would fail to unpack.
if grep -n -A3 '^try:$' "$scratch"/tests/*.py | grep -q ', .* = None'; then
    echo "run_peft_suite.sh: a guarded import names several symbols; extend the sed" >&2
    exit 2
fi

echo "PEFT tests from $source_dir at $commit, copied to $scratch/tests; mode $mode; summary -> $summary" >&2
cd "$scratch"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
PYTHONPATH="$repo:$here${PYTHONPATH:+:$PYTHONPATH}" \
LORA_EXT_SUITE_MODE=$mode LORA_EXT_SUITE_JSON=$summary \
    "$python" -m pytest -p lora_ext_peft_plugin -p no:cacheprovider --rootdir "$scratch" \
    tests/test_custom_models.py "$@"
