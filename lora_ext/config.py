"""LoraConfig: PEFT's field names, types and defaults, and its adapter_config.json.

A config written by PEFT 0.21 loads here and the reverse; the JSON we write holds every
field PEFT writes, so the two files compare equal. PEFT features that lora-ext does not
implement are accepted only at their default values: any other value is an error that
names the field, rather than an adapter that silently computes something else.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

CONFIG_NAME = "adapter_config.json"
# The PEFT release whose adapter format we read and write (PEFT records it in every config).
PEFT_FORMAT_VERSION = "0.21.2"


class TaskType(str, enum.Enum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    LORA = "LORA"


# PEFT LoraConfig fields whose features lora-ext does not implement, with PEFT's default.
# A config may carry them (PEFT writes them all) but only at these values.
UNSUPPORTED_FIELD_DEFAULTS: dict[str, Any] = {
    "megatron_config": None,
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
# Fields PEFT writes that carry no behaviour of their own here (kept to write them back).
PASSIVE_FIELD_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None,
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,
}
# Runtime-only PEFT fields: never saved, accepted and ignored.
RUNTIME_FIELDS = ("runtime_config",)

_INIT_CHOICES = "True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' or 'loftq'"
_PEFT_ONLY_INITS = ("eva", "corda", "orthogonal", "lora_ga", "kasa", "mica")  # PEFT has them, lora-ext has not


def _is_default_like(value: Any, default: Any) -> bool:
    if value == default:
        return True
    return value in (None, False, {}, []) and default in (None, False, {}, [])


@dataclass
class LoraConfig:
    """Configuration of a LoRA adapter, field for field PEFT's LoraConfig."""

    task_type: Optional[Union[str, TaskType]] = None
    peft_type: Optional[Union[str, PeftType]] = PeftType.LORA
    peft_version: Optional[str] = PEFT_FORMAT_VERSION
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    loftq_config: dict = field(default_factory=dict)
    use_dora: bool = False
    layer_replication: Optional[list[tuple[int, int]]] = None
    # nn.Parameters adapted directly (e.g. stacked MoE expert weights): names or name suffixes
    target_parameters: Optional[list[str]] = None
    lora_bias: bool = False
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    # PEFT fields kept verbatim (see PASSIVE_FIELD_DEFAULTS / UNSUPPORTED_FIELD_DEFAULTS)
    extra_fields: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if isinstance(self.peft_type, str):
            if self.peft_type.upper() != "LORA":
                raise ValueError(f"peft_type must be 'LORA' for a LoraConfig, got {self.peft_type!r}")
            self.peft_type = PeftType.LORA
        if isinstance(self.task_type, str):
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ValueError(f"task_type {self.task_type!r} is not supported; expected one of "
                                 f"{', '.join(t.value for t in TaskType)} or None") from None
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise TypeError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not math.isfinite(self.lora_alpha):
            raise ValueError(f"lora_alpha must be finite (scaling = lora_alpha / r), got {self.lora_alpha!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list, tuple, set)):
            raise TypeError("target_modules must be a list of module-name suffixes, a regex string or "
                            f"'all-linear', got {type(self.target_modules).__name__}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be a float in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        if self.target_parameters is not None:
            self.target_parameters = list(self.target_parameters)
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        self._check_init()
        for name, value in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if value is None:
                setattr(self, name, {})
            elif not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict of module-name pattern -> number, got {value!r}")
        if self.rank_pattern and any(not isinstance(v, int) or v <= 0 for v in self.rank_pattern.values()):
            raise ValueError(f"rank_pattern values must be positive ints, got {self.rank_pattern}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
               for v in self.alpha_pattern.values()):
            raise ValueError(f"alpha_pattern values must be finite numbers, got {self.alpha_pattern}")
        if self.layer_replication is not None:
            self.layer_replication = [tuple(span) for span in self.layer_replication]
            for span in self.layer_replication:
                if len(span) != 2 or not all(isinstance(v, int) for v in span) or span[0] >= span[1]:
                    raise ValueError("layer_replication must be a list of [start, end) pairs of ints "
                                     f"with start < end, got {self.layer_replication}")
        self._check_lora_bias_and_tokens()
        for name, value in self.extra_fields.items():
            self._check_extra_field(name, value)

    def _check_lora_bias_and_tokens(self) -> None:
        if self.lora_bias:  # PEFT's rules and words
            if self.init_lora_weights not in (True, False):
                raise ValueError("The argument lora_bias=True is only supported with init_lora_weights=True or "
                                 f"False, got init_lora_weights={self.init_lora_weights} instead.")
            if self.use_dora:
                raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        indices = self.trainable_token_indices
        if indices is None:
            return
        per_layer = indices if isinstance(indices, dict) else {"": indices}
        for layer, values in per_layer.items():
            if not isinstance(layer, str) or not isinstance(values, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values):
                raise ValueError("trainable_token_indices must be a list of token ids (ints >= 0) or a dict of "
                                 f"embedding-module name -> such a list, got {indices!r}")

    def _check_init(self) -> None:
        init = self.init_lora_weights
        valid = init in (True, False) or init in ("gaussian", "pissa", "olora", "loftq") or (
            isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init))
        if not valid:
            # PEFT's own initialisations that lora-ext lacks are refused by name; others get PEFT's sentence
            if isinstance(init, str) and init.split("_niter_")[0] in _PEFT_ONLY_INITS:
                raise ValueError(f"init_lora_weights={init!r} is not supported by lora-ext; expected {_INIT_CHOICES}")
            raise ValueError(f"Unknown initialization init_lora_weights={init!r}; expected {_INIT_CHOICES}")
        if init == "loftq":
            if not self.loftq_config:
                raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
            if not isinstance(self.loftq_config, dict):
                self.loftq_config = dict(vars(self.loftq_config))
        elif self.loftq_config:
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.")
            self.loftq_config = {}

    @staticmethod
    def _check_extra_field(name: str, value: Any) -> None:
        if name in UNSUPPORTED_FIELD_DEFAULTS:
            default = UNSUPPORTED_FIELD_DEFAULTS[name]
            if not _is_default_like(value, default):
                raise ValueError(f"LoraConfig field {name!r}={value!r} selects a PEFT feature that lora-ext "
                                 f"does not support; it must be left at its default ({default!r})")
        elif name not in PASSIVE_FIELD_DEFAULTS and not _is_default_like(value, None):
            raise ValueError(f"unknown LoraConfig field {name!r}={value!r}: lora-ext does not know this "
                             "PEFT feature, so it cannot honour a non-default value")

    # ---------------------------------------------------------------- PEFT-like helpers

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def to_dict(self) -> dict:
        """Every field PEFT 0.21 writes, with JSON-ready values (sets become sorted lists)."""
        out: dict[str, Any] = {**PASSIVE_FIELD_DEFAULTS, **UNSUPPORTED_FIELD_DEFAULTS}
        for f in dataclasses.fields(self):
            if f.name != "extra_fields":
                out[f.name] = getattr(self, f.name)
        out.update(self.extra_fields)
        for key, value in list(out.items()):
            if isinstance(value, set):
                out[key] = sorted(value)
            elif isinstance(value, enum.Enum):
                out[key] = value.value
        if out["layer_replication"] is not None:
            out["layer_replication"] = [list(span) for span in out["layer_replication"]]
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, values: dict) -> "LoraConfig":
        if not isinstance(values, dict):
            raise TypeError(f"a LoRA config must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra_fields"}
        kwargs = {k: v for k, v in values.items() if k in known}
        extra = {k: v for k, v in values.items() if k not in known and k not in RUNTIME_FIELDS}
        return cls(**kwargs, extra_fields=extra)

    def save_pretrained(self, save_directory: str | os.PathLike, auto_mapping_dict: dict | None = None) -> None:
        """Write adapter_config.json; auto_mapping_dict (PEFT's argument) names the base model
        class for AutoPeftModel when the config has no task_type."""
        path = Path(save_directory)
        if path.is_file():
            raise ValueError(f"save_directory {str(path)!r} is a file, expected a directory")
        path.mkdir(parents=True, exist_ok=True)
        from .serialization import atomic_write_bytes
        values = self.to_dict()
        if auto_mapping_dict is not None:
            values["auto_mapping"] = auto_mapping_dict
        text = json.dumps(values, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(path / CONFIG_NAME, text.encode())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **overrides) -> "LoraConfig":
        directory = Path(path) / subfolder if subfolder else Path(path)
        file = directory / CONFIG_NAME if directory.is_dir() else directory
        if not file.is_file():
            raise ValueError(f"Can't find '{CONFIG_NAME}' at '{str(directory)}'")  # PEFT's words
        try:
            values = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{str(file)!r} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{str(file)!r} must hold a JSON object, got {type(values).__name__}")
        peft_type = values.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{str(file)!r} holds a {peft_type} adapter; lora-ext loads only LORA adapters")
        values.update(overrides)
        try:
            return cls.from_dict(values)
        except TypeError as error:
            raise ValueError(f"{str(file)!r}: {error}") from None
