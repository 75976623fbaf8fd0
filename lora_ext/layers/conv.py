"""LoRA on nn.Conv1d/Conv2d/Conv3d: A is a conv of the base's kind with its kernel, stride and
padding; B a 1x1(x1) conv. As PEFT's _ConvNd, one class for the three, told apart by the
base weight's dimension.

One active adapter without dropout (or in eval) runs as a single convolution with the
merged weight W + s·reshape(B·A) (ops.lora_conv; DoRA: ops.dora_conv): exact, and cheaper
than PEFT's three convolutions (`lora-ext bench --family conv`). merged_conv_reason says when a base conv
allows it; lora_ext.accelerate applies the same rule to PEFT's conv layers.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import dora
from .. import ops
from ..ops._common import autocast_active
from .base import LoraLayer


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def merged_conv_reason(base: nn.Module) -> str | None:
    """Why LoRA on the conv `base` cannot run as one convolution with the merged weight
    (ops.lora_conv), or None when it can. The adapter's lora_A has the base's kernel, stride
    and padding but no dilation, groups or padding mode of its own (as in PEFT), so only a
    plain convolution merges into the exact same function."""
    if type(base) not in _CONV_MODULES:
        return f"base layer {type(base).__name__} (fused: nn.Conv1d, nn.Conv2d, nn.Conv3d)"
    if base.groups != 1:
        return "a grouped convolution (groups > 1: no merged weight B·A)"
    if any(d != 1 for d in base.dilation):
        return "a dilated convolution (lora_A convolves undilated)"
    if base.padding_mode != "zeros":
        return f"padding_mode={base.padding_mode!r} (lora_A pads with zeros)"
    if isinstance(base.padding, str) and base.padding != "valid":
        return f"padding={base.padding!r}"
    return None


def merged_conv_padding(base: nn.Module) -> tuple[int, ...]:
    """The base conv's padding as ints (for a base merged_conv_reason accepts)."""
    return (0,) * len(base.kernel_size) if base.padding == "valid" else tuple(base.padding)


