"""Property tests (hypothesis) of the DoRA, NF4 and BGMV/SGMV ops against their references
over random shapes (odd sizes, 0 rows), dtypes, strides and seeds, plus invariants the
references alone do not state: NF4 round-trip error and idempotence, BGMV's -1 rows,
row permutations, and BGMV = SGMV on sorted indices.

The families' own test files check fixed grids of cases; these draw cases the grids miss."""
import math

import pytest
import torch

from lora_ext import ops, reference
from lora_ext.reference._nf4 import ABSMAX_BLOCKSIZES, NF4_BLOCKSIZES as NF4_BLOCKSIZE_LIST, NF4_CODE
from lora_testing import assert_within_torch_error, relayout
from test_dora_ops import DoraInputs, assert_dora_matches_reference, assert_norm_ok

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPES = st.sampled_from(FLOATS)
NF4_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
LAYOUTS = st.sampled_from([None, "transposed", "strided"])
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
NF4_BLOCKSIZES = st.sampled_from(NF4_BLOCKSIZE_LIST)
# Largest distance from a value in [-1, 1] to its NF4 code: half the widest gap.
NF4_HALF_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2


def _lay(t, how):
    return t if how is None else relayout(t, how)


def _randn(shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# ================================================================ DoRA


@SETTINGS
@given(out_f=st.integers(0, 23), in_f=st.integers(1, 45), r=st.integers(1, 9), dtype=DTYPES,
       w_layout=LAYOUTS, a_layout=LAYOUTS, b_layout=LAYOUTS, seed=SEEDS,
       scaling=st.floats(-8, 8, allow_nan=False, allow_infinity=False))
def test_dora_weight_norm_matches_its_reference(out_f, in_f, r, dtype, w_layout, a_layout, b_layout, seed,
                                                scaling):
    W = _lay(_randn((out_f, in_f), dtype, seed, 1 / math.sqrt(in_f)), w_layout)
    A = _lay(_randn((r, in_f), dtype, seed + 1, 1 / math.sqrt(in_f)), a_layout)
    B = _lay(_randn((out_f, r), dtype, seed + 2), b_layout)
    assert_norm_ok(W, A, B, scaling)


@SETTINGS
@given(rows=st.integers(0, 7), lead=st.integers(1, 3), in_f=st.integers(1, 40), out_f=st.integers(1, 30),
       r=st.integers(1, 9), dtype=DTYPES, bias=st.booleans(), x_layout=LAYOUTS, w_layout=LAYOUTS,
       dropout_p=st.sampled_from([0.0, 0.1, 0.5]), seed=SEEDS, offset=st.integers(0, 2**40),
       scaling=st.floats(-4, 4, allow_nan=False).filter(lambda s: abs(s) > 1e-3))
def test_dora_linear_matches_its_reference(rows, lead, in_f, out_f, r, dtype, bias, x_layout, w_layout,
                                           dropout_p, seed, offset, scaling):
    layouts = {k: v for k, v in (("x", x_layout), ("weight", w_layout)) if v}
    inputs = DoraInputs((lead, rows, in_f), out_f, r, dtype=dtype, bias=bias, layouts=layouts,
                        seed=seed % 1000)
    assert_dora_matches_reference(inputs, scaling=scaling, dropout_p=dropout_p, seed=seed, offset=offset)


# ================================================================ NF4


def _nf4_input(shape, dtype, seed, layout, log_scale):
    x = _randn(shape, torch.float64, seed) * 10.0 ** log_scale
    if seed % 5 == 0 and x.numel():
        x.view(-1)[:: 7] = 0.0  # whole zero runs: blocks whose absmax is 0 appear for small blocks
    return _lay(x.to(dtype), layout)


@SETTINGS
@given(shape=st.lists(st.integers(0, 37), min_size=1, max_size=3), dtype=NF4_DTYPES, blocksize=NF4_BLOCKSIZES,
       layout=LAYOUTS, seed=SEEDS, log_scale=st.integers(-3, 3))
def test_nf4_quantize_and_dequantize_match_their_reference_bit_for_bit(shape, dtype, blocksize, layout, seed,
                                                                       log_scale):
    x = _nf4_input(shape, dtype, seed, layout, log_scale)
    packed, absmax = ops.nf4_quantize(x, blocksize)
    ref_packed, ref_absmax = reference.nf4_quantize(x, blocksize)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    for out_dtype in (torch.float32, dtype):
        got = ops.nf4_dequantize(packed, absmax, x.shape, blocksize, out_dtype)
        want = reference.nf4_dequantize(packed, absmax, x.shape, blocksize, out_dtype)
        assert got.dtype == out_dtype and torch.equal(got, want)


@SETTINGS
@given(shape=st.lists(st.integers(0, 41), min_size=1, max_size=2), dtype=NF4_DTYPES, blocksize=NF4_BLOCKSIZES,
       layout=LAYOUTS, seed=SEEDS, log_scale=st.integers(-3, 3))
def test_nf4_round_trip_error_is_within_half_a_code_gap_and_requantising_is_idempotent(
        shape, dtype, blocksize, layout, seed, log_scale):
    x = _nf4_input(shape, dtype, seed, layout, log_scale)
    n = x.numel()
    packed, absmax = ops.nf4_quantize(x, blocksize)
    deq = ops.nf4_dequantize(packed, absmax, x.shape, blocksize, torch.float32)
    per_element = absmax.repeat_interleave(blocksize)[:n].double()
    err = (deq.double() - x.double()).reshape(-1).abs()
    # Half the widest code gap of the block's absmax, plus the fp32 rounding of code·absmax.
    bound = per_element * (NF4_HALF_GAP + 2 * torch.finfo(torch.float32).eps)
    assert bool((err <= bound).all()), f"round-trip error {float((err - bound).max()):.3e} past the bound"
    # A block's largest |value| maps to code ±1, so dequantised values quantise to themselves.
    packed2, absmax2 = ops.nf4_quantize(deq, blocksize)
    assert torch.equal(absmax2, absmax)
    assert torch.equal(packed2, packed)


@SETTINGS
@given(rows=st.integers(0, 6), lead=st.integers(1, 2), in_f=st.integers(1, 70), out_f=st.integers(1, 33),
       dtype=NF4_DTYPES, blocksize=NF4_BLOCKSIZES, bias=st.booleans(), x_layout=LAYOUTS, seed=SEEDS)
def test_nf4_matmul_matches_its_reference(rows, lead, in_f, out_f, dtype, blocksize, bias, x_layout, seed):
    weight = _randn((out_f, in_f), torch.float32, seed)
    packed, absmax = ops.nf4_quantize(weight, blocksize)
    x = _lay(_randn((lead, rows, in_f), dtype, seed + 1), x_layout)
    b = _randn((out_f,), dtype, seed + 2) if bias else None
    ours = ops.nf4_matmul(x, packed, absmax, out_f, blocksize, b)
    torchs = reference.nf4_matmul(x, packed, absmax, out_f, blocksize, b)
    w64 = reference.nf4_dequantize(packed, absmax, (out_f, in_f), blocksize, torch.float32).double()
    # The oracle multiplies the weight PyTorch sees (dequantised, rounded to x's dtype) in fp64.
    w_x = w64.to(dtype).double()
    oracle = torch.nn.functional.linear(x.double(), w_x, None if b is None else b.double())
    magnitude = torch.nn.functional.linear(x.double().abs(), w_x.abs(), None if b is None else b.double().abs())
    assert_within_torch_error(ours, torchs, oracle, magnitude, "nf4_matmul")


@SETTINGS
@given(n=st.integers(1, 1500), blocksize=st.sampled_from(ABSMAX_BLOCKSIZES), seed=SEEDS,
       log_scale=st.integers(-4, 2), constant=st.booleans())
def test_absmax_double_quantisation_matches_its_reference_bit_for_bit(n, blocksize, seed, log_scale, constant):
    absmax = _randn((n,), torch.float32, seed).abs() * 10.0 ** log_scale
    if constant:  # every value equals the mean: each block's absmax2 is 0
        absmax = torch.full((n,), 0.25)
    codes, absmax2, offset = ops.quantize_absmax(absmax, blocksize)
    ref_codes, ref_absmax2, ref_offset = reference.quantize_absmax(absmax, blocksize)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax2, ref_absmax2)
    assert torch.equal(offset, ref_offset)
    back = ops.dequantize_absmax(codes, absmax2, offset, blocksize)
    assert torch.equal(back, reference.dequantize_absmax(codes, absmax2, offset, blocksize))


