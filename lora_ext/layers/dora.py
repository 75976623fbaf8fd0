"""DoRA for the LoRA Linear layer: the magnitude vector, the fused forward, DoRA merging.

PEFT's semantics: y = x·Wᵀ + b + (g - 1)·(drop(x)·Wᵀ) + g·s·(drop(x)·Aᵀ)·Bᵀ with
g = m / ‖W + s·B·A‖ per output row and the norm detached. The norm comes from
ops.dora_weight_norm (fp32, without forming W + s·B·A) and is cached while not training.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class DoraMagnitude(nn.Module):
    """Holds the magnitude vector as `.weight` [out] (PEFT's key: lora_magnitude_vector.<name>.weight)."""

    def __init__(self, layer, adapter_name: str) -> None:
        super().__init__()
        norm = layer_weight_norm(layer, adapter_name).to(layer.base_layer.weight.dtype)
        self.weight = nn.Parameter(norm, requires_grad=True)
        self._norm_cache: torch.Tensor | None = None

    def train(self, mode: bool = True):
        self._norm_cache = None  # the adapter may change while training
        return super().train(mode)

    def cached_norm(self, compute) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            self._norm_cache = None
            return compute()
        if self._norm_cache is None:
            self._norm_cache = compute()
        return self._norm_cache

    def __repr__(self) -> str:
        return "lora_ext.dora." + super().__repr__()


def layer_weight_norm(layer, adapter: str, delta_scaling: float | None = None) -> torch.Tensor:
    """fp32 ‖W + s·B·A‖ per output row for the layer's adapter (W as [out, in])."""
    weight = layer.base_weight_out_in()
    lora_A = layer.lora_A[adapter].weight.to(weight.dtype)
    lora_B = layer.lora_B[adapter].weight.to(weight.dtype)
    scaling = layer.scaling[adapter] if delta_scaling is None else delta_scaling
    return ops.dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), scaling)


def dora_forward(layer, x: torch.Tensor, adapter: str, seed_fn) -> torch.Tensor:
    """Base output plus this DoRA adapter's contribution, in one fused op."""
    weight = layer.base_weight_out_in()
    dtype = weight.dtype
    lora_A = layer.lora_A[adapter].weight.to(dtype)
    lora_B = layer.lora_B[adapter].weight.to(dtype)
    magnitude_module = layer.lora_magnitude_vector[adapter]
    magnitude = magnitude_module.weight.to(dtype)
    dropout = layer.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    training = layer.training and p > 0.0
    norm = magnitude_module.cached_norm(lambda: layer_weight_norm(layer, adapter))
    return ops.dora_linear(x, weight, layer.base_layer.bias, lora_A, lora_B, magnitude, layer.scaling[adapter],
                           p, seed_fn() if training else 0, training, weight_norm=norm)


@torch.no_grad()
def merge_dora(layer, adapter: str) -> torch.Tensor:
    """The merged base weight m/‖W + ΔW‖ · (W + ΔW); remembers the norm for unmerging."""
    weight = layer.base_layer.weight
    delta = layer.get_delta_weight(adapter).to(torch.float32)
    combined = weight.to(torch.float32) + delta
    combined_out_in = combined.T if layer.fan_in_fan_out else combined
    norm = torch.linalg.vector_norm(combined_out_in, dim=1)
    layer._dora_merge_norms[adapter] = norm
    factor = layer.lora_magnitude_vector[adapter].weight.to(torch.float32) / norm
    merged = combined_out_in * factor[:, None]
    return (merged.T if layer.fan_in_fan_out else merged).to(weight.dtype)


@torch.no_grad()
def unmerge_dora(layer, adapter: str) -> torch.Tensor:
    weight = layer.base_layer.weight
    norm = layer._dora_merge_norms.pop(adapter)
    factor = layer.lora_magnitude_vector[adapter].weight.to(torch.float32) / norm
    merged_out_in = weight.to(torch.float32).T if layer.fan_in_fan_out else weight.to(torch.float32)
    original = merged_out_in / factor[:, None]
    original = original.T if layer.fan_in_fan_out else original
    return (original - layer.get_delta_weight(adapter).to(torch.float32)).to(weight.dtype)
