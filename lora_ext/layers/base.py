"""What every LoRA layer shares: adapters by name, scaling, merge/unmerge, activation.

The attribute names (base_layer, lora_A, lora_B, lora_embedding_A/B, lora_dropout,
scaling, r, lora_alpha, merged_adapters) are PEFT's, so a model's state_dict keys are
the keys PEFT gives the same model, and adapters move between the two unchanged.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .. import init as lora_init
from . import dora


class AdapterStatus:
    """PEFT's status properties of a tuner layer, from its _active_adapter, _disable_adapters and
    merged_adapters (shared by LoRA layers and trainable-token layers)."""

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)


class LoraLayer(AdapterStatus):
    """Mixin for a module that wraps `base_layer` and adds named LoRA adapters."""

    # attribute names that hold adapter parameters (state_dict keys contain them)
    adapter_layer_names: tuple[str, ...] = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                                            "lora_magnitude_vector")
    # per-adapter settings, keyed by adapter name like the containers above (PEFT's name)
    other_param_names: tuple[str, ...] = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora",
                                          "lora_bias")

    def _init_lora_state(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}  # lora_bias=True: lora_B has a bias (PEFT's lora_B bias)
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter: list[str] = []

    # ---------------------------------------------------------------- adapter bookkeeping

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def _adapter_modules(self):
        return [getattr(self, name) for name in self.adapter_layer_names]

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Activate these adapters; only active adapters are trainable (as in PEFT)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for container in self._adapter_modules():
            for key, item in container.items():
                item.requires_grad_(key in names)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for container in self._adapter_modules():
                for item in container.values():
                    item.requires_grad_(False)
            self._disable_adapters = True

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch gradients of these adapters' parameters on or off (PEFT's set_requires_grad)."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for container in self._adapter_modules():
            for key, item in container.items():
                if key in names:
                    item.requires_grad_(requires_grad)

    def _get_available_adapters(self) -> set[str]:
        return {key for container in self._adapter_modules() for key in container}

    def _all_available_adapter_names(self) -> list[str]:
        """Every adapter name any per-adapter table of the layer holds, sorted (PEFT's method)."""
        names: set[str] = set()
        for attr in self.adapter_layer_names + self.other_param_names:
            table = getattr(self, attr, None)
            if hasattr(table, "keys"):
                names.update(table.keys())
        return sorted(names)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             "first.")
        for attr in self.adapter_layer_names + self.other_param_names:
            table = getattr(self, attr)
            if adapter_name in table:
                del table[adapter_name]
        if adapter_name in self._active_adapter:
            remaining = [n for n in self._active_adapter if n != adapter_name]
            if not remaining and self.r:
                remaining = [next(iter(self.r))]
            self._active_adapter = remaining

    def _set_scaling(self, adapter_name: str, r: int, lora_alpha: float, use_rslora: bool) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.scaling[adapter_name] = self._initial_scaling(adapter_name)

    def _initial_scaling(self, adapter: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.r[adapter], self.lora_alpha[adapter]
        return alpha / math.sqrt(r) if self.use_rslora.get(adapter, False) else alpha / r

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the adapter's scaling to its initial value times `scale` (PEFT's set_scale)."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self._initial_scaling(adapter)

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of every active adapter by `scale` (PEFT's scale_layer)."""
        for name in self.active_adapters:
            if name in self.scaling:
                self.scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the active adapters' scaling by `scale`, or reset it when None (PEFT's unscale_layer)."""
        for name in self.active_adapters:
            if name in self.scaling:
                self.scaling[name] = self._initial_scaling(name) if scale is None else self.scaling[name] / scale

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        """Adapter parameters follow the base weight's device and (floating) dtype."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for container in self._adapter_modules():
            if adapter_name in container:
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    container[adapter_name] = nn.Parameter(item.data.to(weight.device, dtype))
                else:
                    item.to(weight.device, dtype)

    def _set_lora_bias(self, adapter_name: str, lora_bias: bool) -> None:
        """Record lora_bias for this adapter (its lora_B is then built with a bias); PEFT's warning
        when the base layer has no bias to fold it into at merge time."""
        if lora_bias and getattr(self.base_layer, "bias", None) is None:
            kind = type(self.base_layer).__name__
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {kind} has no bias. This means "
                          "that merging LoRA weights won't be possible.")
        self.lora_bias[adapter_name] = bool(lora_bias)

    def merged_bias(self, adapter: str) -> torch.Tensor | None:
        """The base bias plus scaling·(lora_B bias), for a lora_bias adapter (None otherwise).
        RuntimeError (PEFT's) when the base layer has no bias to hold it."""
        if not self.lora_bias.get(adapter, False):
            return None
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        return (bias.data + self.lora_B[adapter].bias.detach() * self.scaling[adapter]).to(bias.dtype)

    def _unmerge_bias(self, adapter: str) -> None:
        if self.lora_bias.get(adapter, False):
            bias = self.base_layer.bias
            bias.data = (bias.data - self.lora_B[adapter].bias.detach() * self.scaling[adapter]).to(bias.dtype)

    def _dropout_module(self, p: float) -> nn.Module:
        return nn.Dropout(p=p) if p > 0.0 else nn.Identity()

    def _initialise(self, adapter_name: str, init_lora_weights, layer_kind: str, loftq_config=None) -> None:
        """Initialise A and B (and, for PiSSA/OLoRA, rewrite the base weight) as PEFT does."""
        if layer_kind == "embedding":
            lora_A, lora_B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        else:
            lora_A, lora_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        lora_B_bias = self.lora_B[adapter_name].bias if self.lora_bias.get(adapter_name, False) else None
        new_base = lora_init.init_lora_weights(
            lora_A, lora_B, init_lora_weights, base_weight=self.base_layer.weight, r=self.r[adapter_name],
            scaling=self.scaling[adapter_name], fan_in_fan_out=getattr(self, "fan_in_fan_out", False),
            layer_kind=layer_kind, lora_B_bias=lora_B_bias, loftq_config=loftq_config)
        if new_base is not None:
            self.base_layer.weight.data = new_base

    # ---------------------------------------------------------------- merging

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def _check_adapters_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self.r]
        if not self.merged_adapters:
            return names
        # PEFT's warnings, whenever the layer already holds merged adapters
        todo = [n for n in names if n not in self.merged_adapters]
        if todo:
            warnings.warn(f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                          f"You are now additionally merging {','.join(todo)}.")
        else:
            warnings.warn("All adapters are already merged, nothing to do.")
        return todo

    def merged_weight(self, adapter: str) -> torch.Tensor:
        """The base weight with this adapter merged in (not yet written)."""
        if self.use_dora.get(adapter, False):
            return dora.merge_dora(self, adapter)
        weight = self.base_layer.weight
        return weight.data + self.get_delta_weight(adapter).to(weight.dtype)

    def unmerged_weight(self, adapter: str) -> torch.Tensor:
        """The base weight with this (merged) adapter taken out again."""
        if self.use_dora.get(adapter, False):
            return dora.unmerge_dora(self, adapter)
        weight = self.base_layer.weight
        return weight.data - self.get_delta_weight(adapter).to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the adapters into the base weight.

        safe_merge computes the merged weight first and raises ValueError, leaving the
        layer unchanged, if it contains NaN or Inf.
        """
        weight = self.base_layer.weight
        for name in self._check_adapters_to_merge(adapter_names):
            # both before anything changes: a lora_bias adapter over a bias-free base raises
            merged = self.merged_weight(name)
            merged_bias = self.merged_bias(name)
            if safe_merge and not (torch.isfinite(merged).all() and (
                    merged_bias is None or torch.isfinite(merged_bias).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight.data = merged
            if merged_bias is not None:
                self.base_layer.bias.data = merged_bias
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.r:
                weight.data = self.unmerged_weight(name)
                self._unmerge_bias(name)

    # ---------------------------------------------------------------- mixed batches

    def _check_adapter_names(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        if len(x) != len(adapter_names):
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {len(x)} respectively.")
        if any(self.use_dora.get(name, False) for name in set(adapter_names) - {"__base__"}):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