# ================================================================ BGMV / SGMV


def _bgmv_case(rows, n, r, in_f, out_f, dtype, seed, none_share, idx_dtype):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, max(n, 1), (rows,), generator=gen)
    if n == 0:
        idx.fill_(-1)
    else:
        idx[torch.rand(rows, generator=gen) < none_share] = -1
    x = _randn((rows, in_f), dtype, seed + 1)
    A = _randn((n, r, in_f), dtype, seed + 2, 1 / math.sqrt(in_f))
    y = _randn((rows, out_f), dtype, seed + 3)
    z = _randn((rows, r), dtype, seed + 4)
    B = _randn((n, out_f, r), dtype, seed + 5)
    scale = _randn((n,), torch.float32, seed + 6)
    return x, A, y, z, B, idx.to(idx_dtype), scale


BGMV_CASES = dict(rows=st.integers(0, 11), n=st.integers(0, 4), r=st.integers(0, 9), in_f=st.integers(1, 37),
                  out_f=st.integers(1, 29), dtype=DTYPES, seed=SEEDS, none_share=st.sampled_from([0.0, 0.3, 1.0]),
                  idx_dtype=st.sampled_from([torch.int64, torch.int32]))


@SETTINGS
@given(**BGMV_CASES, x_layout=LAYOUTS, a_layout=st.sampled_from([None, "strided", "batch_transposed"]),
       y_layout=LAYOUTS, b_layout=st.sampled_from([None, "transposed", "strided"]))
