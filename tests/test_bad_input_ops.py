"""Bad input to the DoRA, NF4 and BGMV/SGMV ops and to NF4Linear / AdapterPool: a clear Python
exception naming the problem, never a crash, hang or silent wrong answer.

Only the cases the families' own files (test_dora_ops, test_nf4_ops, test_bgmv,
test_nf4_layers) leave out are here. Device mismatches use the meta device, so they are
tested on a machine without a GPU; a CUDA pool with out-of-range indices is tested on GPU.
"""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import ops, reference
from lora_ext.serving import AdapterPool

NAN, INF = float("nan"), float("inf")


def _raises(error, pattern, fn, *args, **kwargs):
    with pytest.raises(error, match=pattern):
        fn(*args, **kwargs)


# ================================================================ DoRA


def _norm_args():
    return [torch.randn(4, 6), torch.randn(2, 6), torch.randn(4, 2), 1.5]


NORM_BAD = {
    "rank_0": (lambda a: [a[0], torch.empty(0, 6), torch.empty(4, 0), 1.5], ValueError, r"r >= 1"),
    "weight_3d": (lambda a: [a[0][None], *a[1:]], ValueError, "weight must be 2-D"),
    "A_on_meta": (lambda a: [a[0], a[1].to("meta"), *a[2:]], ValueError, "lora_A is on meta but weight is on cpu"),
    "B_on_meta": (lambda a: [a[0], a[1], a[2].to("meta"), 1.5], ValueError, "lora_B is on meta"),
    "scaling_inf": (lambda a: [*a[:3], INF], ValueError, "scaling must be a finite float"),
    "scaling_-inf": (lambda a: [*a[:3], -INF], ValueError, "scaling must be a finite float"),
    "scaling_str": (lambda a: [*a[:3], "1.5"], ValueError, "scaling must be a finite float"),
    "scaling_bool": (lambda a: [*a[:3], True], ValueError, "scaling must be a finite float"),
    "scaling_tensor": (lambda a: [*a[:3], torch.tensor(1.5)], ValueError, "scaling must be a finite float"),
}


@pytest.mark.parametrize("make,error,pattern", NORM_BAD.values(), ids=NORM_BAD.keys())
def test_dora_weight_norm_bad_input(make, error, pattern):
    _raises(error, pattern, ops.dora_weight_norm, *make(_norm_args()))


def _dora_kwargs(**changes):
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(x=torch.randn(3, 6, generator=gen), weight=torch.randn(5, 6, generator=gen),
                  bias=torch.randn(5, generator=gen), lora_A=torch.randn(2, 6, generator=gen),
                  lora_B=torch.randn(5, 2, generator=gen), magnitude=torch.rand(5, generator=gen) + 0.5,
                  scaling=2.0, dropout_p=0.1, seed=1)
    for key, value in changes.items():
        kwargs[key] = value(kwargs) if callable(value) else value
    return kwargs


