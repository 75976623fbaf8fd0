"""NF4 ops: bit-exact against the real bitsandbytes on CPU, kernels against the reference,
the 4-bit matmul under the tolerance rule, autograd, opcheck, torch.compile, bad input."""
import itertools
import math

import pytest
import torch

import lora_ext  # noqa: F401  (loads the kernels)
from lora_ext import ops, reference

bnb_f = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
SIZES = [1, 7, 64, 333, 4096, 10001]
GPU = pytest.mark.gpu


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, so that equality is bit equality (NaN == NaN)."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return t.contiguous().view(view[t.dtype]) if t.dtype in view else t


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    differ = (bits(got) != bits(want)).sum().item()
    assert differ == 0, f"{what}: {differ} of {got.numel()} elements differ"


def sample(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).add(0.1) * 3
    return x.to(dtype)


def bnb_quantize(x: torch.Tensor, blocksize: int, double: bool = False):
    return bnb_f.quantize_4bit(x, blocksize=blocksize, quant_type="nf4",
                               compress_statistics=double)


# ---------------------------------------------------------------- tables


def test_codebooks_equal_bitsandbytes():
    assert_bit_equal(ops.NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu"), "NF4_CODE")
    assert_bit_equal(ops.DYNAMIC_CODE, bnb_f.create_dynamic_map(signed=True), "DYNAMIC_CODE")
    assert ops.NF4_CODE is reference.NF4_CODE


# ---------------------------------------------------------------- quantize


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_bit_exact_with_bitsandbytes(dtype, blocksize):
    for n in SIZES:
        x = sample(n, dtype, seed=n)
        want_packed, state = bnb_quantize(x, blocksize)
        for name, fn in (("kernel", ops.nf4_quantize), ("reference", reference.nf4_quantize)):
            packed, absmax = fn(x, blocksize)
            assert_bit_equal(packed, want_packed, f"{name} packed n={n}")
            assert_bit_equal(absmax, state.absmax, f"{name} absmax n={n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_special_values_match_bitsandbytes(dtype):
    code = reference.NF4_CODE
    bounds = reference._nf4.NF4_BOUNDS
    # Ties: a block whose absmax is 1 holds every midpoint exactly (bitsandbytes takes the
    # lower code), the codes themselves, their neighbours one ulp away, a zero block, a
    # constant block and a block with one non-zero value.
    ties = torch.cat([torch.tensor([1.0]), bounds, code, torch.nextafter(bounds, bounds + 1),
                      torch.nextafter(bounds, bounds - 1)])
    ties = torch.nn.functional.pad(ties, (0, 64 - ties.numel()), value=0.25)
    blocks = [ties, torch.zeros(64), torch.full((64,), -2.5), torch.zeros(64).index_fill_(0, torch.tensor([5]), 1e-3),
              torch.full((64,), 1e-30), torch.linspace(-7, 7, 64)]
    x = torch.cat(blocks).to(dtype)
    for n in (x.numel(), x.numel() - 33):  # also with a partial last block
        want_packed, state = bnb_quantize(x[:n], 64)
        packed, absmax = ops.nf4_quantize(x[:n], 64)
        assert_bit_equal(packed, want_packed, f"packed n={n}")
        assert_bit_equal(absmax, state.absmax, f"absmax n={n}")
        assert_bit_equal(reference.nf4_quantize(x[:n], 64)[0], want_packed, "reference")


def test_quantize_non_finite_kernel_matches_reference():
    x = sample(256, torch.float32)
    x[3], x[70], x[140], x[141] = float("nan"), float("inf"), float("-inf"), float("inf")
    for got, want in zip(ops.nf4_quantize(x, 64), reference.nf4_quantize(x, 64)):
        assert_bit_equal(got, want, "non-finite")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_shapes_and_layout(dtype):
    x = sample(6 * 35, dtype).reshape(6, 35)
    packed, absmax = ops.nf4_quantize(x, 32)
    assert packed.shape == (105, 1) and packed.dtype == torch.uint8
    assert absmax.shape == (7,) and absmax.dtype == torch.float32
    # Element 2k in the high nibble of byte k.
    codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten()
    s0 = x.flatten()[0].float() / absmax[0]
    assert codes[0].item() == torch.bucketize(s0, reference._nf4.NF4_BOUNDS).item()
    # A non-contiguous view quantises its logical (row-major) order.
    xt = sample(64 * 6, dtype).reshape(64, 6).t()
    assert not xt.is_contiguous()
    for got, want in zip(ops.nf4_quantize(xt, 64), ops.nf4_quantize(xt.contiguous(), 64)):
        assert_bit_equal(got, want, "non-contiguous")


def test_quantize_empty():
    packed, absmax = ops.nf4_quantize(torch.empty(0, 64), 64)
    assert packed.shape == (0, 1) and absmax.shape == (0,)
    assert ops.nf4_dequantize(packed, absmax, (0, 64), 64).shape == (0, 64)


# ---------------------------------------------------------------- dequantize


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_dequantize_bit_exact_with_bitsandbytes(dtype, blocksize):
    shapes = [(4, 2 * blocksize), (3, blocksize), (2, 3 * blocksize + 17), (blocksize + 3,), (5, 7)]
    for shape in shapes:
        x = sample(math.prod(shape), torch.float32, seed=len(shape)).reshape(shape)
        packed, state = bnb_quantize(x, blocksize)
        if shape[-1] % 2 == 0 and shape[-1] % blocksize != 0:
            # bitsandbytes' native CPU kernel indexes absmax per row there (a bitsandbytes
            # bug); its own generic path, the reference of every other device, is compared.
            from bitsandbytes.backends.default.ops import _dequantize_4bit_compute as generic
            want = generic(packed.reshape(-1), state.absmax, reference.NF4_CODE, blocksize,
                           shape, dtype)
        else:
            state.dtype = dtype
            want = bnb_f.dequantize_4bit(packed, state).reshape(shape)  # bnb makes 1-D into [1, n]
        got = ops.nf4_dequantize(packed, state.absmax, shape, blocksize, dtype)
        assert_bit_equal(got, want, f"shape {shape}")
        assert_bit_equal(reference.nf4_dequantize(packed, state.absmax, shape, blocksize, dtype),
                         want, f"reference shape {shape}")


def test_dequantize_kernel_matches_reference_on_odd_sizes():
    for n, blocksize, dtype in itertools.product([1, 3, 31, 33, 65, 1001], [32, 64, 256], DTYPES):
        x = sample(n, torch.float32, seed=n)
        packed, absmax = ops.nf4_quantize(x, blocksize)
        got = ops.nf4_dequantize(packed, absmax, (n,), blocksize, dtype)
        assert_bit_equal(got, reference.nf4_dequantize(packed, absmax, (n,), blocksize, dtype),
                         f"n={n} bs={blocksize}")


def test_dequantize_accepts_flat_or_column_packed():
    x = sample(128, torch.float32)
    packed, absmax = ops.nf4_quantize(x, 64)
    a = ops.nf4_dequantize(packed, absmax, (2, 64), 64)
    b = ops.nf4_dequantize(packed.flatten(), absmax, torch.Size([2, 64]), 64)
    assert_bit_equal(a, b)


# ---------------------------------------------------------------- double quantisation


@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
def test_double_quant_bit_exact_with_bitsandbytes(blocksize):
    for n in (64, 4096 * 7 + 5, 256 * 256 + 100, 1_000_003):
        x = sample(n, torch.bfloat16, seed=n)
        packed, state = bnb_quantize(x, blocksize, double=True)
        _, absmax = ops.nf4_quantize(x, blocksize)
        codes, absmax2, offset = ops.quantize_absmax(absmax)
        assert_bit_equal(codes, state.absmax, f"codes n={n}")
        assert_bit_equal(absmax2, state.state2.absmax, f"absmax2 n={n}")
        assert_bit_equal(offset, state.offset, f"offset n={n}")
        for got_r, got_k in zip(reference.quantize_absmax(absmax), (codes, absmax2, offset)):
            assert_bit_equal(got_r, got_k, "reference")
        restored = ops.dequantize_absmax(codes, absmax2, offset)
        want = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert_bit_equal(restored, want, "dequantize_absmax")
        assert_bit_equal(reference.dequantize_absmax(codes, absmax2, offset), want, "reference")
        # The whole nested dequantisation, as bitsandbytes does it.
        got = ops.nf4_dequantize(packed, restored, (n,), blocksize, torch.bfloat16)
        assert_bit_equal(got, bnb_f.dequantize_4bit(packed, state).reshape(n), "nested dequant")


def test_double_quant_special_blocks():
    # A block of values all equal to the mean (centred block of zeros -> codes 0).
    absmax = torch.cat([torch.full((256,), 0.5), torch.rand(300) + 0.1])
    absmax[:256] = absmax.mean()
    got = ops.quantize_absmax(absmax)
    want = reference.quantize_absmax(absmax)
    for g, w in zip(got, want):
        assert_bit_equal(g, w)
    assert got[0][:256].eq(0).all() or got[1][0] != 0


def test_dequantize_absmax_with_custom_code():
    code = torch.linspace(-1, 1, 256)
    codes = torch.randint(0, 256, (600,), dtype=torch.uint8)
    absmax2 = torch.rand(3)
    offset = torch.tensor(0.25)
    got = ops.dequantize_absmax(codes, absmax2, offset, 256, code=code)
    want = code[codes.long()] * absmax2.repeat_interleave(256)[:600] + offset
    assert_bit_equal(got, want)


# ---------------------------------------------------------------- 4-bit matmul


def fp64_truth(x, packed, absmax, out_features, blocksize, bias):
    w = reference.nf4_dequantize(packed, absmax, (out_features, x.shape[-1]), blocksize,
                                 torch.float32).double()
    y = x.double() @ w.T
    return y + bias.double() if bias is not None else y


def assert_within_tolerance_rule(got, x, packed, absmax, out_features, blocksize, bias, what=""):
    """Our error vs fp64 is at most 2x PyTorch's own error in x's dtype (plus a floor of a
    few ulps of the output scale, for outputs PyTorch happens to get exactly right)."""
    truth = fp64_truth(x, packed, absmax, out_features, blocksize, bias)
    torch_y = reference.nf4_matmul(x, packed, absmax, out_features, blocksize, bias)
    torch_err = (torch_y.double() - truth).abs().max().item()
    our_err = (got.double() - truth).abs().max().item()
    floor = torch.finfo(x.dtype).eps * truth.abs().max().item() * 4
    assert got.dtype == x.dtype and got.shape == truth.shape
    assert our_err <= 2 * torch_err + floor, f"{what}: error {our_err} vs PyTorch's {torch_err}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 9, 40, 64])
@pytest.mark.parametrize("shape", [(48, 64, 64), (33, 96, 32), (7, 33, 32), (20, 256, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matmul_matches_reference(dtype, rows, shape):
    out_features, in_features, blocksize = shape
    w = sample(out_features * in_features, torch.float32, seed=rows).reshape(out_features, in_features)
    packed, absmax = ops.nf4_quantize(w, blocksize)
    x = sample(rows * in_features, dtype, seed=rows + 1).reshape(rows, in_features)
    bias = sample(out_features, dtype, seed=5)
    for b in (None, bias):
        y = ops.nf4_matmul(x, packed, absmax, out_features, blocksize, b)
        assert_within_tolerance_rule(y, x, packed, absmax, out_features, blocksize, b,
                                     f"rows={rows} bias={b is not None}")


def test_matmul_batched_non_contiguous_and_empty():
    packed, absmax = ops.nf4_quantize(sample(24 * 64, torch.float32).reshape(24, 64), 64)
    x = sample(2 * 64 * 5, torch.float32).reshape(2, 64, 5).transpose(1, 2)  # [2, 5, 64]
    assert not x.is_contiguous()
    y = ops.nf4_matmul(x, packed, absmax, 24, 64)
    assert y.shape == (2, 5, 24)
    assert_within_tolerance_rule(y, x, packed, absmax, 24, 64, None, "non-contiguous")
    empty = ops.nf4_matmul(torch.empty(0, 3, 64), packed, absmax, 24, 64)
    assert empty.shape == (0, 3, 24)


@pytest.mark.parametrize("rows", [2, 30])
def test_matmul_gradients(rows):
    out_features, in_features, blocksize = 12, 64, 32
    packed, absmax = ops.nf4_quantize(sample(out_features * in_features, torch.float32), blocksize)
    x = sample(rows * in_features, torch.float32, 1).reshape(rows, in_features).requires_grad_()
    bias = sample(out_features, torch.float32, 2).requires_grad_()
    torch.autograd.gradcheck(
        lambda x, b: ops.nf4_matmul(x, packed, absmax, out_features, blocksize, b), (x, bias),
        eps=1e-2, atol=2e-3, rtol=1e-3)
    # Against autograd through the reference (dense weight), in float64.
    y = ops.nf4_matmul(x, packed, absmax, out_features, blocksize, bias)
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, bias), g)
    w = reference.nf4_dequantize(packed, absmax, (out_features, in_features), blocksize).double()
    torch.testing.assert_close(gx.double(), g.double() @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, g.sum(0))


def test_matmul_double_backward():
    packed, absmax = ops.nf4_quantize(sample(8 * 32, torch.float32), 32)
    x = sample(3 * 32, torch.float32, 1).reshape(3, 32).requires_grad_()
    torch.autograd.gradgradcheck(lambda x: ops.nf4_matmul(x, packed, absmax, 8, 32), (x,),
                                 eps=1e-2, atol=2e-3, rtol=1e-3)


def test_matmul_backward_keeps_no_dense_weight():
    out_features, in_features = 64, 128
    packed, absmax = ops.nf4_quantize(sample(out_features * in_features, torch.float32), 64)
    x = sample(16 * in_features, torch.bfloat16).reshape(16, in_features).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.nf4_matmul(x, packed, absmax, out_features, 64)
    assert saved, "nothing saved"
    for t in saved:
        assert not (t.is_floating_point() and t.numel() >= out_features * in_features), \
            f"a dense tensor {tuple(t.shape)} {t.dtype} is kept for backward"
    y.sum().backward()
    assert x.grad.shape == x.shape


# ---------------------------------------------------------------- opcheck and compile


def _opcheck_cases():
    w = sample(24 * 64, torch.float32).reshape(24, 64)
    packed, absmax = ops.nf4_quantize(w, 32)
    codes, absmax2, offset = ops.quantize_absmax(absmax)
    x = sample(3 * 64, torch.float32, 1).reshape(3, 64).requires_grad_()
    xb = sample(20 * 64, torch.bfloat16, 1).reshape(20, 64)
    bias = sample(24, torch.float32).requires_grad_()
    lib = torch.ops.lora_ext
    return [
        (lib.nf4_quantize.default, (w, 32)),
        (lib.nf4_quantize.default, (w.to(torch.bfloat16), 64)),
        (lib.nf4_dequantize.default, (packed, absmax, [24, 64], 32, torch.bfloat16)),
        (lib.nf4_matmul.default, (x, packed, absmax, 24, 32, bias)),
        (lib.nf4_matmul.default, (xb, packed, absmax, 24, 32, None)),
        (lib.nf4_matmul_grad_input.default, (sample(3 * 24, torch.float32).reshape(3, 24), packed,
                                             absmax, 64, 32)),
        (lib.nf4_quantize_absmax.default, (absmax, ops.DYNAMIC_CODE, 256)),
        (lib.nf4_dequantize_absmax.default, (codes, absmax2, offset, ops.DYNAMIC_CODE, 256)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    w = sample(40 * 64, torch.float32).reshape(40, 64)

    def fn(w, x):
        packed, absmax = ops.nf4_quantize(w, 64)
        codes, absmax2, offset = ops.quantize_absmax(absmax)
        restored = ops.dequantize_absmax(codes, absmax2, offset)
        deq = ops.nf4_dequantize(packed, restored, w.shape, 64, torch.float32)
        return ops.nf4_matmul(x, packed, restored, 40, 64), deq

    x = sample(5 * 64, torch.float32, 1).reshape(5, 64)
    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(w, x), fn(w, x)):
        assert_bit_equal(got, want)


# ---------------------------------------------------------------- bad input


def test_bad_input_names_the_problem():
    x = sample(128, torch.float32).reshape(2, 64)
    packed, absmax = ops.nf4_quantize(x, 64)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        ops.nf4_quantize(x, 48)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        ops.nf4_quantize(x, 8192)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        ops.nf4_quantize(x.double(), 64)
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        ops.nf4_quantize(x.int(), 64)
    with pytest.raises(ValueError, match="packed has 64 bytes but shape \\(2, 65\\)"):
        ops.nf4_dequantize(packed, absmax, (2, 65), 64)
    with pytest.raises(ValueError, match="absmax has 2 values but shape \\(2, 64\\) with blocksize 32"):
        ops.nf4_dequantize(packed, absmax, (2, 64), 32)
    with pytest.raises(ValueError, match="absmax is missing"):
        ops.nf4_dequantize(packed, None, (2, 64), 64)
    with pytest.raises(TypeError, match="packed has dtype torch.float32; expected torch.uint8"):
        ops.nf4_dequantize(packed.float(), absmax, (2, 64), 64)
    with pytest.raises(TypeError, match="absmax has dtype torch.float16"):
        ops.nf4_dequantize(packed, absmax.half(), (2, 64), 64)
    with pytest.raises(TypeError, match="dtype must be one of"):
        ops.nf4_dequantize(packed, absmax, (2, 64), 64, torch.int8)
    with pytest.raises(ValueError, match="shape must be a sequence"):
        ops.nf4_dequantize(packed, absmax, (2, -64), 64)
    xx = torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"packed has 64 bytes but a weight \[3, 64\]"):
        ops.nf4_matmul(xx, packed, absmax, 3, 64)
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        ops.nf4_matmul(xx, packed, absmax, 0, 64)
    with pytest.raises(ValueError, match=r"bias must have shape \[2\]"):
        ops.nf4_matmul(xx, packed, absmax, 2, 64, torch.zeros(3))
    with pytest.raises(TypeError, match="bias has dtype torch.float16 but x has torch.float32"):
        ops.nf4_matmul(xx, packed, absmax, 2, 64, torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="absmax is missing"):
        ops.nf4_matmul(xx, packed, None, 2, 64)
    codes, absmax2, offset = ops.quantize_absmax(torch.rand(300))
    with pytest.raises(ValueError, match="absmax2 has 2 values but 300 codes with blocksize 64 need 5"):
        ops.dequantize_absmax(codes, absmax2, offset, 64)
    with pytest.raises(ValueError, match="offset must hold one value"):
        ops.dequantize_absmax(codes, absmax2, torch.zeros(2))
    with pytest.raises(ValueError, match="code must hold 256 values"):
        ops.dequantize_absmax(codes, absmax2, offset, code=torch.zeros(16))
    with pytest.raises(TypeError, match="absmax has dtype torch.float16"):
        ops.quantize_absmax(torch.rand(30).half())
    with pytest.raises(ValueError, match="absmax is empty"):
        ops.quantize_absmax(torch.empty(0))


def test_kernels_reject_bad_input_too():
    # The C++ checks stand behind the Python ones for direct torch.ops calls.
    packed, absmax = ops.nf4_quantize(torch.randn(128), 64)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        torch.ops.lora_ext.nf4_quantize(torch.randn(64), 48)
    with pytest.raises(RuntimeError, match="packed has 64 bytes"):
        torch.ops.lora_ext.nf4_dequantize(packed, absmax, [3, 64], 64, torch.float32)


# ---------------------------------------------------------------- GPU


@GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernels_bit_equal_to_cpu(dtype):
    for n, blocksize in itertools.product([1, 333, 4096 * 3 + 7], [32, 64, 4096]):
        x = sample(n, dtype, seed=n)
        cpu = ops.nf4_quantize(x, blocksize)
        gpu = ops.nf4_quantize(x.cuda(), blocksize)
        for g, c in zip(gpu, cpu):
            assert_bit_equal(g.cpu(), c, f"quantize n={n}")
        for out_dtype in DTYPES:
            got = ops.nf4_dequantize(gpu[0], gpu[1], (n,), blocksize, out_dtype)
            assert_bit_equal(got.cpu(), ops.nf4_dequantize(*cpu, (n,), blocksize, out_dtype))
        # The offset is torch's mean on the device (as bitsandbytes takes it), whose summation
        # order differs between devices: the reference on the same device is the oracle.
        for g, r in zip(ops.quantize_absmax(gpu[1]), reference.quantize_absmax(gpu[1])):
            assert_bit_equal(g.cpu(), r.cpu(), "quantize_absmax")
        codes, absmax2, offset = ops.quantize_absmax(cpu[1])
        got = ops.dequantize_absmax(codes.cuda(), absmax2.cuda(), offset.cuda())
        assert_bit_equal(got.cpu(), ops.dequantize_absmax(codes, absmax2, offset))


@GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 4, 7, 64])
def test_cuda_matmul(dtype, rows):
    for out_features, in_features, blocksize in [(96, 256, 64), (33, 96, 32), (7, 33, 32)]:
        w = sample(out_features * in_features, torch.float32).reshape(out_features, in_features)
        packed, absmax = ops.nf4_quantize(w.cuda(), blocksize)
        x = sample(rows * in_features, dtype, 1).reshape(rows, in_features).cuda()
        bias = sample(out_features, dtype, 2).cuda()
        y = ops.nf4_matmul(x, packed, absmax, out_features, blocksize, bias)
        assert_within_tolerance_rule(y.cpu(), x.cpu(), packed.cpu(), absmax.cpu(), out_features,
                                     blocksize, bias.cpu(), f"cuda rows={rows}")
        x.requires_grad_()
        ops.nf4_matmul(x, packed, absmax, out_features, blocksize).sum().backward()
        w_deq = reference.nf4_dequantize(packed, absmax, (out_features, in_features), blocksize)
        torch.testing.assert_close(x.grad.float(), w_deq.sum(0).expand(rows, -1),
                                   rtol=2e-2, atol=2e-2)


def test_gemm_tiles_and_gemv_threshold_paths(tmp_path):
    """The GEMV/GEMM switch, forced through LORA_EXT_NF4_GEMV_ROWS in a fresh process (GEMV
    for every row, for none, and between); LORA_EXT_NF4_TILE_BYTES sizes CUDA's tiles and must
    change nothing on the CPU."""
    import os
    import subprocess
    import sys
    script = tmp_path / "tiles.py"
    script.write_text(
        "import torch\n"
        "from lora_ext import ops, reference\n"
        "torch.manual_seed(0)\n"
        "w = torch.randn(37, 96)\n"
        "packed, absmax = ops.nf4_quantize(w, 32)\n"
        "wd = reference.nf4_dequantize(packed, absmax, (37, 96), 32).double()\n"
        "for rows in (1, 3, 6, 20):\n"
        "    x = torch.randn(rows, 96, requires_grad=True)\n"
        "    b = torch.randn(37)\n"
        "    y = ops.nf4_matmul(x, packed, absmax, 37, 32, b)\n"
        "    torch.testing.assert_close(y.double(), x.double() @ wd.T + b.double(), rtol=1e-5, atol=1e-5)\n"
        "    g = torch.randn_like(y)\n"
        "    y.backward(g)\n"
        "    torch.testing.assert_close(x.grad.double(), g.double() @ wd, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n")
    for tile, gemv_rows in (("1000", "0"), ("4096", "2"), ("100000", "64")):
        env = dict(os.environ, LORA_EXT_NF4_TILE_BYTES=tile, LORA_EXT_NF4_GEMV_ROWS=gemv_rows)
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
        assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("rows", [1, 3, 12])
def test_matmul_bf16_wide_rows(rows):
    # in = 2048: rows of x 4 KiB apart, which the bf16 GEMV pads apart in L1.
    out_features, in_features = 8, 2048
    packed, absmax = ops.nf4_quantize(sample(out_features * in_features, torch.float32), 64)
    x = sample(rows * in_features, torch.bfloat16, 3).reshape(rows, in_features)
    bias = sample(out_features, torch.bfloat16, 4)
    y = ops.nf4_matmul(x, packed, absmax, out_features, 64, bias)
    assert_within_tolerance_rule(y, x, packed, absmax, out_features, 64, bias, f"rows={rows}")
