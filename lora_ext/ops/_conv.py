"""LoRA on convolutions (PEFT's lora.Conv1d/2d/3d, one adapter, groups 1): the merged-weight
op and the merged convolution built on it."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import SUPPORTED_DTYPES as _SUPPORTED_DTYPES

_ops = torch.ops.lora_ext
_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _check_factors(op, weight, lora_A, lora_B, scaling) -> None:
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of "
                            f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}")
        if t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but weight is on {weight.device}")
    if lora_A.dtype != weight.dtype or lora_B.dtype != weight.dtype:
        raise TypeError(f"{op}: weight, lora_A and lora_B must share one dtype, got {weight.dtype}, "
                        f"{lora_A.dtype} and {lora_B.dtype}")
    if weight.dim() not in _CONV:
        raise ValueError(f"{op}: weight must be a Conv1d/2d/3d weight [out, in, k...] (3 to 5 dims), "
                         f"got shape {tuple(weight.shape)}")
    out, r = weight.shape[0], lora_A.shape[0] if lora_A.dim() else 0
    if lora_A.dim() != weight.dim() or tuple(lora_A.shape[1:]) != tuple(weight.shape[1:]) or r < 1:
        raise ValueError(f"{op}: lora_A must have shape [r, {', '.join(map(str, weight.shape[1:]))}] with "
                         f"r >= 1 (groups 1), got {tuple(lora_A.shape)}")
    want_b = (out, r) + (1,) * (weight.dim() - 2)
    if tuple(lora_B.shape) != want_b:
        raise ValueError(f"{op}: lora_B must have shape {list(want_b)}, got {tuple(lora_B.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"{op}: scaling must be a finite float, got {scaling!r}")


def lora_conv_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The merged convolution weight of one LoRA adapter.

    Semantics (reference.lora_conv_weight)::

        weight + scaling * (lora_B.reshape(out, r) @ lora_A.reshape(r, -1)).reshape(weight.shape)

    Shapes: weight [out, in, k...] (Conv1d/2d/3d, groups 1), lora_A [r, in, k...] and
    lora_B [out, r, 1...] (PEFT's lora_A / lora_B conv weights), one dtype. One pass over
    weight's rows: each element is W[o, c] + s·Σ_j B[o, j]·A[j, c] accumulated in fp32 (fp64
    for fp64) and rounded once. Backward: grad_weight = g, grad_A = s·Bᵀ·g, grad_B = s·g·Aᵀ.
    """
    _check_factors("lora_conv_weight", weight, lora_A, lora_B, scaling)
    return _ops.lora_conv_weight(weight, lora_A, lora_B, float(scaling))


@torch.library.register_fake("lora_ext::lora_conv_weight")
def _conv_weight_fake(weight, lora_A, lora_B, scaling):
    return weight.new_empty(weight.shape)


def _conv_weight_setup_context(ctx, inputs, output):
    weight, lora_A, lora_B, scaling = inputs
    ctx.save_for_backward(lora_A, lora_B)
    ctx.scaling = scaling


def _conv_weight_backward(ctx, grad):
    lora_A, lora_B = ctx.saved_tensors
    r, out = lora_A.shape[0], grad.shape[0]
    g = grad.reshape(out, -1).to(lora_A.dtype)
    grad_a = grad_b = None
    if ctx.needs_input_grad[1]:
        grad_a = (lora_B.reshape(out, r).T @ g * ctx.scaling).reshape(lora_A.shape)
    if ctx.needs_input_grad[2]:
        grad_b = (g @ lora_A.reshape(r, -1).T * ctx.scaling).reshape(lora_B.shape)
    return grad if ctx.needs_input_grad[0] else None, grad_a, grad_b, None


torch.library.register_autograd("lora_ext::lora_conv_weight", _conv_weight_backward,
                                setup_context=_conv_weight_setup_context)


def _tuple(value, dims: int, name: str) -> tuple[int, ...]:
    values = (value,) * dims if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(values) != dims or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"lora_conv: {name} must be an int or {dims} ints, got {value!r}")
    return values


