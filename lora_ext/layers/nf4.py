"""LoRA and DoRA on a 4-bit NF4 base (QLoRA), PEFT's lora.bnb.Linear4bit semantics.

    y = nf4_matmul(x) + b + s·(drop(x)·Aᵀ)·Bᵀ

The base runs through ops.nf4_matmul (no dense weight is kept for backward). The adapter
term runs in the adapter's dtype, as PEFT computes it (x cast to lora_A's dtype, the result
cast back), with the fused kernel's dropout: the Philox mask of ops.dropout_mask, regenerated
in backward, so only x and z = drop(x)·Aᵀ (r columns) are saved.

DoRA follows PEFT's DoraLinearLayer on a dequantised base (a reference path in PyTorch):
y = base + (g - 1)·(base(drop(x)) - b) + g·s·(drop(x)·Aᵀ)·Bᵀ with g = m / ‖W + s·B·A‖ detached.

Merging dequantises, adds the adapter and quantises again with the layer's settings, as PEFT
does for bitsandbytes 4-bit bases; both merge and unmerge warn that this rounds.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..nf4 import NF4Linear
from ..ops._common import autocast_active, autocast_eligible, check_seed
from .linear import Linear, dropout_p, fresh_dropout_seed

_MERGE_WARNING = "Merge lora module to 4-bit linear may get different generations due to rounding errors."
_UNMERGE_WARNING = "Unmerge lora module to 4-bit linear may get different generations due to rounding errors."


class _LoraDelta(torch.autograd.Function):
    """s·(drop(x)·Aᵀ)·Bᵀ saving x and z only; the dropout mask is regenerated from the seed."""

    @staticmethod
    def forward(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, p: float, seed: Tensor) -> Tensor:
        dropped = _drop(x, p, seed)
        z = dropped @ lora_A.T
        return (z @ lora_B.T) * scaling, z

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, lora_A, lora_B, scaling, p, seed = inputs
        ctx.save_for_backward(x, output[1], lora_A, lora_B)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_z):
        x, z, lora_A, lora_B = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        grad_y = grad_y * ctx.scaling
        grad_x = grad_A = grad_B = None
        rows_out = grad_y.reshape(-1, grad_y.shape[-1])
        if need_B:
            grad_B = rows_out.T @ z.reshape(-1, z.shape[-1])
        if need_x or need_A:
            grad_z = grad_y @ lora_B
            if need_A:
                dropped = _drop(x, ctx.p, ctx.seed)
                grad_A = grad_z.reshape(-1, grad_z.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1])
            if need_x:
                grad_x = _drop(grad_z @ lora_A, ctx.p, ctx.seed, like=x)
        return grad_x, grad_A, grad_B, None, None, None


def _drop(t: Tensor, p: float, seed: Tensor, like: Tensor | None = None) -> Tensor:
    """t·mask/(1-p) with the Philox mask of `like` (default t): reference.lora_dropout's semantics."""
    if p == 0.0:
        return t
    return t * ops.dropout_mask(t if like is None else like, p, seed) / (1.0 - p)


def lora_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, p: float = 0.0,
               seed: int | Tensor = 0) -> Tensor:
    """s·(drop(x)·Aᵀ)·Bᵀ, dropout as in ops.lora_linear (x and z saved for backward, not drop(x));
    seed an int or a one-element int64 tensor, as for ops.lora_linear."""
    return _LoraDelta.apply(x, lora_A, lora_B, float(scaling), float(p), check_seed(seed))[0]


