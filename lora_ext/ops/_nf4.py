"""NF4 (4-bit NormalFloat) ops: bitsandbytes-exact quantisation and the 4-bit matmul.

Semantics of each op: the function of the same name in lora_ext.reference (bitsandbytes'
rules, to the bit). Wrappers check their arguments and name what is wrong.
"""
import math

import torch
from torch import Tensor

from ..reference import _nf4 as _ref
from ..reference._nf4 import ABSMAX_BLOCKSIZES, DYNAMIC_CODE, NF4_BLOCKSIZES, NF4_CODE

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
    return _ref.nf4_quantize(x, blocksize)


def nf4_dequantize(packed: Tensor, absmax: Tensor, shape, blocksize: int = 64,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """Dequantise NF4 codes: out[i] = NF4_CODE[code[i]] * absmax[i // blocksize] (in fp32).

    Semantics (reference.nf4_dequantize); the result, cast to dtype, has `shape` and equals
    bitsandbytes.functional.dequantize_4bit to the bit.
    """
    op = "nf4_dequantize"
    shape = _check_shape(op, shape)
    _check_blocksize(op, blocksize)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be one of {_dtype_list(_FLOAT_DTYPES)}, got {dtype}")
    _check_packed(op, packed, absmax, math.prod(shape), blocksize, f"shape {shape}")
    return _ref.nf4_dequantize(packed, absmax, shape, blocksize, dtype)


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
    return _ref.quantize_absmax(absmax, blocksize)


def dequantize_absmax(codes: Tensor, absmax2: Tensor, offset: Tensor,
                      blocksize: int = 256) -> Tensor:
    """fp32 absmax from its double quantisation: DYNAMIC_CODE[codes] * absmax2 + offset."""
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
    return _ref.dequantize_absmax(codes, absmax2, offset.reshape(()), blocksize)


# ---------------------------------------------------------------- 4-bit matmul


def _check_matmul(op, x, packed, absmax, out_features, blocksize, bias) -> None:
    _check_tensor(op, "x", x, _FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., in_features]")
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"{op}: out_features must be a positive int, got {out_features!r}")
    _check_blocksize(op, blocksize)
    in_features = x.shape[-1]
    _check_packed(op, packed, absmax, out_features * in_features, blocksize,
                  f"a weight [{out_features}, {in_features}] (out_features, x.shape[-1])")
    if bias is not None:
        _check_tensor(op, "bias", bias)
        if bias.dtype != x.dtype:
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

    x [..., in] in fp32/fp16/bf16; y [..., out] in x's dtype. Differentiable with respect to
    x and bias; backward recomputes from the packed weight (no dense copy is kept).
    """
    _check_matmul("nf4_matmul", x, packed, absmax, out_features, blocksize, bias)
    return _ref.nf4_matmul(x, packed, absmax, out_features, blocksize, bias)


__all__ = ["ABSMAX_BLOCKSIZES", "DYNAMIC_CODE", "NF4_BLOCKSIZES", "NF4_CODE", "dequantize_absmax",
           "nf4_dequantize", "nf4_matmul", "nf4_quantize", "quantize_absmax"]
