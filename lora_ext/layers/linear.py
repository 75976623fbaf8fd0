"""LoRA on nn.Linear and on transformers' Conv1D (weight stored [in, out], fan_in_fan_out).

The first active adapter runs through the fused kernel (base GEMM, Philox dropout,
A, B and scaling in one op that keeps only x and z = drop(x)·Aᵀ for backward), also under
torch.autocast (the op's autocast rule) and with fp32 adapters over a half base (the op's
mixed-dtype path, PEFT's arithmetic). Any further active adapters take the plain PyTorch
formulation PEFT uses, with the same numbers. Mixed batches (adapter_names) run through
lora_ext.serving's adapter pool and the BGMV/SGMV kernels.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import ops, serving
from ..ops._common import SUPPORTED_DTYPES, autocast_active, autocast_eligible
from . import dora
from .base import LoraLayer


def fresh_dropout_seed() -> torch.Tensor:
    """A Philox seed for the dropout ops (ops.dropout_seed), drawn from torch's CPU generator.

    Drawing from torch's RNG makes torch.manual_seed reproduce the masks, and lets
    torch.utils.checkpoint (which restores the RNG state before recomputing) regenerate
    the very same mask. It stays a tensor: torch.compile traces the draw, where an int
    would need .item(), a graph break per layer.
    """
    return ops.dropout_seed()


def dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


class Linear(nn.Module, LoraLayer):
    """A LoRA layer around an nn.Linear (or, with fan_in_fan_out=True, a Conv1D)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, init_lora_weights=True,
                 use_rslora: bool = False, use_dora: bool = False, **kwargs: Any) -> None:
        super().__init__()
        weight = base_layer.weight
        in_features, out_features = (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (
            weight.shape[1], weight.shape[0])
        self._init_lora_state(base_layer, in_features, out_features)
        self.fan_in_fan_out = fan_in_fan_out
        self._dora_merge_norms: dict[str, torch.Tensor] = {}  # DoRA: the norms used at merge time
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora,
                          loftq_config=kwargs.get("loftq_config"), lora_bias=kwargs.get("lora_bias", False))
        self.set_adapter(adapter_name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                     loftq_config=None, lora_bias: bool = False) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self._set_lora_bias(adapter_name, lora_bias)
        self._set_scaling(adapter_name, r, lora_alpha, use_rslora)
        self.lora_dropout[adapter_name] = self._dropout_module(lora_dropout)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)
        self.use_dora[adapter_name] = bool(use_dora)
        self._initialise(adapter_name, init_lora_weights, "linear", loftq_config=loftq_config)
        self._move_adapter_to_base(adapter_name)
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude(self, adapter_name)
        self.set_adapter(self.active_adapters)

    # ---------------------------------------------------------------- weights

    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as [out, in], whatever its storage layout."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def dora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter].weight, self.lora_B[adapter].weight

    def to_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    from_out_in = to_out_in

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling·B·A in the base weight's layout (transposed for fan_in_fan_out)."""
        weight_A, weight_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = weight_A.dtype
        if weight_A.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            weight_A, weight_B = weight_A.float(), weight_B.float()  # CPU half matmuls are slow and lossy
        delta = (weight_B @ weight_A) * self.scaling[adapter]
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(dtype)

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            self._check_adapter_names(x, adapter_names)
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.lora_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        first = active[0]
        if self._can_fuse(x, first) and not args and not kwargs:
            if self.use_dora.get(first, False):
                result = dora.dora_forward(self, x, first, fresh_dropout_seed)
            else:
                result = self._fused_forward(x, first)
            rest = active[1:]
        else:
            result = self.base_layer(x, *args, **kwargs)
            rest = active
        result_dtype = result.dtype
        for name in rest:
            if self.use_dora.get(name, False):  # PEFT's formulation, on the running result
                result = result + dora.dora_linear_contribution(self, x, name, result)
            else:
                result = result + self._adapter_output(x, name)
        return result.to(result_dtype)

    def _can_fuse(self, x: torch.Tensor, adapter: str) -> bool:
        """Whether ops.lora_linear / ops.dora_linear can stand in for PEFT's forward.

        Outside autocast x must have the base weight's dtype (PEFT's base layer needs it too);
        adapters of another dtype are fine (the op computes their branch in their dtype, as
        PEFT). Under autocast the op's autocast rule casts everything autocast would.
        """
        weight = self.base_layer.weight
        if x.device != weight.device or not {x.dtype, weight.dtype} <= set(SUPPORTED_DTYPES):
            return False
        if autocast_active(x):
            tensors = [x, weight, *self.dora_factors(adapter)]
            if self.lora_B[adapter].bias is not None:
                tensors.append(self.lora_B[adapter].bias)
            if self.use_dora.get(adapter, False):
                tensors.append(self.lora_magnitude_vector[adapter].weight)
            return all(autocast_eligible(t) for t in tensors)
        return x.dtype == weight.dtype

    def _fused_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        # Adapters kept in fp32 over a half-precision base (PEFT's autocast_adapter_dtype) are
        # passed as they are: the op runs their branch in fp32, as PEFT does.
        p = dropout_p(self.lora_dropout[adapter])
        training = self.training and p > 0.0
        seed = fresh_dropout_seed() if training else 0
        lora_B = self.lora_B[adapter]
        return ops.lora_linear(x, self.base_weight_out_in(), self.base_layer.bias, self.lora_A[adapter].weight,
                               lora_B.weight, self.scaling[adapter], p, seed, training, lora_bias=lora_B.bias)

    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """PEFT's unfused formulation: B(A(dropout(x)))·s in the adapter's dtype."""
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        x = x.to(lora_A.weight.dtype)
        return lora_B(lora_A(self.lora_dropout[adapter](x))) * self.scaling[adapter]

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any,
                             **kwargs: Any) -> torch.Tensor:
        """Row i with adapter adapter_names[i]: the base output plus one BGMV/SGMV shrink and
        expand over the layer's adapter pool, whatever the number of distinct adapters."""
        result = self.base_layer(x, *args, **kwargs)
        return serving.mixed_batch_linear(self, x, result, adapter_names)

    def __repr__(self) -> str:
        return "lora_ext." + super().__repr__()