def lora_conv(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
              scaling: float, stride=1, padding=0) -> Tensor:
    """LoRA convolution as one convolution with the merged weight.

    Semantics (reference.lora_conv, PEFT's three convolutions)::

        conv(x, weight, bias, stride, padding)
            + scaling * conv(conv(x, lora_A, None, stride, padding), lora_B)

    computed as conv(x, lora_conv_weight(weight, lora_A, lora_B, scaling), bias, stride,
    padding): exact without dropout (groups 1, dilation 1, zero padding given as ints).
    x [N, in, *spatial] (or unbatched), all tensors of one dtype.

    Backward keeps x and the merged weight. grad_x is one transposed convolution with the
    merged weight. grad_A and grad_B take the low-rank route, with PEFT's own kernels: z =
    conv(x, A) is recomputed (r channels), grad_B and grad_z are the 1x1 convolution B's
    gradients for grad_y·s, grad_A is A's weight gradient for grad_z. The full weight
    gradient of the merged weight is formed only when weight itself trains, so a training step
    costs what PEFT's three convolutions cost, and the adapters' gradients are summed as PEFT
    sums them (not through grad_W, which would reassociate the sums).
    """
    _check_factors("lora_conv", weight, lora_A, lora_B, scaling)
    dims = weight.dim() - 2
    if not isinstance(x, Tensor) or x.dim() not in (dims + 1, dims + 2):
        raise ValueError(f"lora_conv: x must be [N, {weight.shape[1]}, spatial x{dims}] (or unbatched), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise TypeError(f"lora_conv: x is {x.dtype} on {x.device} but weight is {weight.dtype} on {weight.device}")
    if bias is not None and (bias.dtype != weight.dtype or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"lora_conv: bias must be {weight.dtype} [{weight.shape[0]}], got "
                         f"{bias.dtype} {tuple(bias.shape)}")
    return _MergedConv.apply(x, weight, bias, lora_A, lora_B, float(scaling),
                             _tuple(stride, dims, "stride"), _tuple(padding, dims, "padding"))[0]


class _MergedConv(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, scaling, stride, padding):
        merged = _ops.lora_conv_weight(weight, lora_A, lora_B, scaling)
        return _CONV[weight.dim()](x, merged, bias, stride, padding), merged

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scaling, stride, padding = inputs
        ctx.save_for_backward(x, output[1], lora_A, lora_B)
        ctx.scalars = (scaling, stride, padding)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_merged):
        x, merged, lora_A, lora_B = ctx.saved_tensors
        scaling, stride, padding = ctx.scalars
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        unbatched = x.dim() == merged.dim() - 1
        if unbatched:
            x, grad_y = x.unsqueeze(0), grad_y.unsqueeze(0)
        dims = merged.dim() - 2
        ones, zeros = (1,) * dims, (0,) * dims

        def conv_backward(grad, inp, w, mask):
            return torch.ops.aten.convolution_backward(grad, inp, w, None, stride, padding, ones, False,
                                                       zeros, 1, mask)

        grad_x, grad_w, _ = conv_backward(grad_y, x, merged, [need_x, need_w, False])
        grad_a = grad_b = None
        if need_a or need_b:
            # PEFT's adapter backward, kernel for kernel: the 1x1 convolution B sees grad_y·s and
            # z = conv(x, A) (recomputed: r channels); A's weight gradient comes from grad_z.
            z = _CONV[merged.dim()](x, lora_A, None, stride, padding)
            grad_z, grad_b, _ = torch.ops.aten.convolution_backward(
                grad_y * scaling, z, lora_B, None, ones, zeros, ones, False, zeros, 1, [need_a, need_b, False])
            if need_a:
                grad_a = conv_backward(grad_z, x, lora_A, [False, True, False])[1]
        if grad_x is not None and unbatched:
            grad_x = grad_x.squeeze(0)
        grad_bias = grad_y.sum([0, *range(2, grad_y.dim())]) if need_bias else None
        return (grad_x if need_x else None, grad_w if need_w else None, grad_bias, grad_a, grad_b,
                None, None, None)


def dora_conv(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
              scaling: float, stride=1, padding=0) -> Tensor:
    """DoRA on a convolution (PEFT's use_dora=True on Conv1d/2d/3d, no dropout at work).

    Semantics (reference.dora_conv)::

        merged = lora_conv_weight(weight, lora_A, lora_B, scaling)
        g = magnitude.reshape(out) / ‖merged[o]‖  (per output channel, detached, as PEFT)
        y = g[o] * conv(x, merged) + bias

    which is PEFT's base(x) + (g - 1)·conv(x, W) + g·s·lora(x) as one convolution: lora_conv
    with no bias, scaled per channel. magnitude [1, out, 1...] or [out] (PEFT keeps
    [1, out, 1, ...]), of weight's dtype. Backward as lora_conv's (low-rank for A and B),
    plus the magnitude's gradient.
    """
    if not isinstance(magnitude, Tensor) or magnitude.numel() != weight.shape[0] or magnitude.dtype != weight.dtype \
            or magnitude.device != weight.device:
        got = (f"{magnitude.dtype} {tuple(magnitude.shape)} on {magnitude.device}" if isinstance(magnitude, Tensor)
               else type(magnitude).__name__)
        raise ValueError(f"dora_conv: magnitude must be a {weight.dtype} tensor of {weight.shape[0]} elements on "
                         f"{weight.device}, got {got}")
    with torch.no_grad():
        merged = lora_conv_weight(weight, lora_A, lora_B, scaling)
        norm = torch.linalg.vector_norm(merged.reshape(merged.shape[0], -1), dim=1)
    y = lora_conv(x, weight, None, lora_A, lora_B, scaling, stride, padding)
    channel = (-1,) + (1,) * (weight.dim() - 2)
    g = (magnitude.reshape(-1) / norm).reshape(channel)
    y = g * y
    return y if bias is None else y + bias.reshape(channel)