class _ConvNd(nn.Module, LoraLayer):
    spatial_dims: int = 2  # 1, 2 or 3: set by Conv1d / Conv2d / Conv3d

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, init_lora_weights=True, use_rslora: bool = False,
                 use_dora: bool = False, **kwargs: Any) -> None:
        super().__init__()
        if base_layer.weight.dim() != self.spatial_dims + 2:
            raise ValueError(f"{type(self).__name__} layer kernel must have {self.spatial_dims + 2} dimensions, not "
                             f"{base_layer.weight.dim()}")
        self._init_lora_state(base_layer, base_layer.in_channels, base_layer.out_channels)
        self._dora_merge_norms: dict[str, torch.Tensor] = {}  # DoRA: the norms used at merge time
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora,
                          lora_bias=kwargs.get("lora_bias", False))
        self.set_adapter(adapter_name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                     loftq_config=None, lora_bias: bool = False) -> None:  # loftq_config: refused by the init here
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        base = self.base_layer
        kind = type(base).__name__
        if r % base.groups != 0:
            raise ValueError(f"Targeting a {kind} with groups={base.groups} and rank {r}. Currently, support is "
                             "limited to conv layers where the rank is divisible by groups. Either choose a "
                             "different rank or do not target this specific layer.")
        self._set_lora_bias(adapter_name, lora_bias)
        self._set_scaling(adapter_name, r, lora_alpha, use_rslora)
        self.use_dora[adapter_name] = bool(use_dora)
        self.lora_dropout[adapter_name] = self._dropout_module(lora_dropout)
        conv, ones = type(base), (1,) * self.spatial_dims
        self.lora_A[adapter_name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                         bias=False)
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)
        self._initialise(adapter_name, init_lora_weights, f"conv{self.spatial_dims}d")
        self._move_adapter_to_base(adapter_name)
        if use_dora:  # PEFT keeps the conv magnitude as [1, out, 1, ...]
            self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude(
                self, adapter_name, shape=(1, self.out_features, *ones))
        self.set_adapter(self.active_adapters)

    @property
    def conv_fn(self):
        """F.conv1d, conv2d or conv3d (PEFT's attribute of that name)."""
        return _CONV_FUNCTIONS[self.spatial_dims]

    # DoRA sees the kernel as [out, in·k...]; B·A of the flattened factors is the composed kernel.
    def base_weight_out_in(self) -> torch.Tensor:
        return self.to_out_in(self.base_layer.weight)

    def dora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight_A, weight_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        r, groups = weight_A.shape[0], self.base_layer.groups
        if groups == 1:
            return weight_A.reshape(r, -1), weight_B.reshape(weight_B.shape[0], -1)
        # A grouped conv has no [out, in·k] product B·A. PEFT's DoRA norm takes
        # L = (B viewed [out/g, r]) @ (A viewed [r, in·k]) reshaped to W's [out, in/g·k]: row o of
        # L is row o // g of that product times column chunk o % g of A. The same L as a product
        # of rank g·r: A'' stacks A's g column chunks, B'' puts row o // g in block o % g.
        chunks = weight_A.reshape(r, groups, -1).transpose(0, 1).reshape(groups * r, -1)
        rows = weight_B.reshape(-1, r).repeat_interleave(groups, dim=0)          # [out, r]
        blocks = torch.zeros(rows.shape[0], groups, r, dtype=rows.dtype, device=rows.device)
        blocks[torch.arange(rows.shape[0]), torch.arange(rows.shape[0]) % groups] = rows
        return chunks, blocks.reshape(rows.shape[0], groups * r)

    def to_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def from_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.base_layer.weight.shape)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if self.base_layer.groups > 1:
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
        weight_A, weight_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = weight_A.dtype
        if weight_A.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            weight_A, weight_B = weight_A.float(), weight_B.float()
        if self.spatial_dims == 2 and self.base_layer.weight.shape[2:4] == (1, 1):
            delta = (weight_B[:, :, 0, 0] @ weight_A[:, :, 0, 0])[:, :, None, None]
        else:
            # composing the two convolutions: out[o, i] = sum_r B[o, r] * A[r, i]
            delta = self.conv_fn(weight_A.transpose(0, 1), weight_B).transpose(0, 1)
        return (delta * self.scaling[adapter]).to(dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        fused = self._fusable_adapter(x) if adapter_names is None and not self.merged and not (args or kwargs) else None
        if fused is not None:
            base = self.base_layer
            args = (x, base.weight, base.bias, self.lora_A[fused].weight, self.lora_B[fused].weight)
            if self.use_dora.get(fused, False):
                return ops.dora_conv(*args, self.lora_magnitude_vector[fused].weight, self.scaling[fused],
                                     base.stride, merged_conv_padding(base))
            return ops.lora_conv(*args, self.scaling[fused], base.stride, merged_conv_padding(base))
        result = self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            self._check_adapter_names(x, adapter_names)
            for name in dict.fromkeys(adapter_names):
                if name in self.lora_A:
                    rows = [i for i, n in enumerate(adapter_names) if n == name]
                    result[rows] += self._adapter_output(x[rows], name).to(result.dtype)
            return result
        if self.merged:
            return result
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name in self.lora_A:
                if self.use_dora.get(name, False):
                    result = result + dora.dora_conv_contribution(self, x, name, result)
                else:
                    result = result + self._adapter_output(x, name)
        return result.to(result_dtype)

    def _fusable_adapter(self, x) -> str | None:
        """The one active adapter when ops.lora_conv / ops.dora_conv can stand in for the forward,
        else None: no dropout at work, one dtype throughout, outside autocast."""
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or merged_conv_reason(self.base_layer):
            return None
        drop = self.lora_dropout[active[0]]
        if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            return None  # the merged weight has no dropout on the adapter's input
        if self.lora_B[active[0]].bias is not None:
            return None  # lora_bias: the ops take no bias of the adapter's own
        weight = self.base_layer.weight
        tensors = [x, weight, self.lora_A[active[0]].weight, self.lora_B[active[0]].weight]
        if self.use_dora.get(active[0], False):
            tensors.append(self.lora_magnitude_vector[active[0]].weight)
        if not isinstance(x, torch.Tensor) or autocast_active(x) or x.dim() not in (weight.dim() - 1, weight.dim()):
            return None
        if any(t.dtype != weight.dtype or t.device != weight.device for t in tensors):
            return None
        return active[0]

    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        x = x.to(lora_A.weight.dtype)
        return lora_B(lora_A(self.lora_dropout[adapter](x))) * self.scaling[adapter]

    def __repr__(self) -> str:
        return "lora_ext." + super().__repr__()


class Conv1d(_ConvNd):
    spatial_dims = 1


class Conv2d(_ConvNd):
    spatial_dims = 2


class Conv3d(_ConvNd):
    spatial_dims = 3