DORA_BAD = {
    "rank_0": (dict(lora_A=torch.empty(0, 6), lora_B=torch.empty(5, 0)), ValueError, r"r >= 1"),
    "x_0d": (dict(x=torch.tensor(1.0)), ValueError, r"x must have shape \[\.\.\., 6\]"),
    "scaling_nan": (dict(scaling=NAN), ValueError, "scaling must be a finite float"),
    "scaling_-inf": (dict(scaling=-INF), ValueError, "scaling must be a finite float"),
    "dropout_negative": (dict(dropout_p=-0.1), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    "dropout_nan": (dict(dropout_p=NAN), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    "offset_float": (dict(offset=1.5), TypeError, "offset must be an int"),
    "seed_too_big": (dict(seed=2**64), ValueError, "seed must fit in 64 bits"),
    "bias_dtype": (dict(bias=lambda k: k["bias"].double()), TypeError, "bias has dtype torch.float64"),
    "lora_A_dtype": (dict(lora_A=lambda k: k["lora_A"].half()), TypeError, "lora_A has dtype torch.float16"),
    "x_int": (dict(x=lambda k: k["x"].int()), TypeError, "x has dtype torch.int32; expected one of"),
    "weight_on_meta": (dict(weight=lambda k: k["weight"].to("meta")), ValueError, "weight is on meta but x is on cpu"),
    "x_on_meta": (dict(x=lambda k: k["x"].to("meta")), ValueError, "is on cpu but x is on meta"),
    "norm_on_meta": (dict(weight_norm=torch.ones(5, device="meta")), ValueError, r"weight_norm must have shape \[5\] on cpu"),
    "norm_2d": (dict(weight_norm=torch.ones(1, 5)), ValueError, r"weight_norm must have shape \[5\]"),
    "norm_list": (dict(weight_norm=[1.0] * 5), TypeError, "weight_norm must be a floating-point Tensor"),
    "bias_2d": (dict(bias=torch.randn(1, 5)), ValueError, r"bias must have shape \[5\]"),
}


@pytest.mark.parametrize("changes,error,pattern", DORA_BAD.values(), ids=DORA_BAD.keys())
def test_dora_linear_bad_input(changes, error, pattern):
    _raises(error, pattern, ops.dora_linear, **_dora_kwargs(**changes))


def test_dora_linear_zero_in_features_is_refused():
    # Every norm of an empty row is 0, so g = magnitude / 0: refused rather than NaN (the
    # kernel alone fails with an unrelated reshape error).
    kwargs = _dora_kwargs(x=torch.randn(3, 0), weight=torch.randn(5, 0), lora_A=torch.randn(2, 0))
    _raises(ValueError, r"weight \(5, 0\) has no input features; DoRA needs in_features >= 1",
            ops.dora_linear, **kwargs)


def test_dora_linear_zero_out_features_and_zero_rows_give_empty_results():
    kwargs = _dora_kwargs(weight=torch.randn(0, 6), bias=torch.randn(0), lora_B=torch.randn(0, 2),
                          magnitude=torch.randn(0))
    assert ops.dora_linear(**kwargs).shape == (3, 0)
    assert ops.dora_linear(**_dora_kwargs(x=torch.randn(2, 0, 6))).shape == (2, 0, 5)


# ================================================================ NF4


@pytest.fixture(scope="module")
def nf4_weight():
    weight = torch.randn(6, 40)
    packed, absmax = ops.nf4_quantize(weight, 32)
    return weight, packed, absmax


@pytest.mark.parametrize("blocksize", [16, 0, -64, 64.0, True, None, "64", 96])
def test_nf4_wrong_blocksize_is_named_by_every_op(blocksize, nf4_weight):
    weight, packed, absmax = nf4_weight
    pattern = r"blocksize must be one of \(32, 64"
    _raises(ValueError, pattern, ops.nf4_quantize, weight, blocksize)
    _raises(ValueError, pattern, ops.nf4_dequantize, packed, absmax, (6, 40), blocksize)
    _raises(ValueError, pattern, ops.nf4_matmul, torch.randn(2, 40), packed, absmax, 6, blocksize)
    _raises(ValueError, r"blocksize must be one of \(64, 128", ops.quantize_absmax, absmax, blocksize)


@pytest.mark.parametrize("wrong", [32, 64, 128, 256, 4096])
def test_nf4_blocksize_mismatch_is_caught_whenever_it_changes_the_answer(wrong):
    # Quantised with blocksize 64: any other blocksize gives another block count (so the
    # absmax check fires) unless the whole weight is one block, where both read the same.
    for n_out in (1, 3, 17):
        weight = torch.randn(n_out, 40)
        packed, absmax = ops.nf4_quantize(weight, 64)
        x = torch.randn(2, 40)
        if -(-weight.numel() // wrong) == absmax.numel():
            assert torch.equal(ops.nf4_matmul(x, packed, absmax, n_out, wrong),
                               ops.nf4_matmul(x, packed, absmax, n_out, 64))
        elif wrong != 64:
            _raises(ValueError, f"absmax has {absmax.numel()} values", ops.nf4_matmul, x, packed, absmax,
                    n_out, wrong)


def test_nf4_device_mismatches_are_named(nf4_weight):
    weight, packed, absmax = nf4_weight
    meta = absmax.to("meta")
    _raises(ValueError, "absmax is on meta but packed is on cpu", ops.nf4_dequantize, packed, meta, (6, 40), 32)
    _raises(ValueError, "packed is on meta", ops.nf4_matmul, torch.randn(2, 40),
            packed.to("meta"), absmax, 6, 32)
    _raises(ValueError, "bias is on meta but x is on cpu", ops.nf4_matmul, torch.randn(2, 40), packed, absmax,
            6, 32, torch.zeros(6, device="meta"))
    codes, absmax2, offset = ops.quantize_absmax(absmax, 64)
    _raises(ValueError, "absmax2 is on meta but codes is on cpu", ops.dequantize_absmax, codes,
            absmax2.to("meta"), offset, 64)
    _raises(ValueError, "offset is on meta but codes is on cpu", ops.dequantize_absmax, codes, absmax2,
            offset.to("meta"), 64)


def test_nf4_other_bad_arguments_are_named(nf4_weight):
    weight, packed, absmax = nf4_weight
    x = torch.randn(2, 40)
    _raises(TypeError, "x must be a Tensor", ops.nf4_quantize, weight.tolist(), 32)
    _raises(ValueError, "shape must be a sequence of non-negative ints", ops.nf4_dequantize, packed, absmax,
            (6.0, 40), 32)
    _raises(ValueError, "shape must be a sequence of non-negative ints", ops.nf4_dequantize, packed, absmax,
            "6x40", 32)
    _raises(ValueError, r"x must have at least one dimension", ops.nf4_matmul, torch.tensor(1.0), packed,
            absmax, 6, 32)
    _raises(TypeError, "x has dtype torch.float64", ops.nf4_matmul, x.double(), packed, absmax, 6, 32)
    _raises(ValueError, "out_features must be a positive int", ops.nf4_matmul, x, packed, absmax, 6.0, 32)
    _raises(ValueError, "out_features must be a positive int", ops.nf4_matmul, x, packed, absmax, True, 32)
    _raises(ValueError, r"packed has 120 bytes but a weight \[6, 41\]", ops.nf4_matmul, torch.randn(2, 41),
            packed, absmax, 6, 32)
    _raises(ValueError, r"absmax has 7 values", ops.nf4_matmul, x, packed, absmax[:7], 6, 32)
    codes, absmax2, offset = ops.quantize_absmax(absmax, 64)
    _raises(TypeError, "codes has dtype torch.int64; expected torch.uint8", ops.dequantize_absmax,
            codes.long(), absmax2, offset, 64)
    _raises(TypeError, "code has dtype torch.float64", ops.dequantize_absmax, codes, absmax2, offset, 64,
            ops.DYNAMIC_CODE.double())
    _raises(ValueError, r"blocksize must be one of \(64", ops.dequantize_absmax, codes, absmax2, offset, 32)


def test_nf4_non_finite_weights_stay_visible():
    # NaN/Inf in a weight are not refused (bitsandbytes quantises them too, to the same
    # bytes) but never hidden: the block's absmax holds them and the block dequantises to NaN.
    x = torch.randn(3, 64)
    x[0, 5], x[1, 9] = NAN, INF
    packed, absmax = ops.nf4_quantize(x, 64)
    ref_packed, ref_absmax = reference.nf4_quantize(x, 64)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax.isnan(), ref_absmax.isnan())
    assert absmax[0].isnan() and absmax[1].isinf() and absmax[2].isfinite()
    deq = ops.nf4_dequantize(packed, absmax, (3, 64), 64)
    assert not deq[:2].isfinite().any() and deq[2].isfinite().all()


def test_nf4_empty_tensors_give_empty_results():
    packed, absmax = ops.nf4_quantize(torch.empty(0, 7), 64)
    assert packed.shape == (0, 1) and absmax.shape == (0,)
    assert ops.nf4_dequantize(packed, absmax, (0, 7), 64).shape == (0, 7)
    assert ops.nf4_matmul(torch.randn(2, 0, 7), *ops.nf4_quantize(torch.randn(3, 7), 64), 3, 64).shape == (2, 0, 3)
    # in_features = 0 (an empty weight): refused by name (the kernel alone fails with an
    # unrelated reshape error).
    _raises(ValueError, r"x has shape \(4, 0\), with no input features", ops.nf4_matmul, torch.randn(4, 0),
            packed, absmax, 3, 64, torch.randn(3))
    back = ops.dequantize_absmax(torch.empty(0, dtype=torch.uint8), torch.empty(0), torch.zeros(()), 256)
    assert back.shape == (0,)


# ================================================================ BGMV / SGMV


def _pool(n=3, r=4, in_f=10, out_f=12):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, r, in_f, generator=gen), torch.randn(n, out_f, r, generator=gen),
            torch.rand(n, generator=gen) + 0.5)


