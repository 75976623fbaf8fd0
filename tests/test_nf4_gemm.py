"""NF4 into existing memory (nf4_dequantize(..., out=)) and the blocked 4-bit GEMM of the CPU:
every path with the shape that triggers it, under the tolerance rule, in every dtype."""
import math

import pytest
import torch

import lora_ext  # noqa: F401  (loads the kernels)
from lora_ext import ops, reference
from test_nf4_ops import DTYPES, assert_bit_equal, assert_within_tolerance_rule, sample

bnb_f = pytest.importorskip("bitsandbytes.functional")


# ---------------------------------------------------------------- dequantize into out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_dequantize_out_bit_exact_with_bitsandbytes(dtype, blocksize):
    # (3, 2 * bs + 16): rows that start inside a SIMD group; 10001: an odd count.
    for shape in [(4, 2 * blocksize), (3, 2 * blocksize + 16), (10001,), (5, 7)]:
        x = sample(math.prod(shape), torch.float32, seed=len(shape)).reshape(shape)
        packed, state = bnb_f.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
        want = reference.nf4_dequantize(packed, state.absmax, shape, blocksize, dtype)
        if shape[-1] % blocksize == 0 or shape[-1] % 2:
            state.dtype = dtype
            assert_bit_equal(bnb_f.dequantize_4bit(packed, state).reshape(shape), want, "bnb")
        out = torch.full(shape, 7.0, dtype=dtype)
        ptr = out.data_ptr()
        got = ops.nf4_dequantize(packed, state.absmax, blocksize=blocksize, out=out)
        assert got is out and out.data_ptr() == ptr
        assert_bit_equal(out, want, f"shape {shape}")
        assert_bit_equal(ops.nf4_dequantize(packed, state.absmax, shape, blocksize, dtype), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_out_special_absmax(dtype):
    # NaN, inf and huge absmax values: fp16 overflows to inf and every finite or infinite
    # value has the reference's bits; NaN stays NaN (its payload bits are the cast's own:
    # c10 writes 0x7FC0, PyTorch's vectorised cast may keep the sign).
    x = sample(64 * 40, torch.float32).reshape(40, 64)
    packed, absmax = ops.nf4_quantize(x, 64)
    absmax = absmax.clone()
    absmax[[1, 5, 9, 13]] = torch.tensor([float("nan"), float("inf"), 3e38, -float("nan")])
    out = torch.empty(40, 64, dtype=dtype)
    ops.nf4_dequantize(packed, absmax, (40, 64), 64, dtype, out=out)
    want = reference.nf4_dequantize(packed, absmax, (40, 64), 64, dtype)
    assert torch.equal(out.isnan(), want.isnan()) and want.isnan().any()
    keep = ~want.isnan()
    assert_bit_equal(out[keep], want[keep])


def test_dequantize_out_non_contiguous_and_empty():
    x = sample(96 * 64, torch.float32).reshape(96, 64)
    packed, absmax = ops.nf4_quantize(x, 64)
    want = reference.nf4_dequantize(packed, absmax, (96, 64), 64, torch.bfloat16)
    base = torch.zeros(64, 96, dtype=torch.bfloat16)
    out = base.t()  # [96, 64], strides (1, 96)
    ops.nf4_dequantize(packed, absmax, out=out)
    assert_bit_equal(out, want)
    assert_bit_equal(base, want.t())  # written into base's own memory
    packed0, absmax0 = ops.nf4_quantize(torch.empty(0, 64), 64)
    empty = torch.empty(0, 64)
    assert ops.nf4_dequantize(packed0, absmax0, out=empty) is empty


def test_dequantize_out_bad_input():
    packed, absmax = ops.nf4_quantize(sample(128, torch.float32), 64)
    with pytest.raises(ValueError, match=r"out has shape \(2, 64\) but shape \(4, 32\)"):
        ops.nf4_dequantize(packed, absmax, (4, 32), 64, out=torch.empty(2, 64))
    with pytest.raises(TypeError, match="out has dtype torch.float32 but dtype torch.bfloat16"):
        ops.nf4_dequantize(packed, absmax, (2, 64), 64, torch.bfloat16, out=torch.empty(2, 64))
    with pytest.raises(TypeError, match="out has dtype torch.int32"):
        ops.nf4_dequantize(packed, absmax, out=torch.empty(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="packed has 64 bytes but out"):
        ops.nf4_dequantize(packed, absmax, out=torch.empty(3, 64))
    with pytest.raises(ValueError, match="shape is missing"):
        ops.nf4_dequantize(packed, absmax)
    with pytest.raises(RuntimeError, match="nf4_dequantize_out: packed has 64 bytes"):
        torch.ops.lora_ext.nf4_dequantize_out(packed, absmax, 64, torch.empty(100))


def test_dequantize_out_opcheck_and_compile():
    packed, absmax = ops.nf4_quantize(sample(24 * 64, torch.float32), 32)
    for dtype in DTYPES:
        torch.library.opcheck(torch.ops.lora_ext.nf4_dequantize_out.default,
                              (packed, absmax, 32, torch.empty(24, 64, dtype=dtype)))

    def fn(packed, absmax, buffer):
        ops.nf4_dequantize(packed, absmax, blocksize=32, out=buffer)
        return buffer * 2

    buffer = torch.empty(24, 64)
    got = torch.compile(fn, fullgraph=True)(packed, absmax, buffer)
    want = reference.nf4_dequantize(packed, absmax, (24, 64), 32)
    assert_bit_equal(buffer, want)
    assert_bit_equal(got, want * 2)


# ---------------------------------------------------------------- blocked GEMM, forward
# The CPU's GEMV takes up to 4 rows (fp32/fp16) or 8 (bf16 on AVX512-BF16 CPUs); more rows run
# the blocked GEMM: tiles of up to 64 outputs (fewer for long rows: 256 KiB of decoded weight
# per tile), micro-kernels of 6 rows x 4 outputs (AVX-512; 3 x 4 on AVX2), rows padded to 16 or
# 32 elements, and passes of about 4 MiB of x.

GEMM_SHAPES = [
    (150, 64, 64),    # three tiles, the last one 22 outputs (a 2-output micro-kernel column)
    (37, 96, 32),     # one partial tile
    (13, 33, 32),     # in = 33: odd rows, every row of W starts mid-byte, a 1-element tail
    (8, 100, 64),     # in = 100: not a multiple of any vector width
    (300, 1040, 64),  # 1040 floats per row: 62 outputs per tile, in a multiple of 16 not 32
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [5, 9, 13, 64])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_matches_reference(dtype, rows, shape):
    out_features, in_features, blocksize = shape
    w = sample(out_features * in_features, torch.float32, seed=rows).reshape(out_features, in_features)
    packed, absmax = ops.nf4_quantize(w, blocksize)
    x = sample(rows * in_features, dtype, seed=rows + 1).reshape(rows, in_features)
    bias = sample(out_features, dtype, seed=5)
    for b in (None, bias):
        y = ops.nf4_matmul(x, packed, absmax, out_features, blocksize, b)
        assert_within_tolerance_rule(y, x, packed, absmax, out_features, blocksize, b,
                                     f"rows={rows} bias={b is not None}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_several_passes_over_x(dtype):
    # 1100 rows of 1040 floats: more than one 4 MiB pass of x, each decoding W again.
    out_features, in_features = 12, 1040
    packed, absmax = ops.nf4_quantize(sample(out_features * in_features, torch.float32), 64)
    x = sample(1100 * in_features, dtype, 2).reshape(1100, in_features)
    y = ops.nf4_matmul(x, packed, absmax, out_features, 64)
    assert_within_tolerance_rule(y, x, packed, absmax, out_features, 64, None, "passes")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_non_contiguous_batched_and_empty(dtype):
    packed, absmax = ops.nf4_quantize(sample(70 * 96, torch.float32).reshape(70, 96), 32)
    x = sample(3 * 96 * 7, dtype).reshape(3, 96, 7).transpose(1, 2)  # [3, 7, 96], 21 rows
    assert not x.is_contiguous()
    y = ops.nf4_matmul(x, packed, absmax, 70, 32)
    assert y.shape == (3, 7, 70) and y.dtype == dtype
    assert_within_tolerance_rule(y.reshape(21, 70), x.reshape(21, 96), packed, absmax, 70, 32, None, "strided")
    assert ops.nf4_matmul(torch.empty(0, 96, dtype=dtype), packed, absmax, 70, 32).shape == (0, 70)
    assert ops.nf4_matmul(torch.empty(2, 0, 96, dtype=dtype), packed, absmax, 70, 32).shape == (2, 0, 70)


def test_gemm_and_gemv_agree_at_the_switch():
    # 4 rows (GEMV) and the same 4 rows among 20 (GEMM) give the same values to fp32 rounding.
    packed, absmax = ops.nf4_quantize(sample(40 * 256, torch.float32), 64)
    x = sample(20 * 256, torch.float32, 3).reshape(20, 256)
    few = ops.nf4_matmul(x[:4], packed, absmax, 40, 64)
    many = ops.nf4_matmul(x, packed, absmax, 40, 64)
    torch.testing.assert_close(many[:4], few, rtol=1e-5, atol=1e-5)


def test_gemm_propagates_non_finite_values():
    packed, absmax = ops.nf4_quantize(sample(16 * 64, torch.float32), 64)
    x = sample(12 * 64, torch.float32, 1).reshape(12, 64)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    y = ops.nf4_matmul(x, packed, absmax, 16, 64)
    want = x.double() @ reference.nf4_dequantize(packed, absmax, (16, 64), 64).double().T
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(y[finite].double(), want[finite], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- blocked GEMM, backward for x


def assert_grad_within_tolerance_rule(got, grad_y, packed, absmax, in_features, blocksize, what=""):
    out_features = grad_y.shape[-1]
    w = reference.nf4_dequantize(packed, absmax, (out_features, in_features), blocksize)
    truth = grad_y.double() @ w.double()
    torch_err = (grad_y @ w.to(grad_y.dtype) - truth).abs().max().item()
    our_err = (got.double() - truth).abs().max().item()
    floor = torch.finfo(grad_y.dtype).eps * truth.abs().max().item() * 4
    assert got.dtype == grad_y.dtype and got.shape == truth.shape
    assert our_err <= 2 * torch_err + floor, f"{what}: error {our_err} vs PyTorch's {torch_err}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("shape", [(24, 64, 64), (37, 33, 32), (1100, 70, 64), (20, 200, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_grad_input_matches_reference(dtype, rows, shape):
    # (1100, 70): more than 1024 rows of W per tile (accumulated over two tiles of W rows) and
    # a partial 6-column tile of grad_x; (37, 33): odd rows of W, each starting mid-byte.
    out_features, in_features, blocksize = shape
    packed, absmax = ops.nf4_quantize(sample(out_features * in_features, torch.float32, rows), blocksize)
    x = sample(rows * in_features, dtype, 1).reshape(rows, in_features).requires_grad_()
    y = ops.nf4_matmul(x, packed, absmax, out_features, blocksize)
    g = sample(rows * out_features, dtype, 2).reshape(rows, out_features)
    (gx,) = torch.autograd.grad(y, x, g)
    assert_grad_within_tolerance_rule(gx, g, packed, absmax, in_features, blocksize, f"rows={rows}")


def test_grad_input_several_passes_and_strided_grad():
    out_features, in_features = 900, 80
    packed, absmax = ops.nf4_quantize(sample(out_features * in_features, torch.float32), 64)
    # 1200 rows of 900 floats: two 4 MiB passes of grad_y.
    g = sample(1200 * out_features, torch.float32, 3).reshape(out_features, 1200).t()
    gx = torch.ops.lora_ext.nf4_matmul_grad_input(g, packed, absmax, in_features, 64)
    assert_grad_within_tolerance_rule(gx, g, packed, absmax, in_features, 64, "passes")
