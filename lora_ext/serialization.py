"""adapter_model.safetensors in PEFT's format: key mapping, strict checks, atomic files.

Saved keys are the model's state_dict keys with the adapter name removed
(`...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`), DoRA magnitudes as
`...lora_magnitude_vector`, modules_to_save copies as `<module>.<param>`. Also the
conversion of a trained PiSSA/OLoRA adapter into a plain LoRA adapter on save. This module
knows nothing of kernels: it maps names and moves tensors.
"""
from __future__ import annotations

import copy
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .layers import LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=metadata or {"format": "pt"}))


def adapter_key_map(peft_model: nn.Module, adapter_name: str) -> dict[str, str]:
    """saved key -> model state_dict key, for every tensor of one adapter."""
    lora_model = peft_model.base_model
    config = lora_model.peft_config[adapter_name]
    prefix = "base_model.model."
    mapping: dict[str, str] = {}
    for module_name, module in lora_model.model.named_modules():
        path = prefix + module_name + "." if module_name else prefix
        if isinstance(module, LoraLayer):
            for attr in module.adapter_layer_names:
                container = getattr(module, attr)
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    mapping[f"{path}{attr}"] = f"{path}{attr}.{adapter_name}"
                elif attr == "lora_magnitude_vector":
                    mapping[f"{path}{attr}"] = f"{path}{attr}.{adapter_name}.weight"
                else:
                    for pname, _ in item.named_parameters():
                        mapping[f"{path}{attr}.{pname}"] = f"{path}{attr}.{adapter_name}.{pname}"
            if config.bias == "lora_only" and module.bias is not None:
                mapping[f"{path}base_layer.bias"] = f"{path}base_layer.bias"
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for pname, _ in module.modules_to_save[adapter_name].named_parameters():
                mapping[f"{path}{pname}"] = f"{path}modules_to_save.{adapter_name}.{pname}"
        elif isinstance(module, TrainableTokensWrapper):
            mapping.update({path + saved: path + key for saved, key in module.saved_keys(adapter_name).items()})
    if config.bias == "all":
        for name, _ in lora_model.model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                mapping.setdefault(prefix + name, prefix + name)
    for saved, model_key in _embedding_base_keys(peft_model, config):
        mapping.setdefault(saved, model_key)
    return mapping


