"""The 4-bit matmul on CUDA: the GEMV (1 to 8 rows, one pass) and the tiled GEMM (more rows,
W decoded into shared memory), forward and gradient of x, every dtype, the row counts on both
sides of each switch and of the GEMM's 64-row tiles, odd shapes and partial NF4 blocks, plain
and double-quantised absmax, under the tolerance rule; and the tiled GEMM against the
dequantise-then-cuBLAS path that LORA_EXT_NF4_CUDA_GEMM_ROWS selects. GPU only (the same
kernels run in the CUDA emulation of csrc/tests/emu/test_emu_nf4.cpp without one)."""
import os
import subprocess
import sys

import pytest
import torch

import lora_ext  # noqa: F401  (loads the kernels)
from lora_ext import ops, reference
from test_nf4_ops import DTYPES, assert_within_tolerance_rule, sample

pytestmark = pytest.mark.gpu

# (out, in, blocksize): tile multiples; in % 8 != 0 with a partial last NF4 block; one NF4
# block per row of W; out and in past a tile edge.
SHAPES = [(128, 256, 64), (19, 70, 32), (3, 4096, 4096), (130, 200, 64)]
ROWS = [1, 8, 9, 63, 64, 65, 130]


def _grad_within_tolerance_rule(grad_x, g, packed, absmax, out_features, in_features, blocksize, what):
    w = reference.nf4_dequantize(packed, absmax, (out_features, in_features), blocksize, torch.float32)
    truth = g.double() @ w.double()
    torch_grad = (g @ w.to(g.dtype)).double()  # PyTorch's own, in the same precision
    torch_err = (torch_grad - truth).abs().max().item()
    our_err = (grad_x.double() - truth).abs().max().item()
    floor = torch.finfo(g.dtype).eps * truth.abs().max().item() * 4
    assert grad_x.dtype == g.dtype and grad_x.shape == truth.shape
    assert our_err <= 2 * torch_err + floor, f"{what}: error {our_err} vs PyTorch's {torch_err}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "nested"])
def test_cuda_matmul_every_path(dtype, rows, double_quant):
    for out_features, in_features, blocksize in SHAPES:
        w = sample(out_features * in_features, torch.float32, rows).reshape(out_features, in_features)
        packed, absmax = ops.nf4_quantize(w.cuda(), blocksize)
        if double_quant:
            absmax = ops.dequantize_absmax(*ops.quantize_absmax(absmax))
        x = sample(rows * in_features, dtype, 1).reshape(rows, in_features).cuda().requires_grad_()
        bias = sample(out_features, dtype, 2).cuda()
        what = f"rows={rows} {out_features}x{in_features} bs={blocksize}"
        y = ops.nf4_matmul(x, packed, absmax, out_features, blocksize, bias)
        assert_within_tolerance_rule(y.detach().cpu(), x.detach().cpu(), packed.cpu(), absmax.cpu(),
                                     out_features, blocksize, bias.cpu(), what)
        g = sample(rows * out_features, dtype, 3).reshape(rows, out_features).cuda()
        y.backward(g)
        _grad_within_tolerance_rule(x.grad.cpu(), g.cpu(), packed.cpu(), absmax.cpu(), out_features,
                                    in_features, blocksize, what + " grad")


def test_cuda_tiled_gemm_agrees_with_the_cublas_path(tmp_path):
    """LORA_EXT_NF4_CUDA_GEMM_ROWS=0 sends every GEMM through dequantised tiles and cuBLAS, a large
    value every GEMM through the tiled kernel (each in a fresh process: the variable is read once);
    the two agree to bf16 rounding. The tolerance rule against fp64 is test_cuda_matmul_every_path's."""
    script = tmp_path / "paths.py"
    script.write_text(
        "import sys, torch\n"
        "from lora_ext import ops\n"
        "torch.manual_seed(0)\n"
        "packed, absmax = ops.nf4_quantize(torch.randn(300, 136, device='cuda'), 64)\n"
        "x = torch.randn(70, 136, device='cuda', dtype=torch.bfloat16, requires_grad=True)\n"
        "y = ops.nf4_matmul(x, packed, absmax, 300, 64)\n"
        "y.backward(torch.ones_like(y))\n"
        "torch.save((y.detach().cpu(), x.grad.cpu()), sys.argv[1])\n")
    results = []
    for limit in ("1000000", "0"):      # every row count tiled; none
        env = dict(os.environ, LORA_EXT_NF4_CUDA_GEMM_ROWS=limit)
        path = tmp_path / f"out{limit}.pt"
        done = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(torch.load(path))
    (y_tiled, gx_tiled), (y_cublas, gx_cublas) = results
    torch.testing.assert_close(y_tiled.float(), y_cublas.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx_tiled.float(), gx_cublas.float(), rtol=2e-2, atol=2e-2)
