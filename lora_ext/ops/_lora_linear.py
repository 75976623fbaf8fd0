"""Fused LoRA linear and its dropout mask: wrappers, fakes and autograd."""
import math

import torch
from torch import Tensor

from ._common import SUPPORTED_DTYPES as _SUPPORTED_DTYPES
from ._common import autocast_active as _autocast_active
from ._common import autocast_eligible as _autocast_eligible
from ._common import check_dropout as _check_dropout
from ._common import check_int as _check_int
from ._common import check_seed as _check_seed
from ._common import register_autocast_rule as _register_autocast_rule

_ops = torch.ops.lora_ext


def _check_lora_linear(x, weight, bias, lora_A, lora_B, scaling) -> bool:
    """Raise on bad arguments; True when the adapters have another dtype than x (mixed)."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"lora_linear: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in named.items():
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"lora_linear: {name} has dtype {t.dtype}; expected one of "
                            f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}")
        if t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device}")
    mixed = False
    if not (_autocast_active(x) and all(_autocast_eligible(t) for t in named.values())):
        # Outside autocast: x, weight and bias share one dtype, lora_A and lora_B one dtype;
        # adapters of another dtype (PEFT's fp32 adapters over a half base) run the mixed path.
        for name in ("weight", "bias"):
            if name in named and named[name].dtype != x.dtype:
                raise TypeError(f"lora_linear: {name} has dtype {named[name].dtype} but x has "
                                f"{x.dtype}; x, weight and bias must share one dtype")
        if lora_B.dtype != lora_A.dtype:
            raise TypeError(f"lora_linear: lora_A has dtype {lora_A.dtype} but lora_B has "
                            f"{lora_B.dtype}; lora_A and lora_B must share one dtype")
        mixed = lora_A.dtype != x.dtype
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"lora_linear: x must have shape [..., {in_features}] to match weight "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features or lora_A.shape[0] < 1:
        raise ValueError(f"lora_linear: lora_A must have shape [r, {in_features}] with r >= 1, "
                         f"got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_linear: lora_B must have shape [{out_features}, {r}], "
                         f"got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"lora_linear: bias must have shape [{out_features}], got {tuple(bias.shape)}")
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"lora_linear: scaling must be a finite float, got {scaling!r}")
    return mixed


# ---------------------------------------------------------------- fused LoRA linear


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_p: float = 0.0, seed: int | Tensor = 0,
                training: bool = True, offset: int = 0, lora_bias: Tensor | None = None) -> Tensor:
    """Fused LoRA linear layer.

    Semantics (reference.lora_linear)::

        p = dropout_p if training else 0
        mask = philox_keep_mask(x.shape, p, seed, offset)    # reference.dropout_mask
        y = x @ weight.T + bias + scaling * (((x * mask / (1 - p)) @ lora_A.T) @ lora_B.T + lora_bias)

    Shapes: x [..., in], weight [out, in], bias [out] or None, lora_A [r, in],
    lora_B [out, r], lora_bias [out] or None (PEFT's lora_B bias, lora_bias=True). Backward
    keeps only x and z = drop(x) @ lora_A.T (r columns) and regenerates the mask from
    (seed, offset). lora_bias joins the kernel's bias as bias + scaling * lora_bias (an
    autograd op, so its gradient is scaling * sum(grad_y)); with adapters of another dtype
    it is added in the adapter branch, in their dtype, as PEFT adds it.

    seed: an int, or a one-element int64 tensor (what layers pass: torch.compile traces a
    seed drawn as a tensor, ops.dropout_seed, without a graph break).

    Dtypes: x, weight and bias share one dtype, lora_A and lora_B one dtype. Adapters of
    another dtype (PEFT's fp32 adapters over a half base) get PEFT's arithmetic: the base
    product in x's dtype, the adapter branch in the adapters' dtype, the sum rounded once to
    x's dtype; every gradient comes in its parameter's dtype. Under torch.autocast every
    tensor runs in the autocast dtype (the op's autocast rule), as PEFT's layers do there.
    """
    mixed = _check_lora_linear(x, weight, bias, lora_A, lora_B, scaling)
    if lora_bias is not None:
        _check_lora_bias(lora_bias, lora_A, weight.shape[0])
    p = _check_dropout(dropout_p)  # checked in eval too: a bad config fails at once
    if not training:
        p = 0.0
    scalars = (float(scaling), p, _check_seed(seed), _check_int("offset", offset))
    if mixed:
        y, _ = _MixedLoraLinear.apply(x, weight, bias, lora_A, lora_B, *scalars, lora_bias)
        return y
    if lora_bias is not None:
        folded = lora_bias * scalars[0]
        bias = folded if bias is None else bias + folded
    y, _ = _ops.lora_linear_forward(x, weight, bias, lora_A, lora_B, *scalars)
    return y


def _check_lora_bias(lora_bias, lora_A: Tensor, out_features: int) -> None:
    if not isinstance(lora_bias, Tensor):
        raise TypeError(f"lora_linear: lora_bias must be a Tensor or None, got {type(lora_bias).__name__}")
    if tuple(lora_bias.shape) != (out_features,):
        raise ValueError(f"lora_linear: lora_bias must have shape [{out_features}], got {tuple(lora_bias.shape)}")
    if lora_bias.device != lora_A.device:
        raise ValueError(f"lora_linear: lora_bias is on {lora_bias.device} but lora_A is on {lora_A.device}")
    if lora_bias.dtype != lora_A.dtype and not (_autocast_active(lora_A) and _autocast_eligible(lora_bias)):
        raise TypeError(f"lora_linear: lora_bias has dtype {lora_bias.dtype} but lora_A has {lora_A.dtype}; "
                        "lora_bias belongs to the adapter and shares its dtype")


@torch.library.register_fake("lora_ext::lora_linear_forward")
def _lora_linear_forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, offset):
    rows = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    z = x.new_empty((rows, lora_A.shape[0]))
    return y, z


@torch.library.register_fake("lora_ext::lora_linear_backward")
def _lora_linear_backward_fake(grad_y, x, z, weight, lora_A, lora_B, scaling, dropout_p, seed,
                               offset, output_mask):
    def grad_like(t, needed):
        return t.new_empty(t.shape) if needed else t.new_empty((0,))
    return (grad_like(x, output_mask[0]), grad_like(lora_A, output_mask[1]),
            grad_like(lora_B, output_mask[2]))


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, offset = inputs
    _, z = output
    # x and z are the only activations kept. The parameters are referenced, not copied;
    # their versions are recorded so that an in-place update before backward is caught,
    # as save_for_backward would.
    ctx.save_for_backward(x, z)
    ctx.params = (weight, lora_A, lora_B)
    ctx.param_versions = None if torch.compiler.is_compiling() else tuple(
        t._version for t in ctx.params)
    ctx.scalars = (scaling, dropout_p, seed, offset)


def _lora_linear_backward(ctx, grad_y, grad_z):
    x, z = ctx.saved_tensors
    weight, lora_A, lora_B = ctx.params
    if ctx.param_versions is not None:
        for name, t, version in zip(("weight", "lora_A", "lora_B"), ctx.params, ctx.param_versions):
            if t._version != version:
                raise RuntimeError(
                    f"lora_linear: {name} was modified in place between forward and backward "
                    f"(version {version} -> {t._version}); gradients would be wrong")
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    if torch.is_grad_enabled():  # create_graph=True: the kernel has no derivative of its own
        return _lora_linear_backward_differentiable(ctx, grad_y, x, z, weight, lora_A, lora_B)
    grad_x, grad_a, grad_b = _ops.lora_linear_backward(
        grad_y, x, z, weight, lora_A, lora_B, *ctx.scalars, [need_x, need_a, need_b])
    grad_w = grad_bias = None
    if need_w or need_bias:
        g2d = grad_y.reshape(-1, weight.shape[0])
        if need_w:
            grad_w = g2d.T @ x.reshape(-1, weight.shape[1])
        if need_bias:
            grad_bias = g2d.sum(0)
    return (grad_x if need_x else None, grad_w, grad_bias, grad_a if need_a else None,
            grad_b if need_b else None, None, None, None, None)


def _lora_linear_backward_differentiable(ctx, grad_y, x, z, weight, lora_A, lora_B):
    """The same gradients as lora_linear_backward, as differentiable PyTorch ops.

    Used only for higher-order derivatives (create_graph=True), where speed matters less
    than being right; the mask still comes from the Philox kernel.
    """
    scaling, dropout_p, seed, offset = ctx.scalars
    x2d = x.reshape(-1, weight.shape[1])
    g2d = grad_y.reshape(-1, weight.shape[0])
    if dropout_p > 0.0:
        keep = dropout_mask(x2d, dropout_p, seed, offset).to(x.dtype) / (1.0 - dropout_p)
    else:
        keep = torch.ones((), dtype=x.dtype, device=x.device)
    dropped = x2d * keep
    z = dropped @ lora_A.T  # recomputed so that it is differentiable with respect to x and A
    grad_z = scaling * (g2d @ lora_B)
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    grad_x = ((g2d @ weight + (grad_z @ lora_A) * keep).reshape(x.shape)) if need_x else None
    grad_w = g2d.T @ x2d if need_w else None
    grad_bias = g2d.sum(0) if need_bias else None
    grad_a = grad_z.T @ dropped if need_a else None
    grad_b = scaling * (g2d.T @ z) if need_b else None
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


torch.library.register_autograd("lora_ext::lora_linear_forward", _lora_linear_backward,
                                setup_context=_lora_linear_setup_context)
# x, weight, bias, lora_A, lora_B run in the autocast dtype.
_register_autocast_rule("lora_linear_forward", (0, 1, 2, 3, 4))


# ---------------------------------------------------------------- adapters of another dtype


def _dropped(x2d: Tensor, dropout_p: float, seed: Tensor, offset: int) -> Tensor:
    """drop(x2d) with the kernel's Philox mask, in x2d's dtype."""
    if dropout_p == 0.0:
        return x2d
    keep = dropout_mask(x2d, dropout_p, seed, offset)
    return x2d * keep.to(x2d.dtype) * (1.0 / (1.0 - dropout_p))


class _MixedLoraLinear(torch.autograd.Function):
    """lora_linear with adapters in another dtype than x and the base (no autocast).

    PEFT computes base(x) in the base dtype and B(A(drop(x.to(adapter dtype)))) * s in the
    adapters' dtype, and rounds the sum once to the base dtype. The kernel takes a single
    dtype, and running the adapter branch in bf16 instead would round A, B, z and the
    adapter gradients to bf16 (their error is then thousands of times PEFT's, measured
    5,800x for grad_A at in = 256, far outside the tolerance rule), so this path is
    composed here from ATen GEMMs and the kernel's Philox
    mask, keeping the fused op's data flow: only x and z (r columns, adapter dtype) are
    saved, drop(x) is regenerated in backward from (seed, offset), never stored.
    """

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, offset, lora_bias=None):
        x2d = x.reshape(-1, weight.shape[1])
        z = _dropped(x2d.to(lora_A.dtype), dropout_p, seed, offset) @ lora_A.T
        y = torch.nn.functional.linear(x2d, weight, bias).to(lora_A.dtype)
        y = y.addmm_(z, lora_B.T, alpha=scaling)
        if lora_bias is not None:
            y = y.add_(lora_bias, alpha=scaling)
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0]), z

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, offset = inputs[:9]
        ctx.save_for_backward(x, output[1], weight, lora_A, lora_B)
        ctx.scalars = (scaling, dropout_p, seed, offset)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_y, _grad_z):
        x, z, weight, lora_A, lora_B = ctx.saved_tensors
        scaling, dropout_p, seed, offset = ctx.scalars
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        need_lora_bias = len(ctx.needs_input_grad) > 9 and ctx.needs_input_grad[9]
        x2d = x.reshape(-1, weight.shape[1])
        g2d = grad_y.reshape(-1, weight.shape[0])
        g = g2d.to(lora_A.dtype)
        dropped = None
        if need_a or torch.is_grad_enabled():
            dropped = _dropped(x2d.to(lora_A.dtype), dropout_p, seed, offset)
        if torch.is_grad_enabled():  # create_graph=True: z as a function of x and A
            z = dropped @ lora_A.T
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_b:
            grad_b = (g.T @ z) * scaling
        if need_x or need_a:
            grad_z = (g @ lora_B) * scaling
            if need_a:
                grad_a = grad_z.T @ dropped
            if need_x:
                branch = _dropped(grad_z @ lora_A, dropout_p, seed, offset).to(x.dtype)
                grad_x = torch.addmm(branch, g2d, weight).view(x.shape)
        if need_w:
            grad_w = g2d.T @ x2d
        if need_bias:
            grad_bias = g2d.sum(0)
        grad_lora_bias = g.sum(0) * scaling if need_lora_bias else None
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None, grad_lora_bias


# ---------------------------------------------------------------- dropout mask


def dropout_mask(like: Tensor, dropout_p: float, seed: int | Tensor, offset: int = 0) -> Tensor:
    """The keep mask lora_linear uses, as a bool tensor of like's shape and device.

    Semantics: reference.dropout_mask (Philox-4x32-10 of (seed, offset, element index)).
    seed: an int or a one-element int64 tensor, as for lora_linear.
    """
    if not isinstance(like, Tensor):
        raise TypeError(f"dropout_mask: like must be a Tensor, got {type(like).__name__}")
    return _ops.dropout_mask(like, _check_dropout(dropout_p), _check_seed(seed),
                             _check_int("offset", offset))


@torch.library.register_fake("lora_ext::dropout_mask")
def _dropout_mask_fake(like, dropout_p, seed, offset):
    return like.new_empty(like.shape, dtype=torch.bool)


def dropout_seed(device: torch.device | str = "cpu") -> Tensor:
    """A fresh dropout seed: a 0-d int64 tensor from the default generator of `device`.

    Semantics (reference.dropout_seed)::

        torch.randint(0, 2**62, (), dtype=torch.int64, device=device)

    The layers draw on the CPU: the ops read seeds on the host, so a CPU seed serves inputs
    on any device without a sync. torch.manual_seed reproduces it and torch.utils.checkpoint
    (which restores the generator before recomputing) redraws it. Under torch.compile it is
    one op in the graph, no graph break, drawn from the same generator with every backend
    (inductor included), so compiled code draws eager mode's seeds and masks.
    """
    return _ops.dropout_seed(torch.device(device))


@torch.library.register_fake("lora_ext::dropout_seed")
def _dropout_seed_fake(device):
    return torch.empty((), dtype=torch.int64, device=device)