def _embedding_is_targeted(config, model: nn.Module) -> bool:
    targets = config.target_modules
    if isinstance(targets, str):
        if targets == "all-linear":
            return False
        return any(re.fullmatch(targets, name) for name, _ in model.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES))
    return bool(targets) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _vocab_was_resized(model: nn.Module, config) -> bool:
    """PEFT's other reason to save embeddings: the vocabulary differs from the base model's
    (checked, as PEFT, against base_model_name_or_path; here only a local folder)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    source = config.base_model_name_or_path
    if not vocab or not source or not os.path.isfile(os.path.join(source, "config.json")):
        return False
    try:
        import json
        with open(os.path.join(source, "config.json")) as handle:
            return json.load(handle).get("vocab_size", vocab) != vocab
    except (OSError, ValueError):
        return False


def _embedding_base_keys(peft_model: nn.Module, config):
    """PEFT also saves the base weights of input/output embeddings (save_embedding_layers="auto"):
    those of LoRA-wrapped embeddings when embed_tokens/lm_head are targeted, and both
    embeddings when the vocabulary was resized."""
    model = peft_model.base_model.model
    # trainable tokens exist to save only a few rows: targeted embeddings are not saved then
    targeted = _embedding_is_targeted(config, model) and config.trainable_token_indices is None
    if not targeted and not _vocab_was_resized(model, config):
        return []
    keys = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        layer = fn() if callable(fn) else None
        if layer is None or (targeted and not isinstance(layer, LoraLayer)):
            continue
        for name, module in model.named_modules():
            if module is layer:
                for pname, _ in module.named_parameters():
                    if "lora_" not in pname:
                        full = f"base_model.model.{name}.{pname}"
                        keys.append((full, full))
                break
    return keys


def get_peft_model_state_dict(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    state = peft_model.state_dict()
    return {saved: state[model_key] for saved, model_key in adapter_key_map(peft_model, adapter_name).items()}


def load_adapter_file(directory: Path) -> dict[str, torch.Tensor]:
    """Read adapter_model.safetensors (or, safely, adapter_model.bin) with clear errors."""
    st_path, bin_path = directory / SAFETENSORS_WEIGHTS_NAME, directory / WEIGHTS_NAME
    if st_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(st_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ValueError(f"{str(st_path)!r} is not a valid safetensors file (truncated or corrupted?): "
                             f"{error}") from None
    if bin_path.is_file():
        try:  # weights_only: a pickle can never run code here
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{str(bin_path)!r} could not be loaded safely (weights only): {error}") from None
    raise ValueError(f"{str(directory)!r} is not a LoRA adapter: it has neither {SAFETENSORS_WEIGHTS_NAME} "
                     f"nor {WEIGHTS_NAME}")


def set_peft_model_state_dict(peft_model: nn.Module, saved: dict[str, torch.Tensor], adapter_name: str = "default",
                              strict: bool = True):
    """Copy a saved adapter into the model. Everything is checked before anything is written.

    Returns, as PEFT, torch's load result: `missing_keys` (model keys of this adapter that
    the file lacks) and `unexpected_keys` (file keys the model lacks). With strict (the
    default) either one raises ValueError instead and nothing is written.
    """
    mapping = adapter_key_map(peft_model, adapter_name)
    state = peft_model.state_dict(keep_vars=True)
    missing = sorted(k for k in mapping if k not in saved)
    unexpected = sorted(k for k in saved if k not in mapping and k not in state)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        raise ValueError(f"adapter {adapter_name!r} does not match the model: " + "; ".join(parts))
    targets = []
    for key, tensor in saved.items():
        model_key = mapping.get(key, key if key in state else None)
        if model_key is None:
            continue
        param = state[model_key]
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(f"adapter {adapter_name!r}: {key!r} has shape {tuple(tensor.shape)} in the file but "
                             f"the model expects {tuple(param.shape)} (was it trained with another r or base?)")
        if not tensor.is_floating_point() and param.is_floating_point():
            raise ValueError(f"adapter {adapter_name!r}: {key!r} has dtype {tensor.dtype}, expected a float tensor")
        targets.append((param, tensor))
    with torch.no_grad():
        for param, tensor in targets:
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
    return _IncompatibleKeys(missing_keys=[mapping[k] for k in missing], unexpected_keys=unexpected)


# ---------------------------------------------------------------- PiSSA / OLoRA -> plain LoRA

_CONVERTIBLE_INITS = ("pissa", "olora", "true")


def convert_to_lora_state_dict(peft_model, adapter_name: str, state: dict[str, torch.Tensor], config,
                               path_initial_model_for_weight_conversion) -> tuple[dict[str, torch.Tensor], object]:
    """Turn a trained PiSSA/OLoRA adapter into a plain LoRA adapter for the ORIGINAL base.

    PiSSA/OLoRA replaced W by W_res = W - s·B₀A₀, so the trained model computes
    W_res + s·BA = W + s·(BA - B₀A₀). With A' = cat[A, A₀] (rows) and B' = cat[B, -B₀]
    (columns), B'A' = BA - B₀A₀: a rank-2r LoRA adapter on W itself. Its config has
    r' = 2r and alpha' = 2·alpha (alpha·√2 with rsLoRA) so the scaling is unchanged, and
    init_lora_weights=True (loading it must not rewrite the base again); rank_pattern and
    alpha_pattern are doubled. This is PEFT's documented `path_initial_model_for_weight_conversion`
    path, and the numbers equal PEFT's. Like PEFT, the initial folder's config is rewritten
    with init_lora_weights=True.

    Where PEFT drops keys, we keep them: embedding adapters are converted the same way
    (PEFT leaves them out, losing their training), and modules_to_save / bias tensors are
    kept as they are (they never depended on the rewritten base weight).

    `state` is the adapter's saved state (PEFT key names); `path_...` is the folder saved
    right after initialisation, before training. Returns (state, config) to write.
    """
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.")
    if config.use_dora:
        raise ValueError("path_initial_model_for_weight_conversion: a DoRA adapter cannot be converted to a plain "
                         "LoRA adapter (its magnitude vector rescales the whole weight)")
    if not any(str(config.init_lora_weights).lower().startswith(p) for p in _CONVERTIBLE_INITS):
        warnings.warn("`path_initial_model_for_weight_conversion` only works for converting a PiSSA/OLoRA adapter "
                      f"to a LoRA adapter; adapter {adapter_name!r} has init_lora_weights="
                      f"{config.init_lora_weights!r}", stacklevel=3)
    initial_path = Path(path_initial_model_for_weight_conversion)
    initial_config = copy.deepcopy(config)
    initial_config.init_lora_weights = True
    initial = load_adapter_file(initial_path)  # before writing anything: a wrong folder fails cleanly
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        dim = 0 if ("lora_A" in key or "lora_embedding_A" in key) else (
            1 if ("lora_B" in key or "lora_embedding_B" in key) else None)
        if dim is None:
            converted[key] = value
            continue
        if key not in initial:
            raise ValueError(f"path_initial_model_for_weight_conversion: {str(initial_path)!r} has no {key!r}; "
                             "expected the adapter saved right after initialisation, before training")
        start = initial[key].to(value.dtype)
        if start.shape != value.shape:
            raise ValueError(f"path_initial_model_for_weight_conversion: {key!r} has shape "
                             f"{tuple(start.shape)} in {str(initial_path)!r} but {tuple(value.shape)} now")
        converted[key] = torch.cat([value, start if dim == 0 else -start], dim=dim)
    initial_config.save_pretrained(initial_path)
    new_config = copy.deepcopy(config)
    new_config.init_lora_weights = True
    new_config.r *= 2
    new_config.lora_alpha *= 2 ** 0.5 if config.use_rslora else 2
    new_config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    new_config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return converted, new_config
