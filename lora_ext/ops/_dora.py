"""DoRA: the weight norm and the DoRA linear layer: wrappers, fakes and autograd."""
import math

import torch
from torch import Tensor

from ._common import SUPPORTED_DTYPES as _SUPPORTED_DTYPES
from ._common import check_dropout as _check_dropout
from ._common import autocast_active as _autocast_active
from ._common import autocast_eligible as _autocast_eligible
from ._common import check_int as _check_int
from ._common import check_seed as _check_seed
from ._common import register_autocast_rule as _register_autocast_rule
from ._lora_linear import _dropped as _dropped_x
from ._lora_linear import dropout_mask

_ops = torch.ops.lora_ext


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensors(op: str, named: dict, like_name: str, same_dtype: bool = True) -> None:
    like = named[like_name]
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in named.items():
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of "
                            f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}")
    for name, t in named.items():
        if same_dtype and t.dtype != like.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {like_name} has {like.dtype}; "
                            "all tensors must share one dtype")
        if t.device != like.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {like_name} is on {like.device}")


def _check_factors(op: str, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features or lora_A.shape[0] < 1:
        raise ValueError(f"{op}: lora_A must have shape [r, {in_features}] with r >= 1, "
                         f"got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"{op}: lora_B must have shape [{out_features}, {r}], got {tuple(lora_B.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"{op}: scaling must be a finite float, got {scaling!r}")


# ---------------------------------------------------------------- weight norm


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """‖W + s·B·A‖ of every output row, without forming W + s·B·A.

    Semantics (reference.dora_weight_norm)::

        torch.linalg.vector_norm(W.float() + scaling * (B.float() @ A.float()), dim=1)

    Shapes: weight [out, in] (row- or column-contiguous: Conv1D's and Embedding's Wᵀ are read
    in place), lora_A [r, in], lora_B [out, r]. Returns [out] in fp32 (fp64 for fp64 inputs).
    W is read once; each element of W + s·B·A is formed in registers in the accumulation type,
    so the result is as accurate as PyTorch's fp32 norm of the formed matrix, also when s·B·A
    cancels most of W. Not differentiable: DoRA detaches the norm.
    """
    _check_tensors("dora_weight_norm", {"weight": weight, "lora_A": lora_A, "lora_B": lora_B}, "weight")
    _check_factors("dora_weight_norm", weight, lora_A, lora_B, scaling)
    return _ops.dora_weight_norm(weight, lora_A, lora_B, float(scaling))


@torch.library.register_fake("lora_ext::dora_weight_norm")
def _dora_weight_norm_fake(weight, lora_A, lora_B, scaling):
    return weight.new_empty((weight.shape[0],), dtype=_acc_dtype(weight.dtype))


def _dora_weight_norm_backward(ctx, grad):
    raise RuntimeError("dora_weight_norm is not differentiable: DoRA treats the norm as a constant "
                       "(pass detached tensors)")


torch.library.register_autograd("lora_ext::dora_weight_norm", _dora_weight_norm_backward,
                                setup_context=lambda ctx, inputs, output: None)
# The norm is an fp32 computation: under autocast nothing is cast and autocast is off beneath
# it, so that the GEMM inside (W·Aᵀ) is not turned into a half-precision one.
_register_autocast_rule("dora_weight_norm", ())


# ---------------------------------------------------------------- DoRA linear


def dora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                magnitude: Tensor, scaling: float, dropout_p: float = 0.0, seed: int | Tensor = 0,
                training: bool = True, offset: int = 0, weight_norm: Tensor | None = None) -> Tensor:
    """DoRA linear layer with PEFT's semantics (peft.tuners.lora.dora.DoraLinearLayer).

    Semantics (reference.dora_linear)::

        p = dropout_p if training else 0
        weight_norm = dora_weight_norm(W, A, B, scaling) if weight_norm is None else weight_norm
        g = magnitude / weight_norm.detach()
        d = x * philox_keep_mask(x.shape, p, seed, offset) / (1 - p)
        y = x @ W.T + bias + (g - 1) * (d @ W.T) + g * scaling * (d @ A.T) @ B.T

    Shapes: x [..., in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r],
    magnitude [out], weight_norm [out] (any float dtype; pass a cached one at inference).
    Without dropout the base GEMM x·Wᵀ is computed once and serves both terms. The mask is
    the one ops.lora_linear draws for the same (seed, offset), regenerated in backward; seed is
    an int or a one-element int64 tensor, as for ops.lora_linear.
    Gradients: x, lora_A, lora_B, magnitude, and weight/bias when they require grad.
    """
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B, "magnitude": magnitude}
    if bias is not None:
        named["bias"] = bias
    mixed = _check_dora_dtypes(named)
    _check_factors("dora_linear", weight, lora_A, lora_B, scaling)
    out_features, in_features = weight.shape
    if in_features == 0:
        raise ValueError(f"dora_linear: weight {tuple(weight.shape)} has no input features; DoRA needs "
                         "in_features >= 1 (with none, every weight norm is 0 and g = magnitude / 0)")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"dora_linear: x must have shape [..., {in_features}] to match weight "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"dora_linear: bias must have shape [{out_features}], got {tuple(bias.shape)}")
    if tuple(magnitude.shape) != (out_features,):
        raise ValueError(f"dora_linear: magnitude must have shape [{out_features}], "
                         f"got {tuple(magnitude.shape)}")
    p = _check_dropout(dropout_p)
    if not training:
        p = 0.0
    if weight_norm is None:
        weight_norm = dora_weight_norm(*_norm_operands(weight, lora_A, lora_B), scaling)
    elif not isinstance(weight_norm, Tensor) or not weight_norm.dtype.is_floating_point:
        raise TypeError(f"dora_linear: weight_norm must be a floating-point Tensor or None, got "
                        f"{getattr(weight_norm, 'dtype', type(weight_norm).__name__)}")
    elif tuple(weight_norm.shape) != (out_features,) or weight_norm.device != x.device:
        raise ValueError(f"dora_linear: weight_norm must have shape [{out_features}] on {x.device}, "
                         f"got {tuple(weight_norm.shape)} on {weight_norm.device}")
    args = (x, weight, bias, lora_A, lora_B, magnitude, weight_norm.detach(), float(scaling), p,
            _check_seed(seed), _check_int("offset", offset))
    y, _, _ = _MixedDoraLinear.apply(*args) if mixed else _ops.dora_linear_forward(*args)
    return y


