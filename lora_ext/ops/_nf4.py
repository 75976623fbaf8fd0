"""NF4 (4-bit NormalFloat) ops: bitsandbytes-exact quantisation and the 4-bit matmul.

Semantics of each op: the function of the same name in lora_ext.reference (bitsandbytes'
rules, to the bit). Wrappers check their arguments and name what is wrong.
"""
import math

import torch
from torch import Tensor

from ..reference._nf4 import ABSMAX_BLOCKSIZES, DYNAMIC_CODE, NF4_BLOCKSIZES, NF4_CODE
from ._common import autocast_active, autocast_eligible, register_autocast_rule

_ops = torch.ops.lora_ext
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_list(dtypes) -> str:
    return ", ".join(str(d) for d in dtypes)


def _check_tensor(op: str, name: str, t, dtypes=None) -> None:
    if t is None:
        raise ValueError(f"{op}: {name} is missing (got None); it is required")
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected {_dtype_list(dtypes)}")


def _check_blocksize(op: str, blocksize, allowed=NF4_BLOCKSIZES) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in allowed:
        raise ValueError(f"{op}: blocksize must be one of {allowed}, got {blocksize!r}")
    return blocksize


def _check_same_device(op: str, first: tuple[str, Tensor], *others: tuple[str, Tensor]) -> None:
    for name, t in others:
        if t is not None and t.device != first[1].device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first[0]} is on {first[1].device}")


def _check_packed(op: str, packed: Tensor, absmax: Tensor, n: int, blocksize: int,
                  what: str) -> None:
    _check_tensor(op, "packed", packed, (torch.uint8,))
    _check_tensor(op, "absmax", absmax, (torch.float32,))
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"{op}: packed has {packed.numel()} bytes but {what} has {n} elements, "
                         f"which pack into {(n + 1) // 2} bytes")
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"{op}: absmax has {absmax.numel()} values but {what} with blocksize "
                         f"{blocksize} has {blocks} blocks")
    _check_same_device(op, ("packed", packed), ("absmax", absmax))


def _check_shape(op: str, shape) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"{op}: shape must be a sequence of non-negative ints, got {shape!r}")
    return tuple(shape)


# ---------------------------------------------------------------- quantize / dequantize


