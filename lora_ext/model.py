"""LoraModel: finds the target modules, wraps them in LoRA layers, manages adapters.

Module matching, rank/alpha patterns, layer replication and trainability follow PEFT
0.21 rule for rule, so one LoraConfig selects the same modules and creates the same
parameters in both libraries.
"""
from __future__ import annotations

import copy
import re
import warnings
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import serving
from .config import LoraConfig
from .layers import (AuxiliaryTrainingWrapper, Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer,
                     ModulesToSaveWrapper, TrainableTokensWrapper)
from .layers.mha import MultiheadAttention
from .layers.trainable_tokens import add_trainable_tokens
from .layers.nf4 import Linear4bit
from .target_parameters import check_same_target_parameters, inject_parameters
from .nf4 import NF4Linear, _is_bnb_linear4bit
from .target_defaults import resolve_default_targets

INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")
_EXCLUDED = object()


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # transformers is optional
        return None


def _linear_classes() -> tuple[type, ...]:
    conv1d = _conv1d_class()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def check_adapter_name(adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name == "__base__":
        raise ValueError("adapter_name '__base__' is reserved for rows without an adapter (adapter_names=...)")
    if any(sep in adapter_name for sep in ("/", "\\", "\0")) or adapter_name in (".", ".."):
        raise ValueError(f"adapter_name {adapter_name!r} may not contain path separators or be '.'/'..': "
                         "it names a subfolder when saved")


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """The first rank/alpha pattern that matches the end of a module name (PEFT's rule)."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key_to_match):
            return pattern
    return key_to_match


def target_matches(config: LoraConfig, key: str):
    """True if module `key` is targeted, False if not, _EXCLUDED if explicitly excluded."""
    excluded = config.exclude_modules
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, key):
                return _EXCLUDED
        elif key in excluded or any(key.endswith(f".{name}") for name in excluded):
            return _EXCLUDED
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return _EXCLUDED
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{name}") for name in targets)
    layer_indexes = config.layers_to_transform
    if found and layer_indexes is not None and (not isinstance(layer_indexes, list) or layer_indexes):
        patterns = config.layers_pattern
        match = None
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes
    return found


def resolve_all_linear(config: LoraConfig, model: nn.Module) -> None:
    """target_modules="all-linear": every Linear/Conv1D except the output head (as PEFT)."""
    targets = config.target_modules
    if not (isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return
    names = {name for name, module in model.named_modules()
             if isinstance(module, (*_linear_classes(), Linear, NF4Linear))}
    exclude: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) and hasattr(model, "config") else None
    if output is not None:
        exclude |= {name for name, module in model.named_modules() if module is output}
    elif config.task_type is not None and config.task_type.value == "SEQ_CLS":
        for head in SEQ_CLS_HEAD_NAMES:
            module = getattr(model, head, None)
            if module is not None:
                exclude |= {name for name, m in model.named_modules() if m is module}
                break
    for prefix, module in model.named_modules():
        if isinstance(module, LoraLayer):
            exclude |= {f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix}
    config.target_modules = names - exclude


def replicate_layers(model: nn.Module, layer_map) -> None:
    """Rebuild the decoder layer list as the spans of layer_map, sharing base weights."""
    inner = model
    while hasattr(inner, "model") and isinstance(inner.model, nn.Module):
        inner = inner.model
    if hasattr(inner, "bert"):
        inner = inner.bert
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        owner, attr = inner, "layers"
    elif hasattr(inner, "encoder") and isinstance(getattr(inner.encoder, "layer", None), nn.ModuleList):
        owner, attr = inner.encoder, "layer"
    elif isinstance(getattr(inner, "h", None), nn.ModuleList):
        owner, attr = inner, "h"
    else:
        raise ValueError("layer_replication: could not find the layer list (model.layers, encoder.layer or h); "
                         "expected a Llama, Bert or Falcon-like architecture")
    layers = getattr(owner, attr)
    new_layers = []
    for start, end in layer_map:
        if not 0 <= start < end <= len(layers):
            raise ValueError(f"layer_replication span [{start}, {end}) is outside the model's {len(layers)} layers")
        for index in range(start, end):
            clone = copy.deepcopy(layers[index])
            for name, submodule in layers[index].named_modules():
                target = clone.get_submodule(name)
                for pname, param in submodule.named_parameters(recurse=False):
                    target.register_parameter(pname, param)  # shared, not copied
            for submodule in clone.modules():
                if hasattr(submodule, "layer_idx"):
                    submodule.layer_idx = len(new_layers)
            new_layers.append(clone)
    setattr(owner, attr, nn.ModuleList(new_layers))
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new_layers)


def _warn_unmatched_patterns(config: LoraConfig, targeted: list[str]) -> None:
    """rank_pattern / alpha_pattern keys that matched no targeted module (PEFT's warning)."""
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr) or {}
        unmatched = sorted(p for p in patterns if not any(re.match(rf"(.*\.)?({p})$", k) for k in targeted))
        if unmatched:
            warnings.warn(f"The following {attr} keys did not match any targeted module and were ignored: "
                          f"{unmatched}.", RuntimeWarning)


def _modules_outside_lora_layers(model: nn.Module) -> list[nn.Module]:
    """Every module of the tree except those inside LoRA layers (their per-adapter
    submodules, hundreds with many adapters, never hold further LoRA layers): what an
    adapter_names call must hook, walked in a fraction of model.modules()'s time."""
    found, stack = [], [model]
    while stack:
        module = stack.pop()
        found.append(module)
        if not isinstance(module, LoraLayer):
            stack.extend(m for m in module._modules.values() if m is not None)
    return found


class LoraModel(nn.Module):
    """The tuner: owns the base model (as `.model`) and its LoRA layers."""

    prefix = "lora_"

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self.targeted_module_names: list[str] = []  # every adapter's, without repeats (as PEFT)
        self.targeted_parameter_names: list[str] = []  # target_parameters matches, every adapter's
        self.inject_adapter(config, adapter_name)
        self.model.peft_config = self.peft_config  # as PEFT: transformers looks for it

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any):
        return self.model(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def lora_layers(self):
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    # ---------------------------------------------------------------- injection

    def inject_adapter(self, config: LoraConfig, adapter_name: str) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists. Choose another adapter_name "
                             f"(existing: {sorted(self.peft_config)})")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a lora_ext.LoraConfig, got {type(config).__name__}")
        if config.layer_replication:
            if self.peft_config:
                raise ValueError("layer_replication can only be used for the first adapter of a model")
            replicate_layers(self.model, config.layer_replication)
        biased = [name for name, other in self.peft_config.items() if other.bias != "none"]
        if biased and config.bias != "none":
            raise ValueError(f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, "
                             f"set bias to 'none' for all adapters (adapter {biased[0]!r} already has "
                             f"bias={self.peft_config[biased[0]].bias!r}).")
        check_same_target_parameters(self.peft_config, config)
        resolve_default_targets(config, self.model)
        resolve_all_linear(config, self.model)
        self.peft_config[adapter_name] = config
        matched, matched_parameters = [], []
        try:
            for key, module in list(self.model.named_modules()):
                if not key or self._inside_lora_layer(key):
                    continue
                if target_matches(config, key) is True:
                    self._create_and_replace(config, adapter_name, module, key)
                    matched.append(key)
            if config.target_parameters:
                matched_parameters = inject_parameters(
                    self.model, config, adapter_name,
                    lambda key: dict(self._layer_kwargs(config, key), fan_in_fan_out=config.fan_in_fan_out,
                                     lora_bias=getattr(config, "lora_bias", False)))
            if not matched and not matched_parameters and config.target_parameters is not None \
                    and not config.target_modules:
                raise ValueError("No `target_modules` passed but also no `target_parameters` found. Please check the "
                                 "values for these arguments.")
            if not matched and not matched_parameters:
                raise ValueError(
                    f"Target modules {config.target_modules} not found in the base model. Please check the target "
                    f"modules and try again (module names look like "
                    f"{[n for n, _ in list(self.model.named_modules())[1:6]]}).")
            self._add_modules_to_save(config, adapter_name)
            add_trainable_tokens(self.model, config, adapter_name, active=adapter_name in self.active_adapters)
        except Exception:
            self._remove_adapter_everywhere(adapter_name)
            del self.peft_config[adapter_name]
            raise
        if config.target_modules and not matched:
            warnings.warn(f"target_modules={config.target_modules} were set but no module was matched.", RuntimeWarning)
        elif config.target_parameters and not matched_parameters:
            warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was matched.",
                          RuntimeWarning)
        _warn_unmatched_patterns(config, matched)
        self.targeted_module_names.extend(k for k in matched if k not in self.targeted_module_names)
        self.targeted_parameter_names.extend(k for k in matched_parameters if k not in self.targeted_parameter_names)
        # only the layers that got this adapter re-apply their active adapters (as PEFT's
        # update_layer): an adapter frozen before (loaded with is_trainable=False) stays frozen
        self._mark_only_adapters_as_trainable(
            {id(layer) for _, layer in self.lora_layers() if adapter_name in layer._get_available_adapters()})
        if config.inference_mode:  # as PEFT: the modules that got this adapter freeze their active ones too
            for _, layer in self.lora_layers():
                if adapter_name in layer._get_available_adapters():
                    for container in layer._adapter_modules():
                        for key in {adapter_name, *layer.active_adapters} & set(container):
                            container[key].requires_grad_(False)
            for module in self.model.modules():
                if isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in module._get_available_adapters():
                    module.set_requires_grad([adapter_name, *module.active_adapters], False)
            for layer in self._token_layers():
                layer.set_requires_grad(adapter_name, False)

    def _inside_lora_layer(self, key: str) -> bool:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if isinstance(self.model.get_submodule(".".join(parts[:i])), (LoraLayer, AuxiliaryTrainingWrapper)):
                return True
        return False

    @staticmethod
    def _layer_kwargs(config: LoraConfig, key: str) -> dict:
        """The adapter settings of the module (or parameter) `key`: rank/alpha patterns applied."""
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), key), config.lora_alpha)
        kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                      init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora,
                      use_dora=config.use_dora, lora_bias=config.lora_bias)
        if config.init_lora_weights == "loftq":
            kwargs["loftq_config"] = config.loftq_config
        return kwargs

    def _create_and_replace(self, config: LoraConfig, adapter_name: str, target: nn.Module, key: str) -> None:
        kwargs = self._layer_kwargs(config, key)
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(config, adapter_name, target, **kwargs)
        parent_name, _, child_name = key.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child_name, new_module)
        if adapter_name not in self.active_adapters:
            new_module.set_adapter(self.active_adapters)
            for container in new_module._adapter_modules():
                if adapter_name in container:
                    container[adapter_name].requires_grad_(False)

    @staticmethod
    def _create_new_module(config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        if isinstance(target, NF4Linear) or _is_bnb_linear4bit(target):
            if config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to True but the target module is a 4-bit Linear. "
                              "Setting fan_in_fan_out to False.")
                config.fan_in_fan_out = False
            # a bitsandbytes Linear4bit becomes an NF4Linear holding the same bytes
            base = target if isinstance(target, NF4Linear) else NF4Linear.from_bnb(target)
            return Linear4bit(base, adapter_name, **kwargs)
        conv1d = _conv1d_class()
        if conv1d is not None and isinstance(target, conv1d):
            if not config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                              "Setting fan_in_fan_out to True.")
                config.fan_in_fan_out = True
            return Linear(target, adapter_name, fan_in_fan_out=True, **kwargs)
        if isinstance(target, nn.Linear):
            if config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                              "Setting fan_in_fan_out to False.")
                config.fan_in_fan_out = False
            return Linear(target, adapter_name, fan_in_fan_out=False, **kwargs)
        if isinstance(target, nn.Embedding):
            return Embedding(target, adapter_name, **kwargs)
        if isinstance(target, nn.MultiheadAttention):
            return MultiheadAttention(target, adapter_name, **kwargs)
        for conv, layer in ((nn.Conv1d, Conv1d), (nn.Conv2d, Conv2d), (nn.Conv3d, Conv3d)):
            if isinstance(target, conv):
                if target.groups > 1:
                    warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")
                return layer(target, adapter_name, **kwargs)
        raise ValueError(f"Target module {target} is not supported. Currently, only the following modules are "
                         "supported: `torch.nn.Linear`, `torch.nn.Embedding`, `torch.nn.Conv1d`, `torch.nn.Conv2d`, "
                         "`torch.nn.Conv3d`, `transformers.pytorch_utils.Conv1D`, `torch.nn.MultiheadAttention`, "
                         "`lora_ext.NF4Linear` (and bitsandbytes `Linear4bit`).")

    def _add_modules_to_save(self, config: LoraConfig, adapter_name: str) -> None:
        if not config.modules_to_save:
            return
        for key, module in list(self.model.named_modules()):
            if not key or self._inside_lora_layer(key):
                continue
            if not any(key == name or key.endswith(f".{name}") for name in config.modules_to_save):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
            else:
                parent_name, _, child_name = key.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                module = ModulesToSaveWrapper(module, adapter_name)
                setattr(parent, child_name, module)
            module.set_adapter(self.active_adapters)  # a new adapter's copy waits until it is active

    def _mark_only_adapters_as_trainable(self, layers: set[int] | None = None) -> None:
        """Freeze everything but adapters; the LoRA layers in `layers` (ids; None: all) make their
        active adapters trainable."""
        adapter_params = set()
        for _, layer in self.lora_layers():
            for container in layer._adapter_modules():
                for name, item in container.items():
                    params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                    adapter_params |= {id(p) for p in params}
        wrappers = [m for m in self.model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        wrapper_params = {id(p) for w in wrappers for p in w.adapter_parameters()}
        for p in self.model.parameters():
            if id(p) not in adapter_params and id(p) not in wrapper_params:
                p.requires_grad_(False)
        for _, layer in self.lora_layers():
            if layers is None or id(layer) in layers:
                layer.set_adapter(layer.active_adapters)
        for wrapper in wrappers:
            wrapper.set_adapter(wrapper.active_adapters)
        for adapter in self.active_adapters:
            bias = self.peft_config[adapter].bias
            if bias == "all":
                for name, p in self.model.named_parameters():
                    if name == "bias" or name.endswith(".bias"):
                        p.requires_grad_(True)
            elif bias == "lora_only":
                for _, layer in self.lora_layers():
                    if layer.bias is not None:
                        layer.bias.requires_grad_(True)

    # ---------------------------------------------------------------- adapter management

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate these adapters; they become trainable unless inference_mode (as PEFT)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found; existing adapters: {sorted(self.peft_config)}")
        for _, layer in self.lora_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
            layer.set_adapter(names)
        for layer in self._token_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.set_adapter(names[0]) if len(names) == 1 else module.set_adapter(names)
        self.active_adapter = names[0] if len(names) == 1 else names
        self._mark_only_adapters_as_trainable()
        if inference_mode:
            self.set_requires_grad(names, False)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch gradients of these adapters on or off in every layer (PEFT's set_requires_grad)."""
        for module in self.model.modules():
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                module.set_requires_grad(adapter_names, requires_grad)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True  # LoRA is LoRA; PEFT asks this of every tuner

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        for adapter in self.active_adapters:
            if self.peft_config[adapter].bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be "
                              f"'{self.peft_config[adapter].bias}' does not produce the same output as the base "
                              "model would without adaption.")
        self._set_adapter_layers(False)

    def _remove_adapter_everywhere(self, adapter_name: str, unwrap: bool = True) -> None:
        for module in self.model.modules():
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)) and (
                    adapter_name in module._get_available_adapters()):
                module.delete_adapter(adapter_name)
        if not unwrap:  # delete_adapter, as PEFT: emptied layers stay wrapped (same state_dict keys)
            return
        # (undoing a failed injection or load) layers that now hold no adapter go back to their base module;
        # inner layers first (MultiheadAttention's out_proj, nested ParamWrappers)
        for key, module in reversed(list(self.model.named_modules())):
            if isinstance(module, LoraLayer) and not module.r:
                self._replace(key, module.base_layer)
            elif isinstance(module, TrainableTokensWrapper) and not module._get_available_adapters():
                self._replace(key, module.unloaded_module())

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; existing adapters: {sorted(self.peft_config)}")
        if any(adapter_name in layer.merged_adapters for _, layer in self.lora_layers()):
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             "first.")
        was_active = adapter_name in self.active_adapters
        del self.peft_config[adapter_name]
        self._remove_adapter_everywhere(adapter_name, unwrap=False)
        if not was_active:  # the active adapters, and what is merged, stay as they are
            return
        remaining = [n for n in self.active_adapters if n != adapter_name] or list(self.peft_config)[:1]
        if remaining:
            self.active_adapter = remaining[0] if len(remaining) == 1 else remaining
            self.set_adapter(self.active_adapter)
        else:  # the last adapter is gone: none is active (as PEFT)
            self.active_adapter = []

    # ---------------------------------------------------------------- merging

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights (all or nothing when safe_merge fails). Without
        adapter_names each layer merges its own active adapters (as PEFT)."""
        self._check_merge_allowed()
        for name in adapter_names or ():
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found; existing adapters: {sorted(self.peft_config)}")
        layers = [layer for _, layer in self.lora_layers()]
        tokens = self._token_layers()
        chosen = {id(layer): list(adapter_names) if adapter_names is not None else list(layer.active_adapters)
                  for layer in layers + tokens}
        for layer in layers:  # before touching any layer: lora_bias over a bias-free base raises
            for name in chosen[id(layer)]:
                if name in layer.r and name not in layer.merged_adapters:
                    merged_bias = layer.merged_bias(name)
                    if safe_merge and not (torch.isfinite(layer.merged_weight(name)).all() and (
                            merged_bias is None or torch.isfinite(merged_bias).all())):
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be "
                                         "broken; the model was left unmerged")
        for layer in tokens if safe_merge else ():
            own = [n for n in chosen[id(layer)] if n in layer.token_indices and n not in layer.merged_adapters]
            if not torch.isfinite(layer.get_merged_weights(own)).all():
                raise ValueError("NaNs detected in the merged weights. The trainable tokens of one of the adapters "
                                 f"{own} are broken; the model was left unmerged")
        for layer in layers + tokens:
            layer.merge(safe_merge=False, adapter_names=chosen[id(layer)])

    def _token_layers(self) -> list:
        """The trainable-token layers (PEFT's TrainableTokensLayer: merged with the LoRA layers)."""
        return [m.token_adapter for m in self.model.modules() if isinstance(m, TrainableTokensWrapper)]

    def unmerge_adapter(self) -> None:
        merged = [layer for _, layer in self.lora_layers() if layer.merged]
        merged += [layer for layer in self._token_layers() if layer.merged]
        if not merged:
            warnings.warn("Already unmerged. Nothing to do.")  # PEFT warns so (once per layer)
        for layer in merged:
            layer.unmerge()

    def _check_merge_allowed(self) -> None:
        if getattr(self.model, "quantization_method", None) == "gptq":
            raise ValueError("Cannot merge LORA layers when the model is gptq quantized")
        for config in self.peft_config.values():
            if config.layer_replication:
                raise ValueError("Cannot merge LORA layers when base model layers are replicated")

    def _replace(self, key: str, new_module: nn.Module) -> None:
        parent_name, _, child_name = key.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child_name, new_module)

    def _unload_and_optionally_merge(self, merge: bool, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        # inner layers first: MultiheadAttention's out_proj, nested ParamWrappers
        for key, module in reversed(list(self.model.named_modules())):
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                if hasattr(base, "lora_ext_requantize") and merge:
                    base = base.lora_ext_requantize()
                self._replace(key, base)
            elif isinstance(module, AuxiliaryTrainingWrapper):
                # the active adapter's trained copy (e.g. a classifier head) stays, merged or not, as in PEFT
                self._replace(key, module.unloaded_module())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return self._unload_and_optionally_merge(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self._unload_and_optionally_merge(False)

    @contextmanager
    def _enable_peft_forward_hooks(self, adapter_names: list[str] | None, num_beams: int | None = None):
        """Route `adapter_names=` to every LoRA layer for one forward/generate call.

        The layers' adapter pools (lora_ext.serving) are brought up to date once here, not
        at every decoding step. With beam search each name is repeated num_beams times, as
        generate repeats the inputs (PEFT's rule).
        """
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        modules = _modules_outside_lora_layers(self.model)
        for layer in modules:
            if isinstance(layer, LoraLayer) and layer.merged:
                raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                                 "`unmerge_adapter` first.")
        if any(self.peft_config[name].use_dora for name in set(adapter_names) - {"__base__"}):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
        if isinstance(num_beams, int) and num_beams > 1:
            if not isinstance(adapter_names, (list, tuple)):
                raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        synced, handles = [], []

        def pre_hook(module, args, kwargs):
            kwargs["adapter_names"] = adapter_names
            return args, kwargs

        try:
            for layer in modules:
                if isinstance(layer, (Linear, Embedding)):
                    serving.layer_pool(layer, adapter_names)
                    layer._adapter_pool_synced = True
                    synced.append(layer)
            for module in modules:
                if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                    handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer in synced:
                layer._adapter_pool_synced = False
