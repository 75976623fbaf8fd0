"""LORA_EXT_CPU_CAPABILITY: the switch that lowers the instruction set of our CPU kernels.

Each level runs in its own process (the variable is read once per process). In each, the
kernels of every family are checked against the reference by the tolerance rule, with the
test files' own helpers; across levels, the fused LoRA linear, DoRA and BGMV kernels must
give the same bits (no a*b+c contraction, vectors of one width in every clone), and so must
NF4 quantisation (bitsandbytes' bits on every path).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_ext

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ["default", "avx2", "avx512"]  # lowest first
VARIABLE = "LORA_EXT_CPU_CAPABILITY"


def run_python(code: str, level: str | None, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(VARIABLE, None)
    if level is not None:
        env[VARIABLE] = level
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def best_level() -> str:
    return lora_ext._C.cpu_capability()[1]


def expected(level: str) -> str:
    """A level above the CPU's is lowered to the CPU's, as ATen does."""
    return LEVELS[min(LEVELS.index(level), LEVELS.index(best_level()))]


# ---------------------------------------------------------------- the switch itself


@pytest.mark.parametrize("level", [None, *LEVELS])
def test_switch_sets_the_level_that_info_reports(level):
    code = ("import json, lora_ext; from lora_ext.cli import main; print(json.dumps(lora_ext.cpu_capability())); "
            "main(['info'])")
    result = run_python(code, level)
    assert result.returncode == 0, result.stderr
    first, *info = result.stdout.splitlines()
    info = dict(line.split(None, 1) for line in info if line.strip())
    want = best_level() if level is None else expected(level)
    assert json.loads(first) == info["cpu_capability"].strip() == want
    assert info["cpu_capability_best"].strip() == best_level() in LEVELS


@pytest.mark.parametrize("value", ["avx3", "AVX2"])
def test_bad_value_fails_the_import_naming_variable_value_and_levels(value):
    result = run_python("import lora_ext", value)
    assert result.returncode != 0
    assert (f"ValueError: {VARIABLE}='{value}' is not a CPU capability; expected one of avx512, avx2, "
            "default") in result.stderr


# ---------------------------------------------------------------- every level, every family

CHILD = """
import sys, torch, lora_ext
from lora_ext import ops
import lora_testing as lt, test_dora_ops as td, test_bgmv as tb, test_nf4_ops as tn

out = {"level": lora_ext.cpu_capability()}
# fused LoRA linear: the Philox dropout kernels (forward and backward), fp32 and bf16
for dtype in (torch.float32, torch.bfloat16):
    inputs = lt.make_lora_inputs((3, 37, 129), 70, 8, dtype=dtype, seed=4)
    kwargs = dict(scaling=1.5, dropout_p=0.1, seed=7, training=True, offset=3)
    lt.assert_matches_reference(inputs, **kwargs)
    y, grads = lt.forward_backward(ops.lora_linear, inputs, lt.random_like(inputs.y_shape, dtype, "cpu"), **kwargs)
    out[f"lora_linear {dtype}"] = [y.detach(), *grads.values()]
out["dropout_mask"] = ops.dropout_mask(torch.empty(41, 259), 0.3, 11, 5)
assert torch.equal(out["dropout_mask"], lora_ext.reference.dropout_mask(torch.empty(41, 259), 0.3, 11, 5))
# DoRA: the norm kernel in both layouts and every dtype, and the DoRA linear
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for layout in (None, "transposed"):
        W, A, B, s = td.norm_factors(75, 133, 6, "cancel", dtype, seed=2)
        if layout:
            W = lt.relayout(W, layout)
        out[f"norm {dtype} {layout}"] = td.assert_norm_ok(W, A, B, s)[0]
inputs = td.DoraInputs((2, 9, 300), 130, 4, seed=3)  # full 64-column blocks, 16 x 16 transposes and tails
td.assert_dora_matches_reference(inputs, dropout_p=0.1, seed=5, training=True)
out["dora_linear"] = ops.dora_linear(*inputs.args(), 1.5, 0.1, 5, True).detach()
# BGMV: shrink and both expand branches (groups of <= 2 rows and of more)
A, B, scale = tb.make_pool(4, 8, 96, 80, seed=1)
x, y = tb.rand((40, 96), torch.float32, "cpu", 2), tb.rand((40, 80), torch.float32, "cpu", 3)
idx = tb.make_idx(40, 4, seed=4)
idx[idx == 3] = 2
idx[5], idx[7] = 3, 3
z = tb.check_shrink(x, A, idx)
out["shrink"] = z
out["expand"] = tb.check_expand(y, z, B, idx, scale)
# NF4: quantisation (bitsandbytes' bits on every path), dequantisation, the fp32 GEMV
w = tn.sample(48 * 256, torch.float32, seed=6).reshape(48, 256)
packed, absmax = ops.nf4_quantize(w, 64)
out["nf4 packed"], out["nf4 absmax"] = packed, absmax
out["nf4 dequantize"] = ops.nf4_dequantize(packed, absmax, (48, 256), 64)
assert torch.equal(out["nf4 dequantize"], lora_ext.reference.nf4_dequantize(packed, absmax, (48, 256), 64))
xs = tn.sample(3 * 256, torch.float32, seed=7).reshape(3, 256)
out["nf4 matmul"] = ops.nf4_matmul(xs, packed, absmax, 48, 64)
tn.assert_within_tolerance_rule(out["nf4 matmul"], xs, packed, absmax, 48, 64, None, "nf4 gemv")
torch.save(out, sys.argv[1])
"""

# Results that may differ in their last bits between levels (each is checked against the
# reference instead): the AVX2 NF4 GEMV sums in another order than the portable one, and the
# fused LoRA linear runs its bf16 base GEMMs natively only at avx512 on a CPU with
# AVX512-BF16, in fp32 from the bf16 storage below it (csrc/cpu/lora_fused.cpp).
ORDER_DEPENDENT = {"nf4 matmul", "lora_linear torch.bfloat16"}


@pytest.fixture(scope="module")
def per_level(tmp_path_factory):
    """{level: outputs} for every level this CPU can run, each from its own process."""
    folder = tmp_path_factory.mktemp("levels")
    results = {}
    for level in LEVELS[:LEVELS.index(best_level()) + 1]:
        path = folder / f"{level}.pt"
        result = run_python(CHILD, level, str(path))
        assert result.returncode == 0, f"{VARIABLE}={level}:\n{result.stderr[-4000:]}"
        results[level] = torch.load(path)
    return results


def test_every_level_agrees_with_the_reference(per_level):
    # The child asserted the tolerance rule (and exactness where the op is exact); here,
    # that each process really ran the level it was asked for.
    for level, outputs in per_level.items():
        assert outputs["level"] == level


def test_levels_give_the_same_bits(per_level):
    if len(per_level) < 2:
        pytest.skip("this CPU runs only the portable level")
    (first, base), *others = per_level.items()
    for level, outputs in others:
        assert outputs.keys() == base.keys()
        for name in base:
            if name == "level" or name in ORDER_DEPENDENT:
                continue
            a, b = base[name], outputs[name]
            for i, (ta, tb) in enumerate(zip(a, b) if isinstance(a, list) else [(a, b)]):
                assert torch.equal(ta, tb), f"{name}[{i}]: {first} and {level} differ"
