"""Swap PEFT's LoRA Linear, Embedding and Conv layers for fused ones in place: `accelerate(model)` /
`restore(model)`.

A swapped layer is the very same module object with its class switched to
FusedLoraLinear (FusedLoraEmbedding, FusedLoraConv1d/2d/3d), a subclass of PEFT's own layer
class that only overrides forward. Nothing is copied or re-registered, so parameters (and optimizer references to
them), state_dict keys and tensors, hooks and every PEFT method (merge, set_adapter,
disable_adapter, save_pretrained, ...) keep working, and `restore` just switches back.
PEFT's LoRA tuner (peft_model.base_model) is switched the same way, to AcceleratedLoraModel,
whose inject_adapter swaps the layers that later add_adapter/load_adapter calls create.

The fused forward reproduces PEFT's Linear.forward, also under torch.autocast (the op's
autocast rule) and with adapters of another dtype than the base (PEFT's fp32 adapters over
a bf16/fp16 base: the op runs their branch in fp32, as PEFT), for DoRA adapters
(ops.dora_linear) and for lora_bias=True (the lora_B bias goes to the op as its lora_bias).
Whatever it does not cover (other LoRA variants, several active adapters with DoRA among
them, adapter_names mixed batches, quantised or custom base layers, hooks on the inner
modules) runs PEFT's own forward, decided per call.
FusedLoraEmbedding runs ops.lora_embedding (one pass per token: the base row, the token's
column of lora_embedding_A and their rank-r expansion) for one active plain LoRA adapter on
an nn.Embedding; several active adapters, variants, max_norm, sparse or scale_grad_by_freq
lookups, an embed_scale or tensor-parallel hooks run PEFT's forward. FusedLoraConv1d/2d/3d
run one convolution with the merged weight (ops.lora_conv, for DoRA ops.dora_conv) for one
active adapter on a plain convolution (groups 1, no dilation, zero padding) when no dropout is at work (p = 0 or
eval) and everything shares one dtype outside autocast; otherwise PEFT's three convolutions.

Dropout: PEFT's nn.Dropout draws a fresh mask per call from torch's RNG; the fused layer
draws a fresh Philox seed per call from torch's default CPU generator (for inputs on any
device: no host sync, and it is the generator torch.manual_seed seeds and
torch.utils.checkpoint saves and restores), so runs are reproducible and a checkpointed
recomputation regenerates the identical mask. The masks differ from PEFT's (another
generator) but have the same distribution: each element kept with probability 1 - p,
scaled by 1 / (1 - p), independently per adapter and per call. The seed is a tensor
(ops.dropout_seed), so torch.compile traces a fused layer with dropout without a graph
break and, with any backend, draws eager mode's masks.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from . import ops
from .ops._common import SUPPORTED_DTYPES, autocast_active, autocast_eligible

logger = logging.getLogger(__name__)

_peft_classes: tuple | None = None
_fused_class: type | None = None
_fused_embedding_class: type | None = None
_fused_conv_classes: dict[type, type] = {}
_tuner_classes: tuple[type, type] | None = None


def _require_peft() -> tuple[type, type | None]:
    """(peft.tuners.lora.layer.Linear, transformers Conv1D), imported on first use: peft
    and transformers take seconds to import and lora_ext does not need them otherwise."""
    global _peft_classes
    if _peft_classes is None:
        try:
            from peft.tuners.lora.layer import Linear as peft_linear
        except ImportError as error:
            raise ImportError("lora_ext.accelerate needs peft (pip install peft); importing "
                              f"peft.tuners.lora.layer failed: {error}") from error
        try:
            from transformers.pytorch_utils import Conv1D as conv1d
        except ImportError:
            conv1d = None
        _peft_classes = (peft_linear, conv1d)
    return _peft_classes


def _has_hooks(module: nn.Module) -> bool:
    # Calling the fused op bypasses the inner modules' __call__, so anything hooked on
    # them (or replacing their forward, as accelerate's offload hooks do) must see the
    # ordinary path instead.
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)


def _plain_tensor(t) -> bool:
    # quantised (bitsandbytes Params4bit / Int8Params), DTensor, ... are subclasses
    return type(t) in (nn.Parameter, torch.Tensor)


def _base_weight_and_bias(base: nn.Module):
    """(weight as [out, in], bias) for a base layer the fused op can stand in for, else None."""
    kind = type(base)
    if kind is nn.Linear:
        weight = base.weight
        transposed = False
    elif kind is _require_peft()[1]:
        weight = base.weight  # stored [in, out]: y = x @ W + b
        transposed = True
    else:
        return None
    bias = base.bias
    if not _plain_tensor(weight) or (bias is not None and not _plain_tensor(bias)):
        return None
    if weight.dim() != 2:
        return None
    return (weight.t() if transposed else weight), bias


def _adapter_reason(layer, name: str, device: torch.device) -> str | None:
    """Why adapter `name` cannot take the fused path (None when it can)."""
    variant = layer.lora_variant.get(name) if hasattr(layer.lora_variant, "get") else None
    if layer.use_dora.get(name, False):
        # DoRA on Linear/Conv1D is fused (ops.dora_linear has PEFT's DoraLinearLayer semantics)
        if variant is not None and type(variant).__name__ != "DoraLinearVariant":
            return f"a LoRA variant ({type(variant).__name__})"
        if name not in getattr(layer, "lora_magnitude_vector", {}):
            return "DoRA without a magnitude vector"
    elif name in layer.lora_variant:
        return f"a LoRA variant ({type(variant).__name__})"
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    drop = layer.lora_dropout[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        return "adapter modules that are not nn.Linear (lora_A without bias)"
    if lora_B.bias is not None and layer.use_dora.get(name, False):
        return "DoRA with a lora_B bias"  # PEFT's config refuses it; a hand-built layer may have it
    if type(drop) not in (nn.Identity, nn.Dropout):
        return f"a dropout module of type {type(drop).__name__}"
    if _has_hooks(lora_A) or _has_hooks(lora_B) or _has_hooks(drop):
        return "hooks on the adapter modules"
    for t in (lora_A.weight, lora_B.weight) + ((lora_B.bias,) if lora_B.bias is not None else ()):
        if not _plain_tensor(t):
            return "adapter weights that are not plain tensors"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"adapter dtype {t.dtype}"
        if t.device != device:
            return f"adapter on {t.device}, base layer on {device}"
    if lora_A.weight.dtype != lora_B.weight.dtype:
        return f"lora_A in {lora_A.weight.dtype} but lora_B in {lora_B.weight.dtype}"
    if lora_B.bias is not None and lora_B.bias.dtype != lora_B.weight.dtype:
        return f"lora_B bias in {lora_B.bias.dtype} but its weight in {lora_B.weight.dtype}"
    # Adapters of another dtype than the base (PEFT's fp32 adapters over a half base) are
    # fused: ops.lora_linear runs their branch in their dtype, as PEFT does.
    return None


def _static_reason(layer) -> str | None:
    """Why this layer's forward (in its present state) cannot be fused; None when it can."""
    if isinstance(layer, _peft_embedding_class()):
        return _embedding_static_reason(layer)
    if isinstance(layer, _peft_conv_classes()):
        return _conv_static_reason(layer)
    base = layer.base_layer
    found = _base_weight_and_bias(base)
    if found is None:
        return f"base layer {type(base).__name__} (fused: nn.Linear and transformers Conv1D)"
    if _has_hooks(base):
        return "hooks on the base layer"
    weight, bias = found
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"base weight dtype {weight.dtype}"
    if bias is not None and (bias.dtype != weight.dtype or bias.device != weight.device):
        return "a bias of another dtype or device than the weight"
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    for name in active:
        reason = _adapter_reason(layer, name, weight.device)
        if reason is not None:
            return f"adapter {name!r}: {reason}"
    if len(active) > 1 and any(layer.use_dora.get(name, False) for name in active):
        return "several active adapters with DoRA among them"
    return None


