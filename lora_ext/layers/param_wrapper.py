"""LoRA on a raw nn.Parameter: PEFT's `target_parameters` and its lora.ParamWrapper.

Some weights live in no nn.Linear: transformers' mixture-of-experts blocks keep every
expert's projection in one 3-D parameter [num_experts, d1, d2] and multiply by it directly
(Llama4, GptOss, Mixtral in transformers 5). A ParamWrapper wraps the module that owns such
a parameter and, for the duration of its forward, makes the parameter read as W + ΔW through
torch.nn.utils.parametrize (PEFT's mechanism): the owner's own forward runs unchanged. One
wrapper adapts one parameter; a second parameter of the same module gets a second wrapper
around the first (nested, as in PEFT), which is also how the saved keys tell them apart.

Shapes are PEFT's to the element, since saved files depend on them:
- 2-D W [out, in]: lora_A [r, in], lora_B [out, r], ΔW = s·B·A.
- 3-D W [E, d1, d2]: lora_A [r·E, in], lora_B [out, r·E], with (in, out) = (d1, d2) when the
  owner says is_transposed=True (it computes x·W[e]) and (d2, d1) otherwise. Expert e uses
  rows e·r .. e·r+r-1 of A and the columns c of B with c % E == e (B is read as [out, r, E]);
  ΔW[e] = s·B_e·A_e, laid out as W[e].

No kernel of ours computes W + ΔW, so the arithmetic is PEFT's (one matmul, or one baddbmm
for the experts); the owner's forward does the rest. Dropout (it acts on the input, not
on W), DoRA, fan_in_fan_out, lora_bias and mixed-adapter batches are refused, as by PEFT.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import init as lora_init
from .base import LoraLayer
from .linear import Linear

# dtypes a delta can be added in; float8 parameters are upcast to the delta's dtype for the
# addition and clamped back (PEFT's rule)
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT8_NAMES = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")


def _is_float8(dtype: torch.dtype) -> bool:
    return any(getattr(torch, name, None) == dtype for name in _FLOAT8_NAMES)


class _AddDelta(nn.Module):
    """Parametrization W -> W + delta (several adapters' deltas summed, or one 2-D delta)."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not _is_float8(weight.dtype):
            return weight + self.delta
        if self.delta.dtype not in COMPUTE_DTYPES:
            raise RuntimeError(f"There is an attempt to upcast the targeted parameter to {self.delta.dtype} but the "
                               f"only supported are: {COMPUTE_DTYPES}.")
        info = torch.finfo(weight.dtype)  # float8 casts do not saturate: clamp first, or get NaN
        return (weight.to(self.delta.dtype) + self.delta).clamp(info.min, info.max).to(weight.dtype)


class _AddFactors(nn.Module):
    """Parametrization W -> W + s·lhs·rhs, one batched GEMM over the experts: never a second
    tensor the size of the whole expert stack."""

    def __init__(self, lhs: torch.Tensor, rhs: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.lhs, self.rhs, self.scaling = lhs, rhs, scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # a parametrization must keep W's dtype, which autocast would change
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, self.lhs, self.rhs, alpha=self.scaling)


class ParamWrapper(nn.Module, LoraLayer):
    """LoRA adapters on the parameter `parameter_name` of the wrapped module."""

    fan_in_fan_out = False  # Linear.get_delta_weight reads it

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, r: int = 0,
                 lora_alpha: float = 1, lora_dropout: float = 0.0, init_lora_weights=True, use_rslora: bool = False,
                 use_dora: bool = False, fan_in_fan_out: bool = False, lora_bias: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        self.parameter_name = parameter_name
        owner = base_layer
        while isinstance(owner, ParamWrapper):
            owner = owner.base_layer
        shape = tuple(getattr(owner, parameter_name).shape)
        name = type(self).__name__
        if len(shape) not in (2, 3):
            raise ValueError(f"lora.{name} was initialized with {len(shape)} dimensional Parameter, but only 2d and "
                             "3d are supported.")
        for refused, what in ((lora_dropout, "lora_dropout != 0"), (fan_in_fan_out, "fan_in_fan_out"),
                              (lora_bias, "lora_bias=True"), (use_dora, "use_dora=True")):
            if refused:
                raise ValueError(f"lora.{name} does not work with {what}.")
        if len(shape) == 2:
            self.num_experts, in_features, out_features = 1, shape[1], shape[0]
        else:
            self.num_experts, in_features, out_features = shape
            if not getattr(owner, "is_transposed", False):  # [E, out, in]: the owner computes W[e]·x
                in_features, out_features = out_features, in_features
        self._init_lora_state(base_layer, in_features, out_features)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora)
        self.set_adapter(adapter_name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                     **kwargs: Any) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        name = type(self).__name__
        if use_dora:
            raise ValueError(f"lora.{name} does not work with LoRA variants like DoRA.")
        if lora_dropout:
            raise ValueError(f"lora.{name} does not work with lora_dropout != 0.")
        if init_lora_weights == "loftq":
            raise ValueError(f"init_lora_weights='loftq' is not supported by lora-ext for target_parameters "
                             f"(lora.{name}); expected True, 'gaussian', False, 'pissa' or 'olora'")
        self._set_scaling(adapter_name, r, lora_alpha, use_rslora)
        self.use_dora[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Identity()
        rows = r * self.num_experts
        self.lora_A[adapter_name] = nn.Linear(self.in_features, rows, bias=False)
        self.lora_B[adapter_name] = nn.Linear(rows, self.out_features, bias=False)
        # PiSSA / OLoRA factor a 2-D parameter as PEFT does a Linear's weight (and rewrite it);
        # a stack of experts is refused by the initialisation
        param = self.get_param()
        new_param = lora_init.init_lora_weights(
            self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, init_lora_weights, r=r,
            scaling=self.scaling[adapter_name], base_weight=param if param.dim() == 2 else None,
            experts=self.num_experts)
        if new_param is not None:
            param.data = new_param
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters)

    # ---------------------------------------------------------------- the parameter

    def get_base_layer(self) -> nn.Module:
        """The module that owns the parameter, below any nested wrappers."""
        base = self.base_layer
        while isinstance(base, ParamWrapper):
            base = base.base_layer
        return base

    def get_param(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), self.parameter_name)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        param = self.get_param()
        dtype = param.dtype if param.dtype.is_floating_point else None
        for container in (self.lora_A, self.lora_B):
            if adapter_name in container:
                container[adapter_name].to(param.device, dtype)

    # ---------------------------------------------------------------- deltas

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s·B·A laid out as the parameter (one slice per expert), in its dtype and device."""
        if self.num_experts == 1:
            delta = Linear.get_delta_weight(self, adapter)
        else:
            weight_A = self.lora_A[adapter].weight.reshape(self.num_experts, -1, self.in_features)  # [E, r, in]
            weight_B = self.lora_B[adapter].weight.reshape(self.out_features, -1, self.num_experts)  # [out, r, E]
            layout = "e i o" if self._owner_transposed() else "e o i"
            delta = torch.einsum(f"o r e, e r i -> {layout}", weight_B, weight_A) * self.scaling[adapter]
        param = self.get_param()
        # a float8 parameter takes the delta in the adapter's dtype (added upcast, see _AddDelta)
        return delta.to(param.device, param.dtype) if param.dtype in COMPUTE_DTYPES else delta.to(param.device)

    def _owner_transposed(self) -> bool:
        return bool(getattr(self.get_base_layer(), "is_transposed", False))

    def get_delta_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(lhs, rhs, s) with ΔW = s·lhs·rhs per expert, in the parameter's dtype."""
        experts = self.num_experts
        weight_A = self.lora_A[adapter].weight.reshape(experts, -1, self.in_features)                    # [E, r, in]
        weight_B = self.lora_B[adapter].weight.reshape(self.out_features, -1, experts).permute(2, 0, 1)  # [E, out, r]
        if self._owner_transposed():
            lhs, rhs = weight_A.transpose(-2, -1), weight_B.transpose(-2, -1)
        else:
            lhs, rhs = weight_B, weight_A
        dtype = self.get_param().dtype
        return lhs.to(dtype), rhs.to(dtype), self.scaling[adapter]

    @contextmanager
    def _activate_lora(self, active_adapters: list[str]):
        """Inside the block the parameter reads as W + the active adapters' ΔW (cached per forward)."""
        adapters = [name for name in active_adapters if name in self.lora_A]
        if not adapters:
            yield
            return
        param = self.get_param()
        if len(adapters) == 1 and self.num_experts > 1 and not _is_float8(param.dtype):
            proxy = _AddFactors(*self.get_delta_factors(adapters[0]))
        else:
            delta = self.get_delta_weight(adapters[0])
            for name in adapters[1:]:
                delta = delta + self.get_delta_weight(name)
            proxy = _AddDelta(delta)
        owner, requires_grad = self.get_base_layer(), param.requires_grad
        parametrize.register_parametrization(owner, self.parameter_name, proxy)
        owner.parametrizations[self.parameter_name].original.requires_grad_(requires_grad)
        try:
            with parametrize.cached():
                yield
        finally:
            self._remove_parametrization(owner)

    def _remove_parametrization(self, owner: nn.Module) -> None:
        stack = owner.parametrizations[self.parameter_name]
        if len(stack) == 1:
            parametrize.remove_parametrizations(owner, self.parameter_name, leave_parametrized=False)
            return
        # the parameter carries parametrizations of its own (the user's): remove only ours, the last one added
        for index in reversed(range(len(stack))):
            if isinstance(stack[index], (_AddDelta, _AddFactors)):
                del stack[index]
                return
        warnings.warn(f"Could not find the LoRA parametrization of {self.parameter_name!r} to remove it.")

    # ---------------------------------------------------------------- merging

    def merged_weight(self, adapter: str) -> torch.Tensor:
        param = self.get_param()
        return param.data + self.get_delta_weight(adapter).to(param.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        param = self.get_param()
        for name in self._check_adapters_to_merge(adapter_names):
            if safe_merge:
                merged = self.merged_weight(name)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                param.data = merged
            else:
                param.data += self.get_delta_weight(name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        param = self.get_param()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                param.data -= self.get_delta_weight(name).to(param.dtype)

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(f"lora.{type(self).__name__} does not support mixed adapter batches yet.")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        with self._activate_lora(self.active_adapters):
            return self.base_layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        text = super().__repr__()
        cut = text.find("(") + 1
        # the parameter's name tells nested wrappers apart
        return f"lora_ext.{text[:cut]}\n  parameter_name='{self.parameter_name}',{text[cut:]}"
