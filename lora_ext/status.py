"""PeftModel.get_layer_status / get_model_status: PEFT's report of every adapter layer
and of the model as a whole (same dataclasses, same fields, same "irregular" rule)."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .layers import LoraLayer, ModulesToSaveWrapper, TrainableTokensLayer


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Literal["irregular"]
    active_adapters: list[str] | Literal["irregular"]
    merged_adapters: list[str] | Literal["irregular"]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Literal["irregular"]


def _agree(values) -> bool | Literal["irregular"]:
    """True or False when all values say so, else "irregular" (PEFT's word)."""
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _parameters_by_adapter(module: nn.Module, attrs) -> dict[str, list]:
    found = collections.defaultdict(list)
    for attr in attrs:
        container = getattr(module, attr)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            for key, item in container.items():
                found[key].extend([item] if isinstance(item, nn.Parameter) else item.parameters())
    return found


def get_layer_status(peft_model: nn.Module) -> list[TunerLayerStatus]:
    statuses = []
    for name, module in peft_model.base_model.named_modules():
        if not isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensLayer)):
            continue
        params = _parameters_by_adapter(module, module.adapter_layer_names)
        devices = _parameters_by_adapter(module, module.adapter_layer_names + module.other_param_names)
        statuses.append(TunerLayerStatus(
            name=name, module_type=repr(module).partition("(")[0], enabled=not module.disable_adapters,
            active_adapters=module.active_adapters, merged_adapters=list(module.merged_adapters),
            requires_grad={key: _agree(p.requires_grad for p in ps) for key, ps in params.items()},
            available_adapters=sorted(module._get_available_adapters()),
            devices={key: sorted({p.device.type for p in ps}) for key, ps in devices.items()},
            quantization_backend=None))
    if not statuses:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
                         "PEFT adapters injected in the model.")
    return statuses


def get_model_status(peft_model: nn.Module) -> TunerModelStatus:
    layers = get_layer_status(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    active = {tuple(s.active_adapters) for s in layers}
    merged_anywhere = set().union(*(s.merged_adapters for s in layers))
    # an adapter merged in one layer but present and unmerged in another is irregular
    merged_irregular = any((set(s.available_adapters) - set(s.merged_adapters)) & merged_anywhere for s in layers)
    requires_grad, devices = collections.defaultdict(list), collections.defaultdict(set)
    for status in layers:
        for key, value in status.requires_grad.items():
            requires_grad[key].append(value)
        for key, value in status.devices.items():
            devices[key] |= set(value)
    enabled = {s.enabled for s in layers}
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=type(peft_model.get_base_model()).__name__,
        adapter_model_type=type(peft_model.base_model).__name__,
        peft_types={key: str(config.peft_type.value) for key, config in peft_model.peft_config.items()},
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=[] if not active else list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters="irregular" if merged_irregular else sorted(merged_anywhere),
        requires_grad={key: _agree(values) for key, values in requires_grad.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={key: sorted(value) for key, value in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular")