def test_bgmv_rank_0_pool_is_valid_and_adds_nothing():
    # A pool before any adapter is loaded has rank 0: z is [T, 0] and y passes through.
    A, B, scale = _pool(r=0)
    idx = torch.tensor([0, -1, 2])
    z = ops.lora_shrink(torch.randn(3, 10), A, idx)
    assert z.shape == (3, 0)
    y = torch.randn(3, 12)
    assert torch.equal(ops.lora_expand(y, z, B, idx, scale), y)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_bgmv_non_finite_scale_is_named_on_cpu(bad):
    A, B, scale = _pool()
    scale[1] = bad
    idx = torch.tensor([0, 2, -1])
    z = torch.randn(3, 4)
    _raises(ValueError, r"scale\[1\] = .* is not finite", ops.lora_expand, torch.randn(3, 12), z, B, idx, scale)
    seg_starts, seg_adapter = ops.segments_from_idx(idx)
    _raises(ValueError, r"scale\[1\] = .* is not finite", ops.lora_expand_sgmv, torch.randn(3, 12), z, B,
            seg_starts, seg_adapter, scale)


def _i2():
    return torch.zeros(2, dtype=torch.long)


def _x2():
    return torch.randn(2, 10)


def _y2():
    return torch.randn(2, 12)


def _z2():
    return torch.randn(2, 4)