def _dropout_of(drop: nn.Module) -> tuple[float, bool]:
    """(p, training) equivalent to PEFT calling `drop` (nn.Identity or nn.Dropout)."""
    if type(drop) is nn.Dropout:
        return float(drop.p), bool(drop.training)
    return 0.0, False


class _FusedForward:
    """The forward of FusedLoraLinear: peft.tuners.lora.layer.Linear running
    lora_ext.ops.lora_linear. Never constructed: `accelerate` switches the class of
    existing PEFT layers."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self._fused_adapters(x, args, kwargs)
        if adapters is None:
            return _require_peft()[0].forward(self, x, *args, **kwargs)
        weight, bias = _base_weight_and_bias(self.base_layer)
        (A, B, b, s, p, training), *others = adapters
        seed = ops.dropout_seed() if training and p > 0.0 else 0
        name = next(n for n in self.active_adapters if n in self.lora_A)
        if self.use_dora.get(name, False):
            # PEFT's DoRA: magnitude over the detached norm of W + s·B·A, formed in the wider
            # of the two dtypes as PEFT forms it
            dtype = torch.promote_types(weight.dtype, A.dtype)
            norm = ops.dora_weight_norm(weight.detach().to(dtype), A.detach().to(dtype),
                                        B.detach().to(dtype), s)
            magnitude = self.lora_magnitude_vector[name].weight
            return ops.dora_linear(x, weight, bias, A, B, magnitude, s, p, seed, training,
                                   weight_norm=norm)
        y = ops.lora_linear(x, weight, bias, A, B, s, p, seed, training=training, lora_bias=b)
        result_dtype = y.dtype
        for A, B, b, s, p, training in others:
            # Further active adapters add their own term with an independent mask, as
            # PEFT's separate nn.Dropout calls do; the base product is done once. As in
            # PEFT, x joins the adapter's dtype and the sum returns to the result's.
            xd = x.to(A.dtype)
            if training and p > 0.0:
                keep = ops.dropout_mask(xd, p, ops.dropout_seed())
                xd = xd * keep.to(xd.dtype) / (1.0 - p)
            branch = (xd @ A.t()) @ B.t()
            y = y + (branch if b is None else branch + b) * s
        return y.to(result_dtype)

    def _fused_adapters(self, x, args, kwargs):
        """[(lora_A, lora_B, lora_B bias, scaling, p, training)] of the active adapters when this call
        can be fused, else None (then PEFT's forward runs)."""
        if args or any(v is not None for v in kwargs.values()):
            return None  # adapter_names, alora_offsets or base-layer arguments
        if self.disable_adapters or self.merged or not isinstance(x, torch.Tensor):
            return None
        if _global_hooks() or _static_reason(self) is not None:
            return None
        weight, _ = _base_weight_and_bias(self.base_layer)
        if x.device != weight.device or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
            return None
        if autocast_active(x):
            # the op's autocast rule casts x, the base and the adapters to the autocast dtype,
            # as autocast does for PEFT's nn.Linear modules
            tensors = [x, weight] + [t for name in self.active_adapters if name in self.lora_A
                                     for t in (self.lora_A[name].weight, self.lora_B[name].weight,
                                               self.lora_B[name].bias) if t is not None]
            if not all(autocast_eligible(t) for t in tensors):
                return None
        elif x.dtype != weight.dtype:
            return None
        adapters = []
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            scaling = self.scaling[name]
            if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
                return None
            p, training = _dropout_of(self.lora_dropout[name])
            adapters.append((self.lora_A[name].weight, self.lora_B[name].weight, self.lora_B[name].bias,
                             float(scaling), p, training))
        if len(adapters) > 1 and any(self.use_dora.get(n, False) for n in self.active_adapters):
            return None  # several active adapters with DoRA among them: PEFT's forward
        return adapters or None


# ----------------------------------------------------------------------------- Embedding


def _peft_embedding_class() -> type:
    from peft.tuners.lora.layer import Embedding
    return Embedding


def _embedding_static_reason(layer) -> str | None:
    """Why this lora.Embedding's forward (in its present state) cannot run ops.lora_embedding."""
    base = layer.base_layer
    if type(base) is not nn.Embedding:
        return f"base layer {type(base).__name__} (fused: nn.Embedding)"
    if _has_hooks(base):
        return "hooks on the base layer"
    weight = base.weight
    if not _plain_tensor(weight) or weight.dim() != 2:
        return "a base weight that is not a plain 2-D tensor"
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"base weight dtype {weight.dtype}"
    if base.max_norm is not None:
        return "max_norm (the lookup renormalises the tables in place)"
    if base.sparse or base.scale_grad_by_freq:
        return "sparse or scale_grad_by_freq lookups"
    if layer._get_embed_scale() is not None:
        return "an embed_scale on the base layer"
    active = [name for name in layer.active_adapters if name in layer.lora_embedding_A]
    if len(active) > 1:
        return "several active adapters on an Embedding layer"
    for name in active:
        if name in layer.lora_variant:
            return f"adapter {name!r}: a LoRA variant ({type(layer.lora_variant[name]).__name__})"
        if name in getattr(layer, "input_fns", {}) or name in getattr(layer, "output_fns", {}):
            return f"adapter {name!r}: tensor-parallel hooks"
        A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        if not (_plain_tensor(A) and _plain_tensor(B)):
            return f"adapter {name!r}: adapter weights that are not plain tensors"
        if A.device != weight.device or B.device != weight.device:
            return f"adapter {name!r}: adapter on {A.device}, base layer on {weight.device}"
        if A.dtype != B.dtype or not ops.lora_embedding_dtypes_ok(weight.dtype, A.dtype):
            return (f"adapter {name!r}: adapters in {A.dtype}/{B.dtype} over a {weight.dtype} table "
                    "(fused: the table's dtype, or float32 over a half table)")
    return None


class _FusedEmbeddingForward:
    """The forward of FusedLoraEmbedding: peft.tuners.lora.layer.Embedding running
    lora_ext.ops.lora_embedding. Never constructed: `accelerate` switches the class of
    existing PEFT layers."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return _peft_embedding_class().forward(self, x, *args, **kwargs)
        base = self.base_layer
        # PEFT's result: the base lookup plus the adapter term, back in the table's dtype
        return ops.lora_embedding(x, base.weight, self.lora_embedding_A[name], self.lora_embedding_B[name],
                                  float(self.scaling[name]), base.padding_idx)

    def _fused_adapter(self, x, args, kwargs) -> str | None:
        """The one active adapter when this call can be fused, else None (PEFT's forward)."""
        if args or any(v is not None for v in kwargs.values()):
            return None  # adapter_names, variant or base-layer arguments
        if self.disable_adapters or self.merged or not isinstance(x, torch.Tensor):
            return None
        if _global_hooks() or _embedding_static_reason(self) is not None:
            return None
        if x.dtype not in (torch.int64, torch.int32) or x.device != self.base_layer.weight.device:
            return None
        active = [name for name in self.active_adapters if name in self.lora_embedding_A]
        if len(active) != 1:
            return None
        scaling = self.scaling[active[0]]
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
            return None
        return active[0]


def fused_lora_embedding_class() -> type:
    """FusedLoraEmbedding: a subclass of peft.tuners.lora.layer.Embedding (created on first
    use) that overrides forward only."""
    global _fused_embedding_class
    if _fused_embedding_class is None:
        _require_peft()
        _fused_embedding_class = type("FusedLoraEmbedding", (_FusedEmbeddingForward, _peft_embedding_class()),
                                      {"__module__": __name__, "__doc__": _FusedEmbeddingForward.__doc__})
    return _fused_embedding_class


# ----------------------------------------------------------------------------- Conv


def _peft_conv_classes() -> tuple[type, ...]:
    from peft.tuners.lora.layer import Conv1d, Conv2d, Conv3d
    return (Conv1d, Conv2d, Conv3d)


def _conv_static_reason(layer) -> str | None:
    """Why this lora.ConvNd's forward (in its present state) cannot run ops.lora_conv."""
    from .layers.conv import merged_conv_reason
    base = layer.base_layer
    reason = merged_conv_reason(base)
    if reason is not None:
        return reason
    if _has_hooks(base):
        return "hooks on the base layer"
    weight, bias = base.weight, base.bias
    if not _plain_tensor(weight) or (bias is not None and not _plain_tensor(bias)):
        return "base weights that are not plain tensors"
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"base weight dtype {weight.dtype}"
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) > 1:
        return "several active adapters on a Conv layer"
    for name in active:
        variant = type(layer.lora_variant[name]).__name__ if name in layer.lora_variant else None
        if variant is not None and variant != f"DoraConv{weight.dim() - 2}dVariant":
            return f"adapter {name!r}: a LoRA variant ({variant})"
        if variant is not None:  # DoRA: ops.dora_conv, with PEFT's magnitude vector
            vectors = getattr(layer, "lora_magnitude_vector", {})
            magnitude = getattr(vectors[name], "weight", None) if name in vectors else None
            if magnitude is None or not _plain_tensor(magnitude) or magnitude.numel() != weight.shape[0]:
                return f"adapter {name!r}: DoRA without a magnitude vector of {weight.shape[0]} elements"
            if magnitude.dtype != weight.dtype or magnitude.device != weight.device:
                return f"adapter {name!r}: a DoRA magnitude in {magnitude.dtype} over a {weight.dtype} base"
            if _has_hooks(layer.lora_magnitude_vector[name]):
                return f"adapter {name!r}: hooks on the adapter modules"
        if layer.lora_bias.get(name, False):
            return f"adapter {name!r}: lora_bias=True"
        lora_A, lora_B, drop = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        kind = type(base)
        if type(lora_A) is not kind or type(lora_B) is not kind or lora_A.bias is not None \
                or lora_B.bias is not None or lora_B.groups != 1:
            return f"adapter {name!r}: adapter modules that are not bias-free {kind.__name__} layers"
        if type(drop) not in (nn.Identity, nn.Dropout):
            return f"adapter {name!r}: a dropout module of type {type(drop).__name__}"
        if _has_hooks(lora_A) or _has_hooks(lora_B) or _has_hooks(drop):
            return f"adapter {name!r}: hooks on the adapter modules"
        for t in (lora_A.weight, lora_B.weight):
            if not _plain_tensor(t):
                return f"adapter {name!r}: adapter weights that are not plain tensors"
            if t.dtype != weight.dtype or t.device != weight.device:
                return (f"adapter {name!r}: adapter in {t.dtype} on {t.device}, base layer in {weight.dtype} on "
                        f"{weight.device} (fused: one dtype)")
    return None


class _FusedConvForward:
    """The forward of FusedLoraConv1d/2d/3d: PEFT's lora.ConvNd running lora_ext.ops.lora_conv
    (one convolution with the merged weight), or ops.dora_conv for a DoRA adapter. Never
    constructed: `accelerate` switches the class of existing PEFT layers."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return self._peft_class.forward(self, x, *args, **kwargs)
        from .layers.conv import merged_conv_padding
        base = self.base_layer
        args = (x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight)
        if name in self.lora_variant:  # DoRA (the only variant _conv_static_reason lets through)
            return ops.dora_conv(*args, self.lora_magnitude_vector[name].weight, float(self.scaling[name]),
                                 base.stride, merged_conv_padding(base))
        return ops.lora_conv(*args, float(self.scaling[name]), base.stride, merged_conv_padding(base))

    def _fused_adapter(self, x, args, kwargs) -> str | None:
        """The one active adapter when this call can be fused, else None (PEFT's forward)."""
        if args or any(v is not None for v in kwargs.values()):
            return None
        if self.disable_adapters or self.merged or not isinstance(x, torch.Tensor):
            return None
        if _global_hooks() or _conv_static_reason(self) is not None:
            return None
        weight = self.base_layer.weight
        if x.dtype != weight.dtype or x.device != weight.device or autocast_active(x) \
                or x.dim() not in (weight.dim() - 1, weight.dim()):
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        p, training = _dropout_of(self.lora_dropout[active[0]])
        if training and p > 0.0:
            return None  # the merged weight cannot drop the adapter's input
        scaling = self.scaling[active[0]]
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
            return None
        return active[0]


def fused_lora_conv_classes() -> dict[type, type]:
    """PEFT's lora.Conv1d/2d/3d -> FusedLoraConv1d/2d/3d (created on first use), subclasses that
    override forward only."""
    if not _fused_conv_classes:
        _require_peft()
        for peft_cls in _peft_conv_classes():
            name = "FusedLora" + peft_cls.__name__
            _fused_conv_classes[peft_cls] = type(name, (_FusedConvForward, peft_cls),
                                                 {"__module__": __name__, "__doc__": _FusedConvForward.__doc__,
                                                  "_peft_class": peft_cls})
    return _fused_conv_classes


def _swappable() -> dict[type, type]:
    """PEFT's LoRA layer class -> the fused class `accelerate` switches it to."""
    peft_linear, _ = _require_peft()
    return {peft_linear: fused_lora_linear_class(), _peft_embedding_class(): fused_lora_embedding_class(),
            **fused_lora_conv_classes()}


# ----------------------------------------------------------------------------- swapping


def fused_lora_linear_class() -> type:
    """FusedLoraLinear: a subclass of peft.tuners.lora.layer.Linear (created on first use,
    since peft is imported lazily) that overrides forward only."""
    global _fused_class
    if _fused_class is None:
        peft_linear, _ = _require_peft()
        cls = type("FusedLoraLinear", (_FusedForward, peft_linear),
                   {"__module__": __name__, "__doc__": _FusedForward.__doc__})
        _fused_class = cls
    return _fused_class


def __getattr__(name: str):
    # `lora_ext.accelerate.FusedLoraLinear` (used by pickle to find the class again)
    if name == "FusedLoraLinear":
        return fused_lora_linear_class()
    if name == "FusedLoraEmbedding":
        return fused_lora_embedding_class()
    for fused in fused_lora_conv_classes().values():
        if name == fused.__name__:
            return fused
    if name == "AcceleratedLoraModel":
        return _accelerated_tuner_classes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lora_layers(model: nn.Module):
    """([(name, module)] of PEFT LoRA layers to swap, [(name, module)] already swapped)."""
    kinds = _swappable()
    fused_classes = set(kinds.values())
    plain, fused = [], []
    for name, module in model.named_modules():
        if type(module) in fused_classes:
            fused.append((name, module))
        elif type(module) in kinds:
            plain.append((name, module))
    return plain, fused


def accelerate(model: nn.Module) -> nn.Module:
    """Swap every peft.tuners.lora.layer.Linear in `model` for FusedLoraLinear, every
    lora.Embedding for FusedLoraEmbedding and every lora.Conv1d/2d/3d for FusedLoraConv1d/2d/3d,
    in place.

    The layers keep their parameters, buffers, state_dict and hooks; only their forward
    changes. Returns `model`. Calling it again swaps only layers added since. PEFT's LoRA
    tuner inside `model` (peft_model.base_model) is switched the same way, so that layers
    a later add_adapter, load_adapter or add_weighted_adapter creates are swapped as they
    are made. Logs (logger "lora_ext.accelerate", INFO) how many layers were swapped and
    warns, reason by reason, about LoRA layers that will run PEFT's forward: in their
    present configuration, or because their kind (MultiheadAttention, ParamWrapper, quantised,
    ...) is not fused. A
    model with nothing to swap is returned unchanged, with that warning. Subclasses of
    PEFT's Linear, Embedding and ConvNd (other tuners' layers) are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: expected a torch.nn.Module (e.g. a peft.PeftModel), "
                        f"got {type(model).__name__}")
    _switch_tuners(model, accelerated=True)
    _swap_layers(model, stacklevel=3, report=True)
    return model


def _swap_layers(model: nn.Module, stacklevel: int, report: bool) -> None:
    """Swap the PEFT Linear layers not yet swapped; warn about what runs PEFT's forward when
    asked to (report) or when new layers came in."""
    plain, fused = _lora_layers(model)
    kinds = _swappable()
    for name, module in plain:
        module.__class__ = kinds[type(module)]
    logger.info("lora_ext.accelerate: swapped %d LoRA layer(s) (%d already swapped)",
                len(plain), len(fused))
    if not (report or plain):
        return  # no new layer from inject_adapter: what runs where was reported before
    kinds = _unfused_kinds(model)
    slow = {name: reason for name, module in plain + fused
            if (reason := _static_reason(module)) is not None}
    slow.update(kinds)
    total = len(plain) + len(fused) + len(kinds)
    if not plain and not fused:
        warnings.warn("lora_ext.accelerate: nothing to swap: the model has no peft.tuners.lora.layer.Linear, "
                      "Embedding or ConvNd layer (lora_ext fuses LoRA on nn.Linear, transformers Conv1D, "
                      "nn.Embedding and nn.Conv1d/2d/3d layers of a model wrapped by peft.get_peft_model)"
                      + (f"; {_describe(slow)}" if slow else ""),
                      stacklevel=stacklevel)
    elif slow:
        warnings.warn(f"lora_ext.accelerate: {len(slow)} of {total} LoRA layers will run PEFT's own forward: "
                      f"{_describe(slow)}", stacklevel=stacklevel)


def _unfused_kinds(model: nn.Module) -> dict[str, str]:
    """PEFT LoRA layers of kinds lora_ext does not fuse (MultiheadAttention, quantised, ...)."""
    from peft.tuners.lora.layer import LoraLayer as PeftLoraLayer
    swapped = tuple(_swappable())
    return {name: f"a lora.{type(module).__name__} layer (fused: LoRA on nn.Linear, Conv1D, nn.Embedding and "
                  "nn.Conv1d/2d/3d)"
            for name, module in model.named_modules()
            if isinstance(module, PeftLoraLayer) and not isinstance(module, swapped)}


def _describe(slow: dict[str, str], per_reason: int = 3) -> str:
    """Each reason once, with the layers it applies to (a few named)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in slow.items():
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:per_reason]) + (f" and {len(names) - per_reason} more"
                                                 if len(names) > per_reason else "")
        parts.append(f"{reason} ({len(names)} layer{'s' * (len(names) > 1)}: {shown})")
    return "; ".join(parts)


