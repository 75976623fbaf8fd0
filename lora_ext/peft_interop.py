"""PEFT's own utilities on lora-ext models.

PEFT's functions that walk a model (peft.utils.get_peft_model_state_dict and
set_peft_model_state_dict, get_layer_status, set_requires_grad, ...) find the adapter
layers with `isinstance(module, BaseTunerLayer)`. BaseTunerLayer is an abstract base
class, so lora-ext's LoraLayer, which has the same attributes and methods, is registered
as one of its virtual subclasses: then those functions see our layers as PEFT's.

peft takes seconds to import and lora-ext does not need it, so the registration happens
when peft's module is imported: at once if it already is, otherwise through a finder on
sys.meta_path that runs it right after that one module has loaded.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from .layers import LoraLayer

_TUNERS_UTILS = "peft.tuners.tuners_utils"


def _register(module) -> None:
    module.BaseTunerLayer.register(LoraLayer)


class _LoaderThenRegister(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register(module)


class _PeftImportWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of peft.tuners.tuners_utils, once."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TUNERS_UTILS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThenRegister(spec.loader)
        return spec


def register_layers_with_peft() -> None:
    """Make PEFT's isinstance(module, BaseTunerLayer) true for lora-ext's LoRA layers,
    now or as soon as peft is imported."""
    if _TUNERS_UTILS in sys.modules:
        _register(sys.modules[_TUNERS_UTILS])
    elif not any(isinstance(finder, _PeftImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportWatcher())
