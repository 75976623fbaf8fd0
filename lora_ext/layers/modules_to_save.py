"""Fully trained copies of whole modules (PEFT's modules_to_save, e.g. a classifier head).

The original module is kept frozen; each adapter owns a trainable copy. Keys follow
PEFT: `<name>.original_module.*` and `<name>.modules_to_save.<adapter>.*` in the model,
`<name>.*` in a saved adapter.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class AuxiliaryTrainingWrapper(nn.Module):
    """A module trained next to the LoRA adapters, in place of a module of the base model
    (PEFT's name): modules_to_save copies, trainable tokens. Each subclass has
    set_adapter, set_requires_grad, enable_adapters, delete_adapter, unloaded_module,
    adapter_parameters and _get_available_adapters; LoraModel treats them all alike."""

    _active_adapter: list[str]
    _disable_adapters: bool = False

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def merged_adapters(self) -> list[str]:
        return []  # what a wrapper merges, its inner layer records


class ModulesToSaveWrapper(AuxiliaryTrainingWrapper):
    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    @property
    def weight(self):
        return self._current().weight

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Activate the one of these adapters that has a copy here (none: the original module)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        names = [name for name in names if name in self.modules_to_save]
        if len(names) > 1:  # copies replace the module, they do not add up: PEFT's error
            raise ValueError(f"Only one adapter can be set at a time for ModulesToSaveWrapper, got {names}: "
                             "their modules_to_save copies of this module would replace each other")
        for key, module in self.modules_to_save.items():
            module.requires_grad_(key in names)
        self._active_adapter = names

    def adapter_parameters(self):
        return list(self.modules_to_save.parameters())

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for key, module in self.modules_to_save.items():
            if key in names:
                module.requires_grad_(requires_grad)

    def _get_available_adapters(self) -> set[str]:
        return set(self.modules_to_save)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        if enabled:
            self.set_adapter(self._active_adapter)
        else:
            self.modules_to_save.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self._active_adapter = [n for n in self._active_adapter if n != adapter_name]

    def _current(self) -> nn.Module:
        if self._disable_adapters or not self._active_adapter or self._active_adapter[0] not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self._active_adapter[0]]

    def unloaded_module(self) -> nn.Module:
        """What stands in the model after unload/merge_and_unload: the active adapter's trained
        copy (whether adapters are enabled or not, as PEFT), else the original."""
        if self._active_adapter and self._active_adapter[0] in self.modules_to_save:
            return self.modules_to_save[self._active_adapter[0]]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None or self._disable_adapters:
            return self._current()(*args, **kwargs)
        x = args[0]
        if len(x) != len(adapter_names):
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {len(x)} respectively.")
        outputs = []
        for row, name in enumerate(adapter_names):
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            outputs.append(module(x[row:row + 1], *args[1:], **kwargs))
        return torch.cat(outputs, 0)