BGMV_BAD = {
    "A_on_meta": (lambda A, B, s: ops.lora_shrink(_x2(), A.to("meta"), _i2()),
                  ValueError, "lora_A is on meta but x is on cpu"),
    "idx_on_meta": (lambda A, B, s: ops.lora_shrink(_x2(), A, torch.zeros(2, dtype=torch.long, device="meta")),
                    ValueError, "idx is on meta but the data is on cpu"),
    "idx_int16": (lambda A, B, s: ops.lora_shrink(_x2(), A, torch.zeros(2, dtype=torch.int16)),
                  TypeError, "idx must be int64 or int32, got torch.int16"),
    "idx_2d": (lambda A, B, s: ops.lora_shrink(_x2(), A, torch.zeros(2, 1, dtype=torch.long)),
               ValueError, r"idx must have shape \[2\]"),
    "idx_huge": (lambda A, B, s: ops.lora_shrink(_x2(), A, torch.tensor([0, 2**40])),
                 RuntimeError, r"idx\[1\] = 1099511627776 is out of range"),
    "idx_int32_negative": (lambda A, B, s: ops.lora_shrink(_x2(), A, torch.tensor([-5, 0], dtype=torch.int32)),
                           RuntimeError, r"idx\[0\] = -5 is out of range"),
    "empty_pool_slot_0": (lambda A, B, s: ops.lora_shrink(_x2(), A[:0], torch.tensor([-1, 0])),
                          RuntimeError, r"idx\[1\] = 0 is out of range.*\[0, 0\)"),
    "z_dtype": (lambda A, B, s: ops.lora_expand(_y2(), _z2().double(), B, _i2(), s),
                TypeError, "z has dtype torch.float64 but y has torch.float32"),
    "B_on_meta": (lambda A, B, s: ops.lora_expand(_y2(), _z2(), B.to("meta"), _i2(), s),
                  ValueError, "lora_B is on meta but y is on cpu"),
    "scale_on_meta": (lambda A, B, s: ops.lora_expand(_y2(), _z2(), B, _i2(), s.to("meta")),
                      ValueError, "scale is on meta but y is on cpu"),
    "scale_too_short": (lambda A, B, s: ops.lora_expand(_y2(), _z2(), B, _i2(), s[:2]),
                        ValueError, r"scale must be float32 of shape \[3\]"),
    "rank_too_large": (lambda A, B, s: ops.lora_shrink(torch.randn(2, 1), torch.zeros(1, 4097, 1), _i2()),
                       RuntimeError, "rank 4097 exceeds 4096"),
    "seg_adapter_float": (lambda A, B, s: ops.lora_shrink_sgmv(torch.randn(4, 10), A, torch.tensor([0, 4]), torch.tensor([0.0])),
                          TypeError, "seg_adapter must be int64 or int32"),
    "seg_starts_on_meta": (lambda A, B, s: ops.lora_shrink_sgmv(torch.randn(4, 10), A, torch.tensor([0, 4], device="meta"), torch.tensor([0])),
                           ValueError, "seg_starts is on meta"),
    "seg_starts_negative": (lambda A, B, s: ops.lora_shrink_sgmv(torch.randn(4, 10), A, torch.tensor([-1, 4]), torch.tensor([0])),
                            RuntimeError, r"seg_starts must lie in \[0, 4\]"),
    "seg_adapter_-2": (lambda A, B, s: ops.lora_expand_sgmv(torch.randn(4, 12), torch.randn(4, 4), B, torch.tensor([0, 4]), torch.tensor([-2]), s),
                       RuntimeError, r"seg_adapter\[0\] = -2 is out of range"),
    "segments_from_float_idx": (lambda A, B, s: ops.segments_from_idx(torch.zeros(3)),
                                TypeError, "idx must be a 1-D int64/int32 tensor"),
    "segments_from_2d_idx": (lambda A, B, s: ops.segments_from_idx(torch.zeros(3, 1, dtype=torch.long)),
                             TypeError, "idx must be a 1-D int64/int32 tensor"),
    "segments_from_list": (lambda A, B, s: ops.segments_from_idx([0, 1]), TypeError, "idx must be a Tensor"),
}