class _AcceleratedTuner:
    """PEFT's LoraModel whose inject_adapter (behind add_adapter, load_adapter and
    add_weighted_adapter) swaps the layers it creates. Never constructed: `accelerate`
    switches the class of the model's existing tuner, `restore` switches it back."""

    def inject_adapter(self, *args, **kwargs):
        result = super().inject_adapter(*args, **kwargs)
        _swap_layers(self.model, stacklevel=4, report=False)
        return result


def _accelerated_tuner_classes() -> tuple[type, type]:
    """(peft.tuners.lora.model.LoraModel, AcceleratedLoraModel), created on first use."""
    global _tuner_classes
    if _tuner_classes is None:
        _require_peft()
        from peft.tuners.lora.model import LoraModel
        accelerated = type("AcceleratedLoraModel", (_AcceleratedTuner, LoraModel),
                           {"__module__": __name__, "__doc__": _AcceleratedTuner.__doc__})
        _tuner_classes = (LoraModel, accelerated)
    return _tuner_classes


def _switch_tuners(model: nn.Module, accelerated: bool) -> None:
    plain, switched = _accelerated_tuner_classes()
    source, target = (plain, switched) if accelerated else (switched, plain)
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target


def restore(model: nn.Module) -> nn.Module:
    """Undo `accelerate`: every FusedLoraLinear (FusedLoraEmbedding, FusedLoraConvNd) in `model`
    becomes PEFT's Linear (Embedding, ConvNd) again, and its tuner PEFT's LoraModel.

    Returns `model`; a model with nothing swapped is returned unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"restore: expected a torch.nn.Module, got {type(model).__name__}")
    peft_class_of = {fused: peft for peft, fused in _swappable().items()}
    _switch_tuners(model, accelerated=False)
    _, fused = _lora_layers(model)
    for _, module in fused:
        module.__class__ = peft_class_of[type(module)]
    logger.info("lora_ext.restore: restored %d LoRA layer(s)", len(fused))
    return model


def accelerated_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers of `model` that `accelerate` swapped."""
    return [name for name, _ in _lora_layers(model)[1]]
