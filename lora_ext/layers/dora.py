"""DoRA for the LoRA layers: the magnitude vector, the forward passes, DoRA merging.

PEFT's semantics (peft.tuners.lora.dora): per output feature, g = m / ‖W + s·B·A‖ with the
norm detached, and
  Linear/Conv1D/Conv2d:  y = base(x) + (g - 1)·base_noBias(drop(x)) + g·s·B(A(drop(x)))
  Embedding:             y = g·base(x) + g·s·embed(x, A)·B  (no dropout, as for LoRA)
The norm comes from ops.dora_weight_norm (fp32, W read once, W + s·B·A never formed). It is
cached while not training and no gradient is recorded, keyed on the very tensors it was
computed from, so that loading or editing an adapter in eval mode cannot leave it stale.

A layer provides base_weight_out_in() (W as [out, in]), dora_factors(adapter) (A [r, in],
B [out, r]) and the pair to_out_in / from_out_in between its weight layout and [out, in].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class DoraMagnitude(nn.Module):
    """Holds the magnitude vector as `.weight` (PEFT's key: lora_magnitude_vector.<name>.weight).

    Its shape is PEFT's: [out] for Linear and Embedding, [1, out, 1, ...] for Conv1d/2d/3d.
    """

    def __init__(self, layer, adapter_name: str, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        norm = layer_weight_norm(layer, adapter_name).to(layer.base_layer.weight.dtype)
        if shape is not None:
            norm = norm.reshape(shape)
        self.weight = nn.Parameter(norm, requires_grad=True)
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None

    def train(self, mode: bool = True):
        self._norm_cache = None  # the adapter changes while training
        return super().train(mode)

    def cached_norm(self, layer, adapter: str) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._norm_cache = None
            return layer_weight_norm(layer, adapter)
        weight = layer.base_layer.weight
        lora_A, lora_B = layer.dora_factors(adapter)
        if any(t.is_inference() for t in (weight, lora_A, lora_B)):
            return layer_weight_norm(layer, adapter)  # inference tensors have no version to key a cache on
        key = (layer.scaling[adapter],) + tuple(
            (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device) for t in (weight, lora_A, lora_B))
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, layer_weight_norm(layer, adapter))
        return self._norm_cache[1]

    def __repr__(self) -> str:
        return "lora_ext.dora." + super().__repr__()


def layer_weight_norm(layer, adapter: str) -> torch.Tensor:
    """fp32 ‖W + s·B·A‖ per output feature for the layer's adapter."""
    weight = layer.base_weight_out_in().detach()
    lora_A, lora_B = layer.dora_factors(adapter)
    # in the wider of the two dtypes: PEFT forms W + s·B·A in fp32 for fp32 adapters on a half base
    dtype = torch.promote_types(weight.dtype, lora_A.dtype)
    return ops.dora_weight_norm(weight.to(dtype), lora_A.detach().to(dtype), lora_B.detach().to(dtype),
                                layer.scaling[adapter])


def magnitude_scale(layer, adapter: str, dtype: torch.dtype) -> torch.Tensor:
    """g = m / ‖W + s·B·A‖ (detached norm), in the magnitude's shape, in fp32, cast to dtype."""
    magnitude = layer.lora_magnitude_vector[adapter].weight
    norm = layer.lora_magnitude_vector[adapter].cached_norm(layer, adapter)
    return (magnitude.float() / norm.reshape(magnitude.shape)).to(dtype)


# ---------------------------------------------------------------- Linear / Conv1D


def dora_forward(layer, x: torch.Tensor, adapter: str, seed_fn) -> torch.Tensor:
    """Base output plus this DoRA adapter's contribution, in one fused op (Linear, Conv1D)."""
    weight = layer.base_weight_out_in()
    lora_A, lora_B = layer.dora_factors(adapter)  # fp32 over a half base: the op's mixed path
    magnitude_module = layer.lora_magnitude_vector[adapter]
    magnitude = magnitude_module.weight
    dropout = layer.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    training = layer.training and p > 0.0
    norm = magnitude_module.cached_norm(layer, adapter)
    return ops.dora_linear(x, weight, layer.base_layer.bias, lora_A, lora_B, magnitude, layer.scaling[adapter],
                           p, seed_fn() if training else 0, training, weight_norm=norm)


def dora_linear_contribution(layer, x: torch.Tensor, adapter: str, result: torch.Tensor) -> torch.Tensor:
    """PEFT's DoraLinearLayer.forward in plain PyTorch (autocast, several active adapters):
    the term added to `result`, which (as in PEFT) serves as the base output without dropout."""
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    x = x.to(lora_A.weight.dtype)
    dropout = layer.lora_dropout[adapter]
    scaling = layer.scaling[adapter]
    g = magnitude_scale(layer, adapter, x.dtype)
    if isinstance(dropout, nn.Identity) or not layer.training:
        bias = layer.base_layer.bias
        base_result = result - bias if bias is not None else result
    else:
        x = dropout(x)
        base_result = F.linear(x, layer.base_weight_out_in().to(x.dtype))
    return (g - 1) * base_result + g * lora_B(lora_A(x)) * scaling


# ---------------------------------------------------------------- Conv1d / Conv2d / Conv3d

def dora_conv_contribution(layer, x: torch.Tensor, adapter: str, result: torch.Tensor) -> torch.Tensor:
    """PEFT's _DoraConvNdLayer.forward: the term added to `result` (g is [1, out, 1, ...])."""
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    x = x.to(lora_A.weight.dtype)
    dropout = layer.lora_dropout[adapter]
    base = layer.base_layer
    g = magnitude_scale(layer, adapter, x.dtype)
    if isinstance(dropout, nn.Identity) or not layer.training:
        base_result = result if base.bias is None else result - base.bias.view(1, -1, *g.shape[2:])
    else:
        x = dropout(x)
        base_result = layer.conv_fn(x, base.weight.to(x.dtype), None, base.stride, base.padding, base.dilation, base.groups)
    return (g - 1) * base_result + g * lora_B(lora_A(x)) * layer.scaling[adapter]


# ---------------------------------------------------------------- Embedding


def dora_embedding_forward(layer, ids: torch.Tensor, adapter: str, result: torch.Tensor) -> torch.Tensor:
    """PEFT's DoraEmbeddingVariant.forward: g·result + g·s·embed(ids, A)·B (times embed_scale)."""
    g = magnitude_scale(layer, adapter, result.dtype)
    after_A = layer._embed(ids, layer.lora_embedding_A[adapter].T)
    dora_result = g * (after_A @ layer.lora_embedding_B[adapter].T) * layer.scaling[adapter]
    embed_scale = getattr(layer.base_layer, "embed_scale", None)
    if isinstance(embed_scale, torch.Tensor):
        dora_result = dora_result * embed_scale.to(dora_result.dtype)
    return g * result + dora_result


# ---------------------------------------------------------------- merging


def _merge_factor(layer, adapter: str, norm: torch.Tensor) -> torch.Tensor:
    return layer.lora_magnitude_vector[adapter].weight.reshape(-1).to(torch.float32) / norm


def _unmerged_base_weight(layer) -> torch.Tensor:
    """fp32 W with every merged adapter taken out again (newest first), without writing it."""
    weight = layer.base_layer.weight.to(torch.float32)
    for name in reversed(layer.merged_adapters):
        if name not in layer.r:
            continue
        if layer.use_dora.get(name, False):
            factor = _merge_factor(layer, name, layer._dora_merge_norms[name])
            weight = layer.from_out_in(layer.to_out_in(weight) / factor[:, None])
        weight = weight - layer.get_delta_weight(name).to(torch.float32)
    return weight


@torch.no_grad()
def merge_dora(layer, adapter: str) -> torch.Tensor:
    """The merged base weight m/‖W₀ + ΔW‖ · (W + ΔW); remembers the norm for unmerging.

    As in PEFT (and as the forward computes it) the norm is that of the base weight W₀
    without adapters merged before this one, while the factor scales the current W.
    """
    weight = layer.base_layer.weight
    delta = layer.get_delta_weight(adapter).to(torch.float32)
    norm = torch.linalg.vector_norm(layer.to_out_in(_unmerged_base_weight(layer) + delta), dim=1)
    layer._dora_merge_norms[adapter] = norm
    combined = layer.to_out_in(weight.to(torch.float32) + delta)
    return layer.from_out_in(combined * _merge_factor(layer, adapter, norm)[:, None]).to(weight.dtype)


@torch.no_grad()
def unmerge_dora(layer, adapter: str) -> torch.Tensor:
    weight = layer.base_layer.weight
    factor = _merge_factor(layer, adapter, layer._dora_merge_norms.pop(adapter))
    original = layer.from_out_in(layer.to_out_in(weight.to(torch.float32)) / factor[:, None])
    return (original - layer.get_delta_weight(adapter).to(torch.float32)).to(weight.dtype)
