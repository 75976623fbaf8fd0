"""LoRA adapter initialisation, value for value as PEFT 0.21 does it.

Two steps, as in PEFT's layers:

1. `create_lora_parameters` makes lora_A and lora_B the way PEFT constructs them
   (nn.Linear / nn.Conv2d default initialisation, or torch.randn for embeddings, on the
   CPU in the default dtype). Those draws advance torch's RNG exactly as PEFT does, so
   that with the same torch seed the next step gives PEFT's numbers.
2. `init_lora_weights` overwrites them per `init` (PEFT's `init_lora_weights` option) and,
   for PiSSA and OLoRA, returns the new base weight, which the caller installs.

Shapes: linear A [r, in], B [out, r]; embedding A [r, num_embeddings],
B [embedding_dim, r]; conv2d A [r, in, kh, kw], B [out, r / groups, 1, 1] (conv1d and conv3d
alike with one and three kernel dimensions).

Dtypes: PEFT initialises in fp32 and then casts the adapter to the base layer's dtype
(and PeftModel upcasts bf16/fp16 adapters back to fp32 when autocast_adapter_dtype=True,
so they hold bf16-rounded values). This module computes in fp32 and writes into A and B
in their own dtype: to reproduce PEFT on a bf16 base, hold A and B in the base dtype here
and upcast afterwards.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .loftq import loftq_layer_init

LAYER_KINDS = ("linear", "embedding", "conv1d", "conv2d", "conv3d")
_CONV_CLASSES = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
SVD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# init_lora_weights values PEFT has and this module does not (they need data or models).
UNSUPPORTED_INITS = ("corda", "eva", "mica", "orthogonal", "lora_ga")


def create_lora_parameters(layer_kind: str, in_features: int, out_features: int, r: int, *,
                           kernel_size=1, stride=1, padding=0, groups: int = 1,
                           lora_bias: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """(lora_A, lora_B, lora_B bias or None) as PEFT constructs them, before
    init_lora_weights: fp32 on the CPU, drawing from torch's default generator in PEFT's
    order. For an embedding, in_features = num_embeddings, out_features = embedding_dim."""
    _check_kind(layer_kind)
    for name, value in (("in_features", in_features), ("out_features", out_features), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"create_lora_parameters: {name} must be a positive int, got {value!r}")
    if layer_kind == "embedding":
        if lora_bias:
            raise ValueError("create_lora_parameters: lora_bias is not supported for embeddings "
                             "(PEFT raises too)")
        return torch.randn(r, in_features), torch.randn(out_features, r), None
    if layer_kind == "linear":
        a = nn.Linear(in_features, r, bias=False)
        b = nn.Linear(r, out_features, bias=lora_bias)
    else:
        if r % groups:
            raise ValueError(f"create_lora_parameters: r ({r}) must be divisible by groups ({groups})")
        conv = _CONV_CLASSES[layer_kind]
        a = conv(in_features, r, kernel_size, stride, padding, bias=False)
        b = conv(r, out_features, 1, 1, groups=groups, bias=lora_bias)
    return a.weight.detach(), b.weight.detach(), (b.bias.detach() if lora_bias else None)


def _check_kind(layer_kind: str) -> None:
    if layer_kind not in LAYER_KINDS:
        raise ValueError(f"layer_kind must be one of {', '.join(LAYER_KINDS)}, got {layer_kind!r}")


def _check_shapes(lora_A: Tensor, lora_B: Tensor, r: int, layer_kind: str, experts: int = 1) -> None:
    want_dim = {"conv1d": 3, "conv2d": 4, "conv3d": 5}.get(layer_kind, 2)
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"init_lora_weights: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != want_dim:
            raise ValueError(f"init_lora_weights: {name} must be {want_dim}-D for a {layer_kind} "
                             f"layer, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"init_lora_weights: {name} must be floating point, got {t.dtype}")
    rows = r * experts
    what = f"r = {r}" if experts == 1 else f"r * experts = {r} * {experts} = {rows}"
    if lora_A.shape[0] != rows:
        raise ValueError(f"init_lora_weights: lora_A must have {what} rows, got shape {tuple(lora_A.shape)}")
    if layer_kind not in _CONV_CLASSES and lora_B.shape[1] != rows:
        raise ValueError(f"init_lora_weights: lora_B must have {what} columns, got shape {tuple(lora_B.shape)}")


def _parse_init(init) -> tuple[str, int | None]:
    """(method, niter) for a PEFT init_lora_weights value."""
    if init is True:
        return "default", None
    if init is False:
        return "none", None
    if not isinstance(init, str):
        raise TypeError(f"init_lora_weights: init must be True, False or a string, got {init!r}")
    if init.lower() == "gaussian":
        return "gaussian", None
    if init.lower() == "olora":
        return "olora", None
    if init == "loftq":  # case-sensitive, as in PEFT
        return "loftq", None
    if init.startswith("pissa"):  # case-sensitive, as in PEFT
        if init == "pissa":
            return "pissa", None
        parts = init.split("_niter_")
        if len(parts) == 2 and parts[0] == "pissa" and parts[1].isdigit():
            return "pissa", int(parts[1])
        raise ValueError(f"init_lora_weights: expected 'pissa' or 'pissa_niter_<n>', got {init!r}")
    if init.lower() in UNSUPPORTED_INITS:
        raise NotImplementedError(f"init_lora_weights: {init!r} is a PEFT initialisation that "
                                  "lora_ext does not implement")
    raise ValueError(f"init_lora_weights: unknown initialisation {init!r}; expected True, False, "
                     "'gaussian', 'pissa', 'pissa_niter_<n>' or 'olora'")


@torch.no_grad()
def _write(dst: Tensor, values: Tensor) -> None:
    dst.copy_(values)


def _cpu_fp32_like(t: Tensor) -> Tensor:
    # PEFT initialises the freshly built CPU fp32 modules, then moves and casts them.
    return torch.empty(t.shape, dtype=torch.float32, device="cpu")


def init_lora_weights(lora_A: Tensor, lora_B: Tensor, init, *, base_weight: Tensor | None = None,
                      r: int, scaling: float, fan_in_fan_out: bool = False,
                      layer_kind: str = "linear", lora_B_bias: Tensor | None = None,
                      loftq_config=None, experts: int = 1) -> Tensor | None:
    """Initialise lora_A and lora_B in place as PEFT 0.21 does for `init`.

    init: True (linear/conv: A Kaiming-uniform with a = sqrt(5), B = 0; embedding: A = 0,
    B standard normal), "gaussian" (linear/conv: A ~ N(0, 1/r^2), B = 0; embedding: as
    True, PEFT ignores the string there), False (nothing: A and B keep their construction
    values, see create_lora_parameters, so the adapter is not a no-op), "pissa" /
    "pissa_niter_<n>" and "olora" (linear only; need base_weight), "loftq" (linear only; needs
    base_weight and loftq_config, see lora_ext.loftq).

    For PiSSA and OLoRA returns the new base weight W - scaling * B @ A (computed in fp32,
    cast to base_weight's dtype, in base_weight's layout: [in, out] when fan_in_fan_out);
    the caller installs it. Returns None otherwise. lora_B_bias (lora_bias=True, allowed
    with True and False only, as in PEFT) is zeroed by True and left as is by False.

    experts > 1 (LoRA on a stacked [experts, ., .] parameter, PEFT's target_parameters): A has
    r * experts rows and B r * experts columns, one rank-r factor pair per expert; only True,
    "gaussian" (std 1/r, PEFT's) and False apply, since the others factor one 2-D weight.
    """
    _check_kind(layer_kind)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"init_lora_weights: r must be a positive int, got {r!r}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"init_lora_weights: scaling must be a finite number, got {scaling!r}")
    if isinstance(experts, bool) or not isinstance(experts, int) or experts <= 0:
        raise ValueError(f"init_lora_weights: experts must be a positive int, got {experts!r}")
    _check_shapes(lora_A, lora_B, r, layer_kind, experts)
    method, niter = _parse_init(init)
    if experts > 1 and method not in ("default", "gaussian", "none"):
        raise ValueError(f"init_lora_weights: {init!r} is not supported for a stacked parameter of {experts} "
                         "experts; expected True, 'gaussian' or False")
    if lora_B_bias is not None and method not in ("default", "none"):
        raise ValueError(f"init_lora_weights: lora_bias (lora_B_bias) is only supported with init "
                         f"True or False, as in PEFT's LoraConfig; got {init!r}")

    if method == "none":
        return None
    if layer_kind == "embedding":
        if method == "loftq":
            raise ValueError("init_lora_weights: 'loftq' is supported for linear layers only (PEFT's LoftQ "
                             "for embeddings fails)")
        if method in ("pissa", "olora"):
            warnings.warn(f"init_lora_weights: PEFT does not apply {init!r} to embedding layers; "
                          "using its default embedding initialisation (A = 0, B normal)",
                          stacklevel=2)
        _write(lora_A, _cpu_fp32_like(lora_A).zero_())
        _write(lora_B, _cpu_fp32_like(lora_B).normal_())
        return None
    if method in ("default", "gaussian"):
        a = _cpu_fp32_like(lora_A)
        if method == "default":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            nn.init.normal_(a, std=1 / r)
        _write(lora_A, a)
        _write(lora_B, torch.zeros_like(lora_B))
        if lora_B_bias is not None:  # method "default": PEFT allows no bias with "gaussian"
            _write(lora_B_bias, torch.zeros_like(lora_B_bias))
        return None
    if layer_kind in _CONV_CLASSES:
        raise ValueError(f"init_lora_weights: {init!r} is not supported for {layer_kind} layers "
                         "(PEFT raises 'Unknown initialization' too)")
    if method == "loftq":
        new_base = loftq_layer_init(lora_A, lora_B, base_weight, r, float(scaling), fan_in_fan_out, loftq_config)
        return new_base.contiguous()
    return _svd_init(lora_A, lora_B, method, niter, base_weight, r, float(scaling), fan_in_fan_out)


def _svd_init(lora_A, lora_B, method, niter, base_weight, r, scaling, fan_in_fan_out) -> Tensor:
    if not isinstance(base_weight, Tensor):
        raise TypeError(f"init_lora_weights: {method} needs base_weight, the base layer's weight "
                        f"tensor, got {type(base_weight).__name__}")
    if base_weight.dtype not in SVD_DTYPES:
        raise TypeError(f"init_lora_weights: {method} needs a float32, float16 or bfloat16 base "
                        f"weight, got {base_weight.dtype} (initialise before quantising)")
    if base_weight.dim() != 2:
        raise ValueError(f"init_lora_weights: base_weight must be 2-D, got {tuple(base_weight.shape)}")
    dtype = base_weight.dtype
    w = base_weight.detach().to(torch.float32)
    if method == "olora" and fan_in_fan_out:
        # PEFT's olora_init takes the QR of the stored [in, out] weight and so builds
        # adapters of the wrong orientation; there is no PEFT result worth reproducing.
        raise ValueError("init_lora_weights: 'olora' with fan_in_fan_out=True is not supported "
                         "(PEFT's OLoRA ignores fan_in_fan_out)")
    if fan_in_fan_out:
        w = w.t()
    out_features, in_features = w.shape
    if tuple(lora_A.shape) != (r, in_features) or tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"init_lora_weights: base weight [out={out_features}, in={in_features}] "
                         f"needs lora_A [{r}, {in_features}] and lora_B [{out_features}, {r}], got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if r > min(out_features, in_features):
        raise ValueError(f"init_lora_weights: {method} needs r <= min(out, in) = "
                         f"{min(out_features, in_features)}, got r = {r}")
    if method == "pissa":
        if niter is None:
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
        else:
            Ur, Sr, Vr = torch.svd_lowrank(w, r, niter=niter)
            Sr, Vhr = Sr / scaling, Vr.t()
        root = torch.sqrt(Sr)
        A = root[:, None] * Vhr      # diag(sqrt(S_r / s)) @ V_r^T
        B = Ur * root[None, :]       # U_r @ diag(sqrt(S_r / s))
    else:  # olora: W = Q R, B = Q[:, :r], A = R[:r]
        Q, R = torch.linalg.qr(w)
        A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    # (s * B) @ A, in PEFT's order of operations, so the residual matches to the bit
    residual = (w - (scaling * B) @ A).to(dtype)
    _write(lora_A, A)
    _write(lora_B, B)
    return (residual.t() if fan_in_fan_out else residual).contiguous()
