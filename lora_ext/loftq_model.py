"""LoftQ for a model already quantised: PEFT's `replace_lora_weights_loftq(peft_model, model_path)`.

For each 4-bit LoRA layer of a model quantised with lora_ext.quantize_model, it reads the
full-precision weight W from the model's safetensors file(s) and sets lora_A, lora_B to the
rank-r SVD factors of W - dequant(Q) (lora_ext.loftq.low_rank_factors).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .layers.nf4 import Linear4bit
from .loftq import low_rank_factors


def _weight_reader(peft_model: nn.Module, model_path: Optional[str]) -> Callable[[str], Tensor]:
    from safetensors import safe_open

    if model_path is None:
        base = peft_model.get_base_model()
        model_path = getattr(getattr(base, "config", None), "_name_or_path", None) or None
        if model_path is None or not os.path.isdir(model_path):
            raise ValueError("replace_lora_weights_loftq: pass model_path, the folder or model.safetensors file "
                             "of the full-precision model (the base model names no local folder)")
    model_path = os.fspath(model_path)
    suffix = "model.safetensors"
    path = model_path if model_path.endswith(suffix) else os.path.join(model_path, suffix)
    if os.path.exists(path):
        weight_map = None
    else:
        index = os.path.join(os.path.dirname(path), "model.safetensors.index.json")
        if not os.path.exists(index):
            raise FileNotFoundError(f"replace_lora_weights_loftq: found neither {path} nor {index}; the "
                                    "full-precision model must be saved as (sharded) safetensors")
        with open(index) as handle:
            weight_map = {k: os.path.join(os.path.dirname(index), v)
                          for k, v in json.load(handle)["weight_map"].items()}
    prefix = getattr(peft_model.get_base_model(), "base_model_prefix", None)

    def read(name: str) -> Tensor:
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
        for key in candidates:
            file = path if weight_map is None else weight_map.get(key)
            if file is None:
                continue
            with safe_open(file, framework="pt", device="cpu") as handle:
                if key in handle.keys():
                    return handle.get_tensor(key)
        raise KeyError(f"replace_lora_weights_loftq: {name!r} is not in the safetensors file(s) at {model_path}")

    return read


@torch.no_grad()
def replace_lora_weights_loftq(peft_model: nn.Module, model_path: Optional[str] = None,
                               adapter_name: str = "default",
                               callback: Optional[Callable[[nn.Module, str], bool]] = None) -> None:
    """PEFT's replace_lora_weights_loftq for LoRA on lora_ext 4-bit layers.

    For each 4-bit LoRA layer: read W (name + ".weight") from the full-precision safetensors
    at model_path, set lora_A, lora_B to the rank-r SVD factors of W - dequant(Q). callback(model,
    module_name) -> bool, if given, runs after each layer; False rolls that layer back.
    """
    prefix = "base_model.model."
    layers = [(name, module) for name, module in peft_model.named_modules() if isinstance(module, Linear4bit)]
    if not layers:
        raise ValueError("replace_lora_weights_loftq: no 4-bit LoRA layer found (quantise the base with "
                         "lora_ext.quantize_model before get_peft_model)")
    read = _weight_reader(peft_model, model_path)
    for name, module in layers:
        if not name.startswith(prefix):
            raise TypeError("replace_lora_weights_loftq: the passed model does not appear to be a PeftModel "
                            f"(module {name!r} is not under {prefix!r})")
        if adapter_name not in module.lora_A:
            raise ValueError(f"replace_lora_weights_loftq: layer {name!r} has no adapter {adapter_name!r} "
                             f"(it has {sorted(module.lora_A)})")
        name = name[len(prefix):]
        weight = read(name + ".weight").to(device=module.base_layer.weight.device, dtype=torch.float32)
        if tuple(weight.shape) != (module.out_features, module.in_features):
            raise ValueError(f"replace_lora_weights_loftq: {name}.weight in the file has shape "
                             f"{tuple(weight.shape)}, the layer is [{module.out_features}, {module.in_features}]")
        lora_B, lora_A = low_rank_factors(weight - module.base_layer.dequantize(torch.float32),
                                          module.r[adapter_name])
        A, B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        before = (A.data, B.data)
        A.data, B.data = lora_A, lora_B
        if callback is not None and not callback(peft_model, name):
            A.data, B.data = before