class Linear4bit(Linear):
    """A LoRA layer around a lora_ext.NF4Linear (PEFT's lora.bnb.Linear4bit)."""

    def __init__(self, base_layer: NF4Linear, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, init_lora_weights=True, use_rslora: bool = False,
                 use_dora: bool = False, **kwargs: Any) -> None:
        if not isinstance(base_layer, NF4Linear):
            raise TypeError(f"Linear4bit wraps a lora_ext.NF4Linear, got {type(base_layer).__name__}")
        if kwargs.get("fan_in_fan_out"):
            raise ValueError("fan_in_fan_out=True is not possible for a 4-bit base (its weight is [out, in])")
        if isinstance(init_lora_weights, str) and init_lora_weights.lower() in ("loftq", "olora") or (
                isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa")):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} needs the full-precision base weight; "
                             "apply it to the unquantised model and quantise afterwards, or (LoftQ) call "
                             "lora_ext.replace_lora_weights_loftq on the quantised PEFT model")
        nn.Module.__init__(self)
        self._init_lora_state(base_layer, base_layer.in_features, base_layer.out_features)
        self.fan_in_fan_out = False
        self._dora_merge_norms: dict[str, Tensor] = {}
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora,
                          lora_bias=kwargs.get("lora_bias", False))
        self.set_adapter(adapter_name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False, **kwargs) -> None:
        super().update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, False,
                             lora_bias=kwargs.get("lora_bias", False))
        self.use_dora[adapter_name] = bool(use_dora)
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude4bit(self, adapter_name)
            self.set_adapter(self.active_adapters)

    # ---------------------------------------------------------------- weights

    def base_weight_out_in(self) -> Tensor:
        return self.base_layer.dequantize()

    def merged_weight(self, adapter: str) -> Tensor:
        weight = self.base_layer.dequantize()
        if self.use_dora.get(adapter, False):
            return self._dora_merge(adapter, weight)
        return weight + self.get_delta_weight(adapter)

    def unmerged_weight(self, adapter: str) -> Tensor:
        weight = self.base_layer.dequantize()
        delta = self.get_delta_weight(adapter)
        if self.use_dora.get(adapter, False):
            norm = self._dora_merge_norms.pop(adapter)
            factor = self.lora_magnitude_vector[adapter].weight / norm
            return (weight / factor.view(-1, 1) - delta).to(weight.dtype)  # PEFT's DoRA keeps the dtype
        return weight - delta

    @torch.no_grad()
    def _dora_merge(self, adapter: str, weight: Tensor) -> Tensor:
        """m/‖W₀ + ΔW‖ · (W + ΔW), the norm from the weight without merged adapters (PEFT's merge_safe)."""
        delta = self.get_delta_weight(adapter)
        base = weight
        for name in reversed(self.merged_adapters):  # take out what is merged to find W₀
            base = self._take_out(name, base)
        norm = torch.linalg.norm(base + delta, dim=1).to((base + delta).dtype)
        self._dora_merge_norms[adapter] = norm
        factor = self.lora_magnitude_vector[adapter].weight / norm
        # PEFT casts a DoRA merge back to the dequantised dtype (a plain LoRA merge it does not)
        return (factor.view(-1, 1) * (weight + delta)).to(weight.dtype)

    def _take_out(self, name: str, weight: Tensor) -> Tensor:
        delta = self.get_delta_weight(name)
        if self.use_dora.get(name, False):
            factor = self.lora_magnitude_vector[name].weight / self._dora_merge_norms[name]
            return weight / factor.view(-1, 1) - delta
        return weight - delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantise, merge, quantise again (with a warning about rounding), as PEFT does for 4-bit."""
        for name in self._check_adapters_to_merge(adapter_names):
            if name not in self.lora_A:
                continue
            warnings.warn(_MERGE_WARNING, stacklevel=2)
            merged_bias = self.merged_bias(name)  # (PEFT 0.21 leaves out the scaling here; we fold s·b)
            merged = self.merged_weight(name)
            if safe_merge and not (torch.isfinite(merged).all() and (
                    merged_bias is None or torch.isfinite(merged_bias).all())):
                self._dora_merge_norms.pop(name, None)
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self._requantize(merged)
            if merged_bias is not None:
                self.base_layer.bias.data = merged_bias
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            warnings.warn(_UNMERGE_WARNING, stacklevel=2)
            self._requantize(self.unmerged_weight(name))
            self._unmerge_bias(name)

    def _requantize(self, weight: Tensor) -> None:
        # As PEFT with bitsandbytes: the merged weight is quantised in the dtype the merge
        # produced (LoRA: fp32 with fp32 adapters; DoRA: the base dtype) and the quant state
        # records that dtype.
        self.base_layer.set_quantized_weight(weight)
        self.base_layer.weight_dtype = weight.dtype

    # ---------------------------------------------------------------- forward

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            self._check_adapter_names(x, adapter_names)
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            # as PEFT: outside autocast the adapter runs in its own dtype and its output is cast back
            convert = not torch.is_autocast_enabled(x.device.type)
            expected = result.dtype
            x_adapter = x.to(self.lora_A[name].weight.dtype) if convert else x
            if self.use_dora.get(name, False):
                result = result + self._dora_output(x_adapter, name, result)
            else:
                output = self._lora_output(x_adapter, name)
                result = result + (output.to(expected) if convert else output)
            if convert:
                result = result.to(expected)
        return result

    def _dropout_args(self, adapter: str) -> tuple[float, int | Tensor]:
        p = dropout_p(self.lora_dropout[adapter])
        if not (self.training and p > 0.0):
            return 0.0, 0
        return p, fresh_dropout_seed()

    def _lora_output(self, x: Tensor, adapter: str) -> Tensor:
        output = self._lora_delta(x, adapter)
        bias = self.lora_B[adapter].bias  # lora_bias=True: PEFT's lora_B(...) * scaling includes it
        return output if bias is None else output + bias.to(output.dtype) * self.scaling[adapter]

    def _lora_delta(self, x: Tensor, adapter: str) -> Tensor:
        p, seed = self._dropout_args(adapter)
        lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if autocast_active(x) and all(autocast_eligible(t) for t in (x, lora_A, lora_B)):
            # As PEFT's nn.Linear adapters under autocast: x, A and B in the autocast dtype. The
            # casts are autograd ops (fp32 adapters get fp32 gradients); autocast is off inside so
            # that forward and backward of lora_delta see one dtype.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, lora_A, lora_B = x.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                return lora_delta(x, lora_A, lora_B, self.scaling[adapter], p, seed)
        if x.dtype != lora_A.dtype:
            lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        return lora_delta(x, lora_A, lora_B, self.scaling[adapter], p, seed)

    def _dora_output(self, x: Tensor, adapter: str, result: Tensor) -> Tensor:
        """PEFT's DoRA contribution on a dequantised base (reference path, in x's dtype)."""
        lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        scaling = self.scaling[adapter]
        magnitude = self.lora_magnitude_vector[adapter]
        # the cache key: anything whose change changes the norm (in-place edits bump _version)
        key = (scaling, x.dtype) + tuple((t.data_ptr(), t._version, tuple(t.shape), t.device)
                                         for t in (self.base_layer.weight, self.base_layer.absmax, lora_A, lora_B))
        norm = magnitude.cached_norm(lambda: _weight_norm(self.base_layer.dequantize(x.dtype),
                                                          lora_A.to(x.dtype), lora_B.to(x.dtype), scaling), key)
        scale = (magnitude.weight / norm).view(1, -1)
        p, seed = self._dropout_args(adapter)
        if p == 0.0:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        else:
            x = _drop(x, p, seed)
            base = self.base_layer(x)
            if self.base_layer.bias is not None:
                base = base - self.base_layer.bias
        lora = (x @ lora_A.to(x.dtype).T) @ lora_B.to(x.dtype).T
        return (scale - 1) * base + scale * lora * scaling

    def __repr__(self) -> str:
        return "lora_ext." + nn.Module.__repr__(self)


@torch.no_grad()
def _weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """‖W + s·B·A‖ per output row, detached (DoRA treats it as a constant)."""
    combined = weight + scaling * (lora_B @ lora_A)
    return torch.linalg.norm(combined, dim=1).to(combined.dtype)


class DoraMagnitude4bit(nn.Module):
    """The magnitude vector as `.weight` [out] (PEFT's key lora_magnitude_vector.<name>.weight)."""

    def __init__(self, layer: Linear4bit, adapter_name: str) -> None:
        super().__init__()
        lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        weight = layer.base_layer.dequantize()
        norm = _weight_norm(weight, lora_A.to(weight.dtype), lora_B.to(weight.dtype), layer.scaling[adapter_name])
        self.weight = nn.Parameter(norm, requires_grad=True)
        self._norm_cache: tuple[tuple, Tensor] | None = None

    def train(self, mode: bool = True):
        self._norm_cache = None
        return super().train(mode)

    def cached_norm(self, compute, key: tuple) -> Tensor:
        """Recomputed while training or with grad on (the adapter changes); in inference cached
        until `key` (scaling, dtype, identity and version of the weights) changes."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._norm_cache = None
            return compute()
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, compute())
        return self._norm_cache[1]

    def __repr__(self) -> str:
        return "lora_ext.dora." + super().__repr__()