def _check_dora_dtypes(named: dict) -> bool:
    """Raise on bad dtypes or devices; True when the adapters have another dtype than x."""
    _check_tensors("dora_linear", named, "x", same_dtype=False)
    x, lora_A = named["x"], named["lora_A"]
    if _autocast_active(x) and all(_autocast_eligible(t) for t in named.values()):
        return False  # the autocast rule casts them all
    for name in ("weight", "bias"):
        if name in named and named[name].dtype != x.dtype:
            raise TypeError(f"dora_linear: {name} has dtype {named[name].dtype} but x has {x.dtype}; "
                            "x, weight and bias must share one dtype")
    for name in ("lora_B", "magnitude"):
        if named[name].dtype != lora_A.dtype:
            raise TypeError(f"dora_linear: lora_A has dtype {lora_A.dtype} but {name} has "
                            f"{named[name].dtype}; lora_A, lora_B and magnitude must share one dtype")
    return lora_A.dtype != x.dtype


def _norm_operands(weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """W, A, B (detached) in the wider of the base's and the adapters' dtypes: PEFT forms
    W + s·B·A in the adapters' dtype (fp32 adapters over a half base: in fp32)."""
    dtype = torch.promote_types(weight.dtype, lora_A.dtype)
    return tuple(t.detach().to(dtype) for t in (weight, lora_A, lora_B))


@torch.library.register_fake("lora_ext::dora_linear_forward")
def _dora_linear_forward_fake(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling,
                              dropout_p, seed, offset):
    rows = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, x.new_empty((rows, lora_A.shape[0])), x.new_empty((rows, weight.shape[0]))


@torch.library.register_fake("lora_ext::dora_linear_backward")
def _dora_linear_backward_fake(grad_y, x, z, hm, weight, lora_A, lora_B, magnitude, weight_norm,
                               scaling, dropout_p, seed, offset, output_mask):
    def grad_like(t, needed):
        return t.new_empty(t.shape) if needed else t.new_empty((0,))
    return (grad_like(x, output_mask[0]), grad_like(lora_A, output_mask[1]),
            grad_like(lora_B, output_mask[2]), grad_like(magnitude, output_mask[3]))


_PARAM_NAMES = ("weight", "lora_A", "lora_B", "magnitude", "weight_norm")


def _dora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, offset = inputs
    _, z, hm = output
    # Activations kept: x, z (r columns) and hm (what g multiplies; PEFT keeps the same-sized
    # base result). Parameters are referenced, not saved, with their versions recorded so
    # that an in-place update before backward is caught as save_for_backward would.
    ctx.save_for_backward(x, z, hm)
    ctx.params = (weight, lora_A, lora_B, magnitude, weight_norm)
    ctx.param_versions = None if torch.compiler.is_compiling() else tuple(
        t._version for t in ctx.params)
    ctx.scalars = (scaling, dropout_p, seed, offset)


def _dropped(x2d: Tensor, dropout_p: float, seed: Tensor, offset: int) -> Tensor:
    if dropout_p == 0.0:
        return x2d
    return x2d * dropout_mask(x2d, dropout_p, seed, offset).to(x2d.dtype) / (1.0 - dropout_p)


def _magnitude_scale(magnitude: Tensor, weight_norm: Tensor) -> Tensor:
    acc = _acc_dtype(magnitude.dtype)
    return (magnitude.to(acc) / weight_norm.detach().to(acc)).to(magnitude.dtype)


def _dora_linear_backward(ctx, grad_y, grad_z, grad_hm):
    x, z, hm = ctx.saved_tensors
    weight, lora_A, lora_B, magnitude, weight_norm = ctx.params
    if ctx.param_versions is not None:
        for name, t, version in zip(_PARAM_NAMES, ctx.params, ctx.param_versions):
            if t._version != version:
                raise RuntimeError(
                    f"dora_linear: {name} was modified in place between forward and backward "
                    f"(version {version} -> {t._version}); gradients would be wrong")
    need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
    if torch.is_grad_enabled():  # create_graph=True: the kernel has no derivative of its own
        return _dora_linear_backward_differentiable(ctx, grad_y, x, weight, lora_A, lora_B,
                                                    magnitude, weight_norm)
    grad_x, grad_a, grad_b, grad_m = _ops.dora_linear_backward(
        grad_y, x, z, hm, weight, lora_A, lora_B, magnitude, weight_norm, *ctx.scalars,
        [need_x, need_a, need_b, need_m])
    grad_w = grad_bias = None
    if need_w or need_bias:
        scaling, dropout_p, seed, offset = ctx.scalars
        g2d = grad_y.reshape(-1, weight.shape[0])
        if need_w:
            x2d = x.reshape(-1, weight.shape[1])
            g = _magnitude_scale(magnitude, weight_norm)
            if dropout_p == 0.0:
                grad_w = (g2d * g).T @ x2d
            else:
                grad_w = g2d.T @ x2d + (g2d * (g - 1)).T @ _dropped(x2d, dropout_p, seed, offset)
        if need_bias:
            grad_bias = g2d.sum(0)
    return (grad_x if need_x else None, grad_w, grad_bias, grad_a if need_a else None,
            grad_b if need_b else None, grad_m if need_m else None, None, None, None, None, None)


def _dora_linear_backward_differentiable(ctx, grad_y, x, weight, lora_A, lora_B, magnitude, weight_norm):
    """The same gradients as dora_linear_backward as differentiable PyTorch ops, for
    higher-order derivatives only; the mask still comes from the Philox kernel."""
    scaling, dropout_p, seed, offset = ctx.scalars
    x2d = x.reshape(-1, weight.shape[1])
    g2d = grad_y.reshape(-1, weight.shape[0])
    norm = weight_norm.detach().to(magnitude.dtype)
    g = magnitude / norm
    d = _dropped(x2d, dropout_p, seed, offset)
    z = d @ lora_A.T
    hm = d @ weight.T + scaling * (z @ lora_B.T)
    gg = g2d * g
    grad_z = scaling * (gg @ lora_B)
    need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
    grad_x = grad_w = None
    if dropout_p == 0.0:
        if need_x:
            grad_x = (gg @ weight + grad_z @ lora_A).reshape(x.shape)
        if need_w:
            grad_w = gg.T @ x2d
    else:
        keep = dropout_mask(x2d, dropout_p, seed, offset).to(x.dtype) / (1.0 - dropout_p)
        gh = g2d * (g - 1)
        if need_x:
            grad_x = (g2d @ weight + keep * (gh @ weight + grad_z @ lora_A)).reshape(x.shape)
        if need_w:
            grad_w = g2d.T @ x2d + gh.T @ d
    grad_bias = g2d.sum(0) if need_bias else None
    grad_a = grad_z.T @ d if need_a else None
    grad_b = scaling * (gg.T @ z) if need_b else None
    grad_m = (g2d * hm).sum(0) / norm if need_m else None
    return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None, None, None


torch.library.register_autograd("lora_ext::dora_linear_forward", _dora_linear_backward,
                                setup_context=_dora_linear_setup_context)
# x, weight, bias, lora_A, lora_B and magnitude run in the autocast dtype; weight_norm (any
# float dtype, fp32 as dora_weight_norm returns it) is left as it is.
_register_autocast_rule("dora_linear_forward", (0, 1, 2, 3, 4, 5))


# ---------------------------------------------------------------- adapters of another dtype


def _mixed_terms(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, offset):
    """PEFT's DoRA terms with the adapters in their own dtype: (base, d, z, hb, lora), with
    base = x·Wᵀ + b in x's dtype, d = drop(x) and everything after it in the adapters' dtype."""
    dtype = lora_A.dtype
    base = torch.nn.functional.linear(x2d, weight, bias)
    d = _dropped_x(x2d.to(dtype), dropout_p, seed, offset)
    if dropout_p == 0.0:  # PEFT reuses the base output (less its bias) for the base term
        hb = (base if bias is None else base - bias).to(dtype)
    else:  # PEFT: base_noBias(drop(x)) with W cast to the adapters' dtype
        hb = torch.nn.functional.linear(d, weight.to(dtype))
    z = d @ lora_A.T
    return base, d, z, hb, z @ lora_B.T


class _MixedDoraLinear(torch.autograd.Function):
    """dora_linear with lora_A, lora_B and magnitude in another dtype than x and the base
    (PEFT's fp32 adapters over a half base, no autocast), with PEFT's arithmetic:

        y = base(x) + (g - 1)·hb + g·s·(d·Aᵀ)·Bᵀ  in the adapters' dtype, rounded once to x's

    (hb = base(x) - b without dropout, drop(x)·Wᵀ in the adapters' dtype with it). The
    kernel takes one dtype; in bf16 the adapter gradients would lose 16 bits of precision
    (outside the tolerance rule), hence this composition of ATen GEMMs and the kernel's
    Philox mask. Saved: x, z (r columns) and hm = hb + s·z·Bᵀ (what g multiplies, as the
    kernel saves it); drop(x) is regenerated in backward.
    """

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed,
                offset):
        x2d = x.reshape(-1, weight.shape[1])
        base, _, z, hb, lora = _mixed_terms(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                            seed, offset)
        g = _magnitude_scale(magnitude, weight_norm)
        y = base.to(lora_A.dtype).addcmul_(hb, g - 1).addcmul_(lora, g * scaling).to(x.dtype)
        hm = lora.mul_(scaling).add_(hb)
        return y.view(*x.shape[:-1], weight.shape[0]), z, hm

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, offset = inputs
        ctx.save_for_backward(x, output[1], output[2], weight, bias, lora_A, lora_B, magnitude,
                              weight_norm)
        ctx.scalars = (scaling, dropout_p, seed, offset)
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def backward(ctx, grad_y, _grad_z, _grad_hm):
        x, z, hm, weight, bias, lora_A, lora_B, magnitude, weight_norm = ctx.saved_tensors
        scaling, dropout_p, seed, offset = ctx.scalars
        need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        dtype = lora_A.dtype
        x2d = x.reshape(-1, weight.shape[1])
        g2d = grad_y.reshape(-1, weight.shape[0])
        d = _dropped_x(x2d.to(dtype), dropout_p, seed, offset)
        if torch.is_grad_enabled():  # create_graph=True: z and hm as functions of the inputs
            _, d, z, hb, lora = _mixed_terms(x2d, weight, bias, lora_A, lora_B, scaling,
                                             dropout_p, seed, offset)
            hm = hb + scaling * lora
        g = _magnitude_scale(magnitude, weight_norm)
        gy = g2d.to(dtype)
        gg = gy * g
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_m = None
        if need_m:
            grad_m = (gy * hm).sum(0) / weight_norm.detach().to(dtype)
        if need_b:
            grad_b = (gg.T @ z) * scaling
        if need_x or need_a:
            grad_z = (gg @ lora_B) * scaling
            if need_a:
                grad_a = grad_z.T @ d
            if need_x:
                if dropout_p == 0.0:
                    grad_x = torch.addmm((grad_z @ lora_A).to(x.dtype), gg.to(x.dtype), weight)
                else:
                    branch = torch.addmm(grad_z @ lora_A, gy * (g - 1), weight.to(dtype))
                    branch = _dropped_x(branch, dropout_p, seed, offset).to(x.dtype)
                    grad_x = torch.addmm(branch, g2d, weight)
                grad_x = grad_x.view(x.shape)
        if need_w:
            if dropout_p == 0.0:
                grad_w = gg.to(x.dtype).T @ x2d
            else:
                grad_w = g2d.T @ x2d + ((gy * (g - 1)).T @ d).to(weight.dtype)
        if need_bias:
            grad_bias = g2d.sum(0)
        return (grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None, None, None)
