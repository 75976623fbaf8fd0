"""The modules LoRA targets when a config names none, per transformers model type (as PEFT).

With `target_modules=None` (and no `target_parameters`), PEFT picks the attention projections
it knows for the model's `config.model_type` (e.g. q_proj and v_proj for Llama) and refuses a
model type it does not know. lora-ext does the same, with the same table, so a config that
works in PEFT without target_modules works here and targets the same modules.
"""
from __future__ import annotations

from typing import Any, Union

from torch import nn

_QV = ("q_proj", "v_proj")
_BERT = ("query", "value")
_FUSED_QKV = ("query_key_value",)

# model_type -> module-name suffixes (a tuple: matched as a set) or one regex (a str).
DEFAULT_TARGET_MODULES: dict[str, Union[tuple[str, ...], str]] = {
    "t5": ("q", "v"), "mt5": ("q", "v"),
    "bart": _QV, "opt": _QV, "gptj": _QV, "gpt_neo": _QV, "llama": _QV, "llama4": _QV,
    "mistral": _QV, "mixtral": _QV, "stablelm": _QV, "gemma": _QV, "gemma2": _QV,
    "gemma3_text": _QV, "qwen2": _QV, "qwen3": _QV,
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "gpt2": ("c_attn",), "gpt_bigcode": ("c_attn",), "btlm": ("c_proj", "c_attn"),
    "bloom": _FUSED_QKV, "gpt_neox": _FUSED_QKV, "chatglm": _FUSED_QKV, "RefinedWebModel": _FUSED_QKV,
    "RefinedWeb": _FUSED_QKV, "falcon": _FUSED_QKV,
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT, "layoutlm": _BERT,
    "deberta-v2": ("query_proj", "value_proj"), "deberta": ("in_proj",),
    "mpt": ("Wqkv",), "codegen": ("qkv_proj",),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}


def model_type(model: nn.Module) -> Any:
    """config.model_type of a transformers model; "custom" for any other module (as PEFT)."""
    config = getattr(model, "config", None)
    if config is None:
        return "custom"
    as_dict = config.to_dict() if hasattr(config, "to_dict") else config
    return as_dict.get("model_type", "custom") if isinstance(as_dict, dict) else "custom"


def _converts_checkpoints(kind: Any) -> bool:
    """Whether transformers converts this model type's v4 checkpoints (Mixtral's experts, ...)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return False
    return get_checkpoint_conversion_mapping(kind) is not None


def resolve_default_targets(config, model: nn.Module) -> None:
    """Fill config.target_modules from the model type when it is None, or raise as PEFT does."""
    if config.target_modules is not None:
        return
    if getattr(config, "target_parameters", None) and _converts_checkpoints(model_type(model)):
        # PEFT rewrites such configs for transformers 5 first, which leaves target_modules empty
        config.target_modules = set()
        return
    defaults = DEFAULT_TARGET_MODULES.get(model_type(model))
    if defaults is not None:
        config.target_modules = defaults if isinstance(defaults, str) else set(defaults)
    elif not getattr(config, "target_parameters", None):
        raise ValueError(f"Please specify `target_modules` or `target_parameters` in `peft_config`: lora-ext "
                         f"has no default target modules for model type {model_type(model)!r}.")