@pytest.mark.parametrize("call,error,pattern", BGMV_BAD.values(), ids=BGMV_BAD.keys())
def test_bgmv_bad_input(call, error, pattern):
    _raises(error, pattern, call, *_pool())


def test_segments_from_empty_idx():
    seg_starts, seg_adapter = ops.segments_from_idx(torch.empty(0, dtype=torch.long))
    assert seg_starts.tolist() == [0] and seg_adapter.shape == (0,)
    A, _, _ = _pool()
    assert ops.lora_shrink_sgmv(torch.empty(0, 10), A, seg_starts, seg_adapter).shape == (0, 4)


@pytest.mark.gpu
def test_cuda_out_of_range_indices_read_as_no_adapter():
    # The CUDA kernels cannot raise without a host sync: any index outside [-1, N) and any
    # segment table, however malformed, reads as "no adapter" and stays in bounds.
    A, B, scale = (t.cuda() for t in _pool())
    x, y = torch.randn(4, 10, device="cuda"), torch.randn(4, 12, device="cuda")
    idx = torch.tensor([0, 3, -7, 2**40], device="cuda")
    z = ops.lora_shrink(x, A, idx)
    good = torch.tensor([0, -1, -1, -1], device="cuda")
    assert torch.equal(z, ops.lora_shrink(x, A, good))
    assert torch.equal(ops.lora_expand(y, z, B, idx, scale), ops.lora_expand(y, z, B, good, scale))
    for starts, adapters in (([0, 9, 2], [5, 1]), ([-3, 1, 99], [0, -4]), ([7, 0, 4], [2, 2])):
        starts, adapters = torch.tensor(starts, device="cuda"), torch.tensor(adapters, device="cuda")
        ops.lora_shrink_sgmv(x, A, starts, adapters)
        ops.lora_expand_sgmv(y, z, B, starts, adapters, scale)
    torch.cuda.synchronize()  # an illegal access would surface here


# ================================================================ modules


def test_adapter_pool_rejects_bad_adapters():
    pool = AdapterPool(10, 12, torch.device("cpu"), torch.float32)
    _raises(ValueError, r"adapter 'a': rank must be >= 1", pool.load, "a", torch.empty(0, 10), torch.empty(12, 0), 1.0)
    _raises(ValueError, r"adapter 'a': expected lora_A \[r, 10\]", pool.load, "a", torch.tensor(1.0),
            torch.randn(12, 1), 1.0)
    _raises(ValueError, r"adapter 'a': expected lora_A \[r, 10\]", pool.load, "a", torch.randn(1, 2, 10),
            torch.randn(12, 1), 1.0)
    for bad in (NAN, INF, "2.0", None, torch.tensor([1.0, 2.0]), torch.tensor(NAN)):
        _raises(ValueError, "adapter 'a': scale must be a finite float", pool.load, "a", torch.randn(2, 10),
                torch.randn(12, 2), bad)
    assert pool.slots == {} and pool.capacity == 0  # nothing half-loaded