def nf4_quantize(x: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """NF4-quantise x (any shape, flattened row-major), bit-exact with bitsandbytes.

    Semantics (reference.nf4_quantize)::

        v = x.flatten().float();  absmax[b] = v[b*bs:(b+1)*bs].abs().max()
        code[i] = bucketize(clamp(v[i] / absmax[i // bs], -1, 1), NF4_BOUNDS)
        packed[k] = code[2k] << 4 | code[2k+1]          # shape [ceil(n/2), 1]

    Returns (packed uint8 [ceil(n/2), 1], absmax fp32 [ceil(n/blocksize)]), the same bytes as
    bitsandbytes.functional.quantize_4bit(x, blocksize=bs, quant_type="nf4").
    """
    op = "nf4_quantize"
    _check_tensor(op, "x", x, _FLOAT_DTYPES)
    _check_blocksize(op, blocksize)
    return _ops.nf4_quantize(x, blocksize)


def nf4_dequantize(packed: Tensor, absmax: Tensor, shape=None, blocksize: int = 64,
                   dtype: torch.dtype | None = None, *, out: Tensor | None = None) -> Tensor:
    """Dequantise NF4 codes: out[i] = NF4_CODE[code[i]] * absmax[i // blocksize] (in fp32).

    Semantics (reference.nf4_dequantize); the result, cast to dtype, has `shape` and equals
    bitsandbytes.functional.dequantize_4bit to the bit. dtype defaults to float32 (to out's
    dtype when out is given).

    With `out` (an existing fp32/fp16/bf16 tensor, any strides) the values are written into
    it and it is returned: no allocation, as bitsandbytes' dequantize_4bit(..., out=out).
    `shape` and `dtype` may then be omitted; if given they must match out's.
    """
    op = "nf4_dequantize"
    _check_blocksize(op, blocksize)
    if out is not None:
        _check_tensor(op, "out", out, _FLOAT_DTYPES)
        if shape is not None and _check_shape(op, shape) != tuple(out.shape):
            raise ValueError(f"{op}: out has shape {tuple(out.shape)} but shape {tuple(shape)} was asked for")
        if dtype is not None and dtype != out.dtype:
            raise TypeError(f"{op}: out has dtype {out.dtype} but dtype {dtype} was asked for")
        _check_packed(op, packed, absmax, out.numel(), blocksize, f"out {tuple(out.shape)}")
        _check_same_device(op, ("packed", packed), ("out", out))
        _ops.nf4_dequantize_out(packed, absmax, blocksize, out)
        return out
    if shape is None:
        raise ValueError(f"{op}: shape is missing; it is required unless out is given")
    shape = _check_shape(op, shape)
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be one of {_dtype_list(_FLOAT_DTYPES)}, got {dtype}")
    _check_packed(op, packed, absmax, math.prod(shape), blocksize, f"shape {shape}")
    return _ops.nf4_dequantize(packed, absmax, list(shape), blocksize, dtype)


def _code_on(op: str, code, device) -> Tensor:
    if code is None:
        return _dynamic_code_on(device)
    _check_tensor(op, "code", code, (torch.float32,))
    if code.numel() != 256:
        raise ValueError(f"{op}: code must hold 256 values (an 8-bit map), got {code.numel()}")
    return code.to(device).reshape(-1)


_DYNAMIC_ON: dict = {}


def _dynamic_code_on(device) -> Tensor:
    key = str(device)
    if key not in _DYNAMIC_ON:
        _DYNAMIC_ON[key] = DYNAMIC_CODE.to(device)
    return _DYNAMIC_ON[key]


def quantize_absmax(absmax: Tensor, blocksize: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantisation of NF4 statistics, as bitsandbytes' compress_statistics=True.

    Semantics (reference.quantize_absmax)::

        offset = absmax.mean();  c = absmax - offset
        codes, absmax2 = 8-bit blockwise quantisation of c with DYNAMIC_CODE

    Returns (codes uint8 [n], absmax2 fp32 [ceil(n/blocksize)], offset 0-d fp32), equal to
    bitsandbytes' (state.absmax, state.state2.absmax, state.offset).
    """
    op = "quantize_absmax"
    _check_tensor(op, "absmax", absmax, (torch.float32,))
    _check_blocksize(op, blocksize, ABSMAX_BLOCKSIZES)
    if absmax.numel() == 0:
        raise ValueError(f"{op}: absmax is empty; there is nothing to quantise")
    return _ops.nf4_quantize_absmax(absmax, _dynamic_code_on(absmax.device), blocksize)


def dequantize_absmax(codes: Tensor, absmax2: Tensor, offset: Tensor, blocksize: int = 256,
                      code: Tensor | None = None) -> Tensor:
    """fp32 absmax from its double quantisation: code[codes] * absmax2 + offset.

    Semantics (reference.dequantize_absmax); each step rounds to fp32 as bitsandbytes does.
    `code` is the 8-bit map (a checkpoint's nested_quant_map); default DYNAMIC_CODE.
    """
    op = "dequantize_absmax"
    _check_tensor(op, "codes", codes, (torch.uint8,))
    _check_tensor(op, "absmax2", absmax2, (torch.float32,))
    _check_tensor(op, "offset", offset, (torch.float32,))
    _check_blocksize(op, blocksize, ABSMAX_BLOCKSIZES)
    if offset.numel() != 1:
        raise ValueError(f"{op}: offset must hold one value, got shape {tuple(offset.shape)}")
    blocks = -(-codes.numel() // blocksize)
    if absmax2.numel() != blocks:
        raise ValueError(f"{op}: absmax2 has {absmax2.numel()} values but {codes.numel()} codes "
                         f"with blocksize {blocksize} need {blocks}")
    _check_same_device(op, ("codes", codes), ("absmax2", absmax2), ("offset", offset))
    table = _code_on(op, code, codes.device)
    return _ops.nf4_dequantize_absmax(codes.reshape(-1), absmax2, offset.reshape(()), table,
                                      blocksize)


# ---------------------------------------------------------------- 4-bit matmul


def _check_matmul(op, x, packed, absmax, out_features, blocksize, bias) -> None:
    _check_tensor(op, "x", x, _FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., in_features]")
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"{op}: out_features must be a positive int, got {out_features!r}")
    _check_blocksize(op, blocksize)
    in_features = x.shape[-1]
    if in_features == 0:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}, with no input features; the 4-bit "
                         "weight needs in_features >= 1")
    _check_packed(op, packed, absmax, out_features * in_features, blocksize,
                  f"a weight [{out_features}, {in_features}] (out_features, x.shape[-1])")
    if bias is not None:
        _check_tensor(op, "bias", bias)
        if bias.dtype != x.dtype and not (autocast_active(x) and autocast_eligible(x)
                                          and autocast_eligible(bias)):
            raise TypeError(f"{op}: bias has dtype {bias.dtype} but x has {x.dtype}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"{op}: bias must have shape [{out_features}], got {tuple(bias.shape)}")
    _check_same_device(op, ("x", x), ("packed", packed), ("absmax", absmax), ("bias", bias))


def nf4_matmul(x: Tensor, packed: Tensor, absmax: Tensor, out_features: int, blocksize: int = 64,
               bias: Tensor | None = None) -> Tensor:
    """y = x @ dequant(W).T + bias with an NF4 weight W [out_features, in_features].

    Semantics (reference.nf4_matmul)::

        W = nf4_dequantize(packed, absmax, (out_features, x.shape[-1]), blocksize, x.dtype)
        y = x @ W.T + bias

    x [..., in] in fp32/fp16/bf16; y [..., out] in x's dtype (under torch.autocast: x and bias
    in the autocast dtype, as F.linear there). Differentiable with respect to x and bias;
    backward recomputes from the packed weight (no dense copy is kept).
    """
    _check_matmul("nf4_matmul", x, packed, absmax, out_features, blocksize, bias)
    return _ops.nf4_matmul(x, packed, absmax, out_features, blocksize, bias)


# ---------------------------------------------------------------- fakes


@torch.library.register_fake("lora_ext::nf4_quantize")
def _nf4_quantize_fake(x, blocksize):
    n = x.numel()
    return (x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            x.new_empty((-(-n // blocksize),), dtype=torch.float32))


@torch.library.register_fake("lora_ext::nf4_dequantize")
def _nf4_dequantize_fake(packed, absmax, shape, blocksize, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("lora_ext::nf4_dequantize_out")
def _nf4_dequantize_out_fake(packed, absmax, blocksize, out):
    return None


@torch.library.register_fake("lora_ext::nf4_matmul")
def _nf4_matmul_fake(x, packed, absmax, out_features, blocksize, bias):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("lora_ext::nf4_matmul_grad_input")
def _nf4_matmul_grad_input_fake(grad_y, packed, absmax, in_features, blocksize):
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


@torch.library.register_fake("lora_ext::nf4_quantize_absmax")
def _nf4_quantize_absmax_fake(absmax, code, blocksize):
    n = absmax.numel()
    return (absmax.new_empty((n,), dtype=torch.uint8), absmax.new_empty((-(-n // blocksize),)),
            absmax.new_empty(()))


@torch.library.register_fake("lora_ext::nf4_dequantize_absmax")
def _nf4_dequantize_absmax_fake(codes, absmax2, offset, code, blocksize):
    return absmax2.new_empty((codes.numel(),))


# ---------------------------------------------------------------- autograd
# The weight is frozen (packed codes have no gradient): x and bias get gradients, and the
# backward dequantises tiles of W again instead of keeping a dense copy.


def _nf4_matmul_setup_context(ctx, inputs, output):
    x, packed, absmax, out_features, blocksize, bias = inputs
    ctx.save_for_backward(packed, absmax)
    ctx.in_features = x.shape[-1]
    ctx.blocksize = blocksize
    ctx.out_features = out_features


def _nf4_matmul_backward(ctx, grad_y):
    packed, absmax = ctx.saved_tensors
    need_x, _, _, _, _, need_bias = ctx.needs_input_grad
    grad_x = grad_bias = None
    if need_x:
        grad_x = _ops.nf4_matmul_grad_input(grad_y, packed, absmax, ctx.in_features,
                                            ctx.blocksize)
    if need_bias:
        grad_bias = grad_y.reshape(-1, ctx.out_features).sum(0)
    return grad_x, None, None, None, None, grad_bias


torch.library.register_autograd("lora_ext::nf4_matmul", _nf4_matmul_backward,
                                setup_context=_nf4_matmul_setup_context)
# x and bias run in the autocast dtype; the codes and fp32 absmax are left as they are.
register_autocast_rule("nf4_matmul", (0, 5))


def _nf4_grad_input_setup_context(ctx, inputs, output):
    grad_y, packed, absmax, in_features, blocksize = inputs
    ctx.save_for_backward(packed, absmax)
    ctx.out_features = grad_y.shape[-1]
    ctx.blocksize = blocksize


def _nf4_grad_input_backward(ctx, grad_grad_x):
    # grad_x = grad_y @ W is linear in grad_y: its derivative is another nf4_matmul.
    packed, absmax = ctx.saved_tensors
    grad_grad_y = None
    if ctx.needs_input_grad[0]:
        grad_grad_y = _ops.nf4_matmul(grad_grad_x, packed, absmax, ctx.out_features,
                                      ctx.blocksize, None)
    return grad_grad_y, None, None, None, None


torch.library.register_autograd("lora_ext::nf4_matmul_grad_input", _nf4_grad_input_backward,
                                setup_context=_nf4_grad_input_setup_context)


__all__ = ["ABSMAX_BLOCKSIZES", "DYNAMIC_CODE", "NF4_BLOCKSIZES", "NF4_CODE", "dequantize_absmax",
           "nf4_dequantize", "nf4_matmul", "nf4_quantize", "quantize_absmax"]
