"""LoraConfig.target_parameters: which nn.Parameters an adapter adapts, and wrapping them.

The matching is PEFT's, rule for rule, since it fixes the nesting of the wrappers and so the
saved keys: a target is a full parameter name or a suffix of one ("experts.down_proj" matches
"model.layers.0.feed_forward.experts.down_proj"); a module's parameters are visited in their
registration order, and its second targeted parameter wraps the wrapper of its first; a later
adapter joins the wrapper that already holds its parameter. Every adapter of a model that uses target_parameters
must target the same set (otherwise the nesting, hence the keys, would differ per adapter).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .layers import LoraLayer
from .layers.param_wrapper import ParamWrapper


def check_same_target_parameters(peft_config: dict, config) -> None:
    """Raise if `config` targets other parameters than an existing adapter that targets some."""
    targets = config.target_parameters
    if not targets:
        return
    for name, other in peft_config.items():
        if other is not config and other.target_parameters and set(other.target_parameters) != set(targets):
            raise ValueError("When using multiple adapters with `target_parameters`, all adapters must target the "
                             f"same set of parameters, but got {sorted(set(targets))} for the new adapter and "
                             f"{sorted(set(other.target_parameters))} for adapter '{name}'.")


def _without_base_layer(module_name: str) -> str:
    """`experts.base_layer.base_layer` -> `experts`: the name the user knows a wrapped module by."""
    while ".base_layer" in module_name:
        head, _, tail = module_name.rpartition(".base_layer")
        module_name = head + tail
    return module_name


def _wrapper_of(module: nn.Module, parameter_name: str) -> ParamWrapper | None:
    while isinstance(module, ParamWrapper):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def inject_parameters(model: nn.Module, config, adapter_name: str,
                      layer_kwargs: Callable[[str], dict]) -> list[str]:
    """Wrap (or extend the wrappers of) every parameter `config.target_parameters` selects.

    layer_kwargs(key) gives the adapter settings (r, alpha, ...) for the parameter `key`.
    Returns the targeted parameter names, in the order they were wrapped.
    """
    targets = sorted(set(config.target_parameters))
    found: list[str] = []

    def wrap(module_name: str, key: str, parameter_name: str) -> None:
        if module_name == "":
            # the wrapper would have to replace the model itself, inside itself
            raise ValueError(f"Targeting an nn.Parameter on the top-level module is not supported (parameter "
                             f"'{parameter_name}'). ")
        parent_name, _, child_name = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        target = getattr(parent, child_name)
        unwrapped_name = _without_base_layer(module_name)
        unwrapped = model.get_submodule(unwrapped_name)
        if isinstance(unwrapped, LoraLayer) and not isinstance(unwrapped, ParamWrapper):
            raise ValueError(f"Trying to wrap an `nn.Parameter` of layer '{unwrapped_name}' of type "
                             f"{type(target).__name__}, which is not a valid target. Make sure that this layer is not "
                             "also targeted with `target_modules`. For some models, PEFT will do this automatically, "
                             "try setting `target_modules=[]` to prevent it.")
        short_name = parameter_name.rpartition(".")[-1]
        target = _wrapper_of(unwrapped, short_name) or target
        kwargs = layer_kwargs(key)
        if isinstance(target, ParamWrapper) and adapter_name not in target.lora_A:
            target.update_layer(adapter_name, **kwargs)
            return
        if isinstance(target, ParamWrapper) and target.parameter_name == short_name:
            raise ValueError(f"Trying to target the same nn.Parameter {key!r} twice with adapter {adapter_name!r}")
        setattr(parent, child_name, ParamWrapper(target, adapter_name, parameter_name=short_name, **kwargs))

    for module_name, module in list(model.named_modules()):
        if hasattr(module, "parametrizations"):
            # already parametrized (by the user): its parameters are named parametrizations.<name>.original
            for key in targets:
                owner_name, _, parameter_name = key.rpartition(".")
                if owner_name == module_name and getattr(module, parameter_name, None) is not None:
                    wrap(module_name, key, parameter_name)
                    found.append(key)
            continue
        unwrapped_name = _without_base_layer(module_name)
        for parameter_name, _ in list(module.named_parameters(recurse=False)):
            key = f"{unwrapped_name}.{parameter_name}"
            if key in targets or any(key.endswith(f".{target}") for target in targets):
                wrap(module_name, key, parameter_name)
                found.append(key)
    return found