def test_nf4_linear_bad_input_is_named():
    layer = lora_ext.NF4Linear.from_linear(nn.Linear(40, 6))
    _raises(ValueError, r"NF4Linear: x must have shape \[\.\.\., 40\]", layer, torch.randn(2, 41))
    _raises(ValueError, r"NF4Linear: x must have shape \[\.\.\., 40\]", layer, torch.tensor(1.0))
    _raises(TypeError, "x has dtype torch.float64", layer, torch.randn(2, 40, dtype=torch.float64))
    _raises(ValueError, "is on meta", layer, torch.randn(2, 40, device="meta"))
    _raises(TypeError, "x has dtype torch.int64", layer, torch.ones(2, 40, dtype=torch.long))
    _raises(ValueError, r"weight must have shape \[6, 40\]", layer.set_quantized_weight, torch.randn(40, 6))
    _raises(TypeError, "x has dtype torch.int64", layer.set_quantized_weight, torch.ones(6, 40, dtype=torch.long))
    _raises(ValueError, "blocksize must be one of", layer.set_quantized_weight, torch.randn(6, 40), 48)


# ================================================================ the raw ops never crash

# Each line calls a torch.ops.lora_ext op directly (no Python checks in front) with inputs
# the C++ must refuse; run in a child process so a segfault fails this test instead of
# killing the test run.
RAW_CASES = """
dora_weight_norm(torch.randn(4, 6), torch.randn(2, 5), torch.randn(4, 2), 1.0)
dora_weight_norm(torch.randn(4, 6), torch.randn(2, 6), torch.randn(3, 2), 1.0)
dora_weight_norm(torch.randn(4, 6), torch.randn(2, 6).double(), torch.randn(4, 2), 1.0)
dora_weight_norm(torch.randn(4, 6, 1), torch.randn(2, 6), torch.randn(4, 2), 1.0)
dora_linear_forward(torch.randn(3, 7), torch.randn(5, 6), None, torch.randn(2, 6), torch.randn(5, 2), torch.ones(5), torch.ones(5), 1.0, 0.0, 0, 0)
dora_linear_forward(torch.randn(3, 6), torch.randn(5, 6), torch.randn(4), torch.randn(2, 6), torch.randn(5, 2), torch.ones(5), torch.ones(5), 1.0, 0.0, 0, 0)
dora_linear_forward(torch.randn(3, 6), torch.randn(5, 6), None, torch.randn(2, 6), torch.randn(5, 3), torch.ones(5), torch.ones(5), 1.0, 0.0, 0, 0)
dora_linear_forward(torch.randn(3, 6), torch.randn(5, 6), None, torch.randn(2, 6), torch.randn(5, 2), torch.ones(4), torch.ones(5), 1.0, 0.0, 0, 0)
dora_linear_forward(torch.randn(3, 6), torch.randn(5, 6), None, torch.randn(2, 6), torch.randn(5, 2), torch.ones(5), torch.ones(2), 1.0, 0.0, 0, 0)
dora_linear_forward(torch.randn(3, 6), torch.randn(5, 6), None, torch.randn(2, 6), torch.randn(5, 2), torch.ones(5), torch.ones(5), 1.0, 1.5, 0, 0)
dora_linear_backward(torch.randn(3, 5), torch.randn(3, 6), torch.randn(2, 2), torch.randn(3, 5), torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2), torch.ones(5), torch.ones(5), 1.0, 0.0, 0, 0, [True, True, True, True])
dora_linear_backward(torch.randn(2, 5), torch.randn(3, 6), torch.randn(3, 2), torch.randn(3, 5), torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2), torch.ones(5), torch.ones(5), 1.0, 0.0, 0, 0, [True, True, True, True])
nf4_quantize(torch.randn(64), 0)
nf4_quantize(torch.randn(64), -64)
nf4_quantize(torch.randn(64).double(), 64)
nf4_dequantize(torch.zeros(3, 1, dtype=torch.uint8), torch.ones(1), [8], 64, torch.float32)
nf4_dequantize(torch.zeros(32, 1, dtype=torch.uint8), torch.ones(0), [64], 64, torch.float32)
nf4_dequantize(torch.zeros(32, 1, dtype=torch.uint8), torch.ones(1), [64], 0, torch.float32)
nf4_dequantize(torch.zeros(32, 1), torch.ones(1), [64], 64, torch.float32)
nf4_matmul(torch.randn(2, 64), torch.zeros(3, 1, dtype=torch.uint8), torch.ones(1), 4, 64, None)
nf4_matmul(torch.randn(2, 64), torch.zeros(128, 1, dtype=torch.uint8), torch.ones(1), 4, 64, None)
nf4_matmul(torch.randn(2, 64), torch.zeros(128, 1, dtype=torch.uint8), torch.ones(4), 4, 64, torch.ones(3))
nf4_matmul(torch.randn(2, 64), torch.zeros(128, 1, dtype=torch.uint8), torch.ones(4), -4, 64, None)
nf4_matmul_grad_input(torch.randn(2, 4), torch.zeros(3, 1, dtype=torch.uint8), torch.ones(4), 64, 64)
nf4_matmul_grad_input(torch.randn(2, 4), torch.zeros(128, 1, dtype=torch.uint8), torch.ones(1), 64, 64)
nf4_quantize_absmax(torch.rand(300), torch.zeros(16), 256)
nf4_quantize_absmax(torch.rand(300), torch.zeros(256), 0)
nf4_quantize_absmax(torch.empty(0), torch.zeros(256), 256)
nf4_dequantize_absmax(torch.zeros(300, dtype=torch.uint8), torch.ones(1), torch.zeros(()), torch.zeros(256), 256)
nf4_dequantize_absmax(torch.zeros(300, dtype=torch.uint8), torch.ones(2), torch.zeros(()), torch.zeros(16), 256)
nf4_dequantize_absmax(torch.zeros(300, dtype=torch.uint8), torch.ones(2), torch.zeros(3), torch.zeros(256), 256)
nf4_dequantize_absmax(torch.zeros(300, dtype=torch.uint8), torch.ones(2), torch.zeros(()), torch.zeros(256), 0)
lora_shrink(torch.randn(2, 10), torch.randn(3, 4, 9), torch.zeros(2, dtype=torch.long))
lora_shrink(torch.randn(2, 10), torch.randn(3, 4, 10), torch.zeros(3, dtype=torch.long))
lora_shrink(torch.randn(2, 10), torch.randn(3, 4, 10), torch.tensor([0, 3]))
lora_shrink(torch.randn(2, 10), torch.randn(3, 4, 10), torch.zeros(2))
lora_expand(torch.randn(2, 12), torch.randn(2, 4), torch.randn(3, 12, 5), torch.zeros(2, dtype=torch.long), torch.ones(3))
lora_expand(torch.randn(2, 12), torch.randn(2, 4), torch.randn(3, 12, 4), torch.zeros(2, dtype=torch.long), torch.ones(2))
lora_expand(torch.randn(2, 12), torch.randn(2, 4), torch.randn(3, 12, 4), torch.tensor([0, 9]), torch.ones(3))
lora_expand(torch.randn(2, 12), torch.randn(3, 4), torch.randn(3, 12, 4), torch.zeros(2, dtype=torch.long), torch.ones(3))
lora_shrink_sgmv(torch.randn(4, 10), torch.randn(3, 4, 10), torch.tensor([0, 9]), torch.tensor([0]))
lora_shrink_sgmv(torch.randn(4, 10), torch.randn(3, 4, 10), torch.tensor([3, 1, 4]), torch.tensor([0, 1]))
lora_shrink_sgmv(torch.randn(4, 10), torch.randn(3, 4, 10), torch.tensor([0, 4]), torch.tensor([0, 1]))
lora_expand_sgmv(torch.randn(4, 12), torch.randn(4, 4), torch.randn(3, 12, 4), torch.tensor([0, 4]), torch.tensor([5]), torch.ones(3))
lora_expand_sgmv(torch.randn(4, 12), torch.randn(4, 4), torch.randn(3, 12, 4), torch.tensor([-2, 4]), torch.tensor([0]), torch.ones(3))
"""


def test_raw_ops_refuse_bad_input_without_crashing():
    script = textwrap.dedent("""
        import sys, torch, lora_ext
        ops = torch.ops.lora_ext
        accepted = []
        for line in sys.stdin.read().strip().splitlines():
            print("CASE", line, flush=True)
            try:
                eval("ops." + line)
            except RuntimeError as error:
                assert str(error).strip(), line
            else:
                accepted.append(line)
        print("ACCEPTED", accepted, flush=True)
        sys.exit(1 if accepted else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], input=RAW_CASES, capture_output=True, text=True,
                          timeout=300)
    last = [line for line in proc.stdout.splitlines() if line.startswith("CASE")][-1:]
    assert proc.returncode == 0, (f"exit {proc.returncode} (negative: killed by a signal) at {last}; "
                                  f"{proc.stdout[-2000:]} {proc.stderr[-2000:]}")