def test_bgmv_shrink_and_expand_match_their_references(rows, n, r, in_f, out_f, dtype, seed, none_share,
                                                       idx_dtype, x_layout, a_layout, y_layout, b_layout):
    x, A, y, z, B, idx, scale = _bgmv_case(rows, n, r, in_f, out_f, dtype, seed, none_share, idx_dtype)
    x, A, y, z, B = (_lay(x, x_layout), _lay(A, a_layout), _lay(y, y_layout), _lay(z, y_layout),
                     _lay(B, b_layout))
    d = torch.float64
    shrunk = ops.lora_shrink(x, A, idx)
    assert_within_torch_error(shrunk, reference.lora_shrink(x, A, idx),
                              reference.lora_shrink(x.to(d), A.to(d), idx),
                              reference.lora_shrink(x.to(d).abs(), A.to(d).abs(), idx), "lora_shrink")
    y_before = y.clone()
    expanded = ops.lora_expand(y, z, B, idx, scale)
    assert torch.equal(y, y_before), "lora_expand must not modify y"
    assert_within_torch_error(expanded, reference.lora_expand(y, z, B, idx, scale),
                              reference.lora_expand(y.to(d), z.to(d), B.to(d), idx, scale),
                              reference.lora_expand(y.to(d).abs(), z.to(d).abs(), B.to(d).abs(), idx, scale.abs()),
                              "lora_expand")
    # Rows without an adapter: z is exactly 0 and y passes through bit for bit.
    none = idx == -1
    assert bool((shrunk[none] == 0).all())
    assert torch.equal(expanded[none], y[none])


@SETTINGS
@given(**BGMV_CASES, perm_seed=SEEDS)
def test_permuting_rows_permutes_outputs(rows, n, r, in_f, out_f, dtype, seed, none_share, idx_dtype, perm_seed):
    x, A, y, z, B, idx, scale = _bgmv_case(rows, n, r, in_f, out_f, dtype, seed, none_share, idx_dtype)
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(perm_seed))
    # Each row is computed on its own, so a permutation changes no bit of any row.
    assert torch.equal(ops.lora_shrink(x[perm], A, idx[perm]), ops.lora_shrink(x, A, idx)[perm])
    assert torch.equal(ops.lora_expand(y[perm], z[perm], B, idx[perm], scale),
                       ops.lora_expand(y, z, B, idx, scale)[perm])


@SETTINGS
@given(**BGMV_CASES)
def test_bgmv_equals_sgmv_on_sorted_indices(rows, n, r, in_f, out_f, dtype, seed, none_share, idx_dtype):
    x, A, y, z, B, idx, scale = _bgmv_case(rows, n, r, in_f, out_f, dtype, seed, none_share, idx_dtype)
    idx = idx.sort().values
    seg_starts, seg_adapter = ops.segments_from_idx(idx)
    assert torch.equal(reference.segments_to_idx(seg_starts, seg_adapter, rows), idx.long())
    assert torch.equal(ops.lora_shrink_sgmv(x, A, seg_starts, seg_adapter), ops.lora_shrink(x, A, idx))
    assert torch.equal(ops.lora_expand_sgmv(y, z, B, seg_starts, seg_adapter, scale),
                       ops.lora_expand(y, z, B, idx, scale))


@SETTINGS
@given(idx=st.lists(st.integers(-1, 5), min_size=0, max_size=20))
def test_segments_from_idx_round_trips_any_index_list(idx):
    t = torch.tensor(idx, dtype=torch.int64)
    seg_starts, seg_adapter = ops.segments_from_idx(t)
    assert seg_starts.shape == (len(idx) + 1,) and seg_adapter.shape == (len(idx),)
    assert bool((seg_starts[1:] >= seg_starts[:-1]).all()) and int(seg_starts[-1]) == len(idx)
    assert torch.equal(reference.segments_to_idx(seg_starts, seg_adapter, len(idx)), t)
