"""PeftModel and friends: PEFT's user-facing API on top of LoraModel.

    model = get_peft_model(base, LoraConfig(...))          # adapter "default"
    model.save_pretrained(path)                             # PEFT reads it as is
    model = PeftModel.from_pretrained(base, path)           # PEFT-written folders too
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub, status
from .config import LoraConfig, TaskType
from .layers import LoraLayer
from .model import LoraModel, check_adapter_name
from .serialization import (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, atomic_save_safetensors, atomic_write_bytes,
                            convert_to_lora_state_dict, get_peft_model_state_dict, load_adapter_file,
                            set_peft_model_state_dict)
from .weighted import add_weighted_adapter as _add_weighted_adapter

# heads that PEFT trains in full (modules_to_save) for classification tasks
_CLASSIFIER_MODULES = {TaskType.SEQ_CLS: ["classifier", "score"], TaskType.TOKEN_CLS: ["classifier", "score"],
                       TaskType.QUESTION_ANS: ["qa_outputs"]}


class PeftModel(nn.Module):
    """A base model with LoRA adapters; `base_model` is the LoraModel (keys as PEFT's)."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self._prepare_config(peft_config, model)
        self.peft_type = peft_config.peft_type
        # what PEFT's own functions (peft.utils.get_peft_model_state_dict, ...) and transformers read
        self._is_prompt_learning = False
        self.special_peft_forward_args = {"adapter_names"}
        self._adapters_disabled = False
        self.base_model = LoraModel(model, peft_config, adapter_name)
        if autocast_adapter_dtype:
            self._cast_adapter_dtype(adapter_name)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing:
            self.prepare_model_for_gradient_checkpointing(model)
        if hasattr(getattr(model, "config", None), "pretraining_tp"):
            model.config.pretraining_tp = 1  # as PEFT: the simulated tensor-parallel split changes the numbers

    def _prepare_config(self, config: LoraConfig, model: nn.Module) -> None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"peft_config must be a lora_ext.LoraConfig, got {type(config).__name__}")
        extra = _CLASSIFIER_MODULES.get(config.task_type)
        if extra:
            config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *extra]))

    def _cast_adapter_dtype(self, adapter_name: str) -> None:
        """Half-precision adapters are kept in fp32, as PEFT's autocast_adapter_dtype does."""
        for _, layer in self.base_model.lora_layers():
            for container in layer._adapter_modules():
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                for param in params:
                    if param.dtype in (torch.float16, torch.bfloat16):
                        param.data = param.data.float()
        for layer in self.base_model._token_layers():  # trainable tokens: their rows and originals too
            for table in (layer.trainable_tokens_delta, layer.trainable_tokens_original):
                if adapter_name in table and table[adapter_name].dtype in (torch.float16, torch.bfloat16):
                    if isinstance(table[adapter_name], nn.Parameter):
                        table[adapter_name].data = table[adapter_name].data.float()
                    else:
                        table[adapter_name] = table[adapter_name].float()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---------------------------------------------------------------- introspection

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False inside disable_adapter() (PEFT's rule: also True when no adapter is active)."""
        return not self._adapters_disabled or not self.active_adapters

    @property
    def modules_to_save(self) -> set[str] | None:
        """Every module name trained in full by some adapter, None if there is none (as PEFT)."""
        names = {name for config in self.peft_config.values() for name in (config.modules_to_save or [])}
        return names or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.base_model, "dtype", None)

    def get_layer_status(self) -> list[status.TunerLayerStatus]:
        """One status per LoRA layer and modules_to_save wrapper (PEFT's fields)."""
        return status.get_layer_status(self)

    def get_model_status(self) -> status.TunerModelStatus:
        """The model's adapters summed up; "irregular" where layers disagree (PEFT's fields)."""
        return status.get_model_status(self)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return self.base_model.supports_lora_conversion(adapter_name)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Checkpointed blocks need an input that requires grad; the base model's inputs get one."""
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.requires_grad_(True))
        return model

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        from .nf4 import NF4Linear
        trainable = total = 0
        packed = {id(m.weight) for m in self.modules() if isinstance(m, NF4Linear)}
        for param in self.parameters():
            count = param.numel()
            if param.__class__.__name__ == "Params4bit" or id(param) in packed:  # two weights per byte
                count *= 2 * getattr(param, "element_size", lambda: 1)()
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ---------------------------------------------------------------- running

    def forward(self, *args: Any, **kwargs: Any):
        with self.base_model._enable_peft_forward_hooks(kwargs.pop("adapter_names", None)):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        with self.base_model._enable_peft_forward_hooks(kwargs.pop("adapter_names", None),
                                                        num_beams=kwargs.get("num_beams")):
            return self.get_base_model().generate(*args, **kwargs)

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged adapters are unmerged first).

        Leaving the block restores the layers' state: all disabled stay disabled; enabled, or a
        mix (which warns, as PEFT), become enabled."""
        enabled = {not layer.disable_adapters for _, layer in self.base_model.lora_layers()}
        if len(enabled) > 1:
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional: on leaving the disable_adapter block every adapter "
                          "layer will be enabled.", UserWarning, stacklevel=3)
        self.base_model.disable_adapter_layers()
        was_disabled, self._adapters_disabled = self._adapters_disabled, True
        try:
            yield
        finally:
            if enabled != {False}:
                self.base_model.enable_adapter_layers()
            self._adapters_disabled = was_disabled

    # ---------------------------------------------------------------- adapters

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        self._prepare_config(peft_config, self.get_base_model())
        self.base_model.inject_adapter(peft_config, adapter_name)
        if autocast_adapter_dtype:
            self._cast_adapter_dtype(adapter_name)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Activate this adapter; it becomes trainable unless inference_mode (as PEFT)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found.")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch gradients of the given adapters on or off (PEFT's set_requires_grad)."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None, svd_clamp=None,
                             svd_full_matrices: bool = True, svd_driver: str | None = None, **kwargs) -> None:
        if kwargs.get("density") is not None:
            raise ValueError("density-based combinations (ties, dare, magnitude_prune) are not supported by lora-ext")
        _add_weighted_adapter(self.base_model, adapters, weights, adapter_name, combination_type, svd_rank,
                              svd_clamp, svd_full_matrices, svd_driver)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # ---------------------------------------------------------------- saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | None = None, **kwargs: Any) -> None:
        """adapter_config.json + adapter_model.safetensors per adapter; non-default ones in subfolders.

        path_initial_model_for_weight_conversion (PEFT's argument; `convert_pissa_to_lora` in
        older PEFT): the folder saved right after a PiSSA/OLoRA initialisation. The adapter is
        then written as a plain rank-2r LoRA adapter for the original, unmodified base model
        (see serialization.convert_to_lora_state_dict).
        """
        legacy = kwargs.pop("convert_pissa_to_lora", None)
        if legacy is not None:
            warnings.warn("`convert_pissa_to_lora` is deprecated (as in PEFT); use "
                          "`path_initial_model_for_weight_conversion` instead.", FutureWarning, stacklevel=2)
            path_initial_model_for_weight_conversion = path_initial_model_for_weight_conversion or legacy
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"Provided path ({str(directory)}) should be a directory, not a file")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"You passed an invalid `selected_adapters` arguments, current supported adapter names "
                             f"are {list(self.peft_config)} - got {unknown}.")
        if not is_main_process:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if hub.available():  # the card is Hub metadata: no huggingface_hub, no card
            self.create_or_update_model_card(directory)
        for name in names:
            config = self.peft_config[name]
            output = directory if name == "default" else directory / name
            output.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self, name).items()}
            if path_initial_model_for_weight_conversion is not None:
                state, config = convert_to_lora_state_dict(self, name, state, config,
                                                           path_initial_model_for_weight_conversion)
            if safe_serialization:
                atomic_save_safetensors(state, output / SAFETENSORS_WEIGHTS_NAME)
            else:
                import io
                buffer = io.BytesIO()
                torch.save(state, buffer)
                atomic_write_bytes(output / WEIGHTS_NAME, buffer.getvalue())
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = self.get_base_model().__dict__.get("name_or_path") or None
            auto_mapping = None
            if config.task_type is None:  # as PEFT: lets AutoPeftModel find the base model class
                base_class = type(self.get_base_model())
                auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
            inference_mode = config.inference_mode
            config.inference_mode = True  # PEFT writes saved configs in inference mode
            try:
                config.save_pretrained(output, auto_mapping_dict=auto_mapping)
            finally:
                config.inference_mode = inference_mode

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        """README.md with the Hub metadata of a PEFT adapter (written by save_pretrained, as PEFT)."""
        hub.create_or_update_model_card(self, output_dir)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = "50GB",
                    tags: list[str] | None = None, **kwargs: Any):
        """Upload the saved adapters to the Hub repository repo_id (created if needed), as one
        commit; returns huggingface_hub's CommitInfo. max_shard_size is accepted for
        PEFT's signature: an adapter is one file. Other keyword arguments go to save_pretrained."""
        return hub.push_to_hub(self, repo_id, commit_message=commit_message, commit_description=commit_description,
                               private=private, token=token, revision=revision, create_pr=create_pr, tags=tags,
                               **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
                        subfolder: str | None = None, **kwargs: Any) -> "PeftModel":
        check_adapter_name(adapter_name)
        directory = Path(model_id) / subfolder if subfolder else Path(model_id)
        if config is None:
            config = LoraConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        _ = load_adapter_file(directory)  # a folder without weights fails before the model is touched
        model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, cls)
        if cls is not PeftModel and not issubclass(model_class, cls):
            model_class = cls
        peft_model = model_class(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            peft_model._load_weights(directory, adapter_name)
        except Exception:
            peft_model.base_model.unload()  # leave the user's model as it was
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     subfolder: str | None = None, **kwargs: Any):
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists. Choose another adapter_name "
                             f"(existing: {sorted(self.peft_config)})")
        directory = Path(model_id) / subfolder if subfolder else Path(model_id)
        config = LoraConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        _ = load_adapter_file(directory)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            load_result = self._load_weights(directory, adapter_name)
        except Exception:
            self.base_model.peft_config.pop(adapter_name, None)
            self.base_model._remove_adapter_everywhere(adapter_name)
            raise
        if is_trainable:  # add_adapter leaves a new, inactive adapter frozen (as PEFT)
            self.set_requires_grad(adapter_name)
        else:
            self.eval()
        return load_result

    def _load_weights(self, directory: Path, adapter_name: str):
        """torch's load result (missing_keys, unexpected_keys), as PEFT's load_adapter returns it;
        our loads are strict, so a mismatch raises instead and both lists come back empty."""
        saved = load_adapter_file(directory)
        return set_peft_model_state_dict(self, saved, adapter_name)


def _task_forward(model: PeftModel, task_ids: Any, named: dict[str, Any], kwargs: dict[str, Any]):
    """Forward the arguments that were given (None means "not given", as in transformers)."""
    if task_ids is not None:
        raise ValueError("task_ids is for PEFT's prompt-learning methods; a LoRA model takes none")
    return PeftModel.forward(model, **{k: v for k, v in named.items() if v is not None}, **kwargs)


# The task classes spell out PEFT's forward signatures: transformers' Trainer keeps only the
# dataset columns that the model's forward names (remove_unused_columns=True).


class PeftModelForCausalLM(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _task_forward(self, task_ids, dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict), kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _task_forward(self, task_ids, dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict), kwargs)


class PeftModelForSequenceClassification(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _task_forward(self, task_ids, dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict), kwargs)


class PeftModelForTokenClassification(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _task_forward(self, task_ids, dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict), kwargs)


class PeftModelForQuestionAnswering(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _task_forward(self, task_ids, dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, start_positions=start_positions,
            end_positions=end_positions, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict), kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _task_forward(self, task_ids, dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict), kwargs)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType | None, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True, revision: str | None = None, **kwargs: Any) -> PeftModel:
    """Wrap `model` with a new LoRA adapter, as peft.get_peft_model."""
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a lora_ext.LoraConfig, got {type(peft_config).__name__}")
    # from-config models have name_or_path == "": that names no base model
    peft_config.base_model_name_or_path = model.__dict__.get("name_or_path") or None
    if revision is not None:
        peft_config.revision = revision
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("this model already holds LoRA layers; use add_adapter on its PeftModel instead")
    model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return model_class(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


# packages whose modules an adapter_config.json's auto_mapping may name (PEFT's default list)
DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")


class _AutoPeftModel:
    """Loads the base model named in adapter_config.json, then the adapter."""

    _auto_class_name: str = ""
    _peft_class: type[PeftModel] = PeftModel

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        import_allowlist: list[str] | None = None, **kwargs: Any) -> PeftModel:
        config = config or LoraConfig.from_pretrained(pretrained_model_name_or_path)
        base_path = config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"{str(pretrained_model_name_or_path)!r}: adapter_config.json names no "
                             "base_model_name_or_path, so the base model cannot be found")
        base_class = cls._base_class(config, import_allowlist or list(DEFAULT_IMPORT_ALLOWLIST))
        base = base_class.from_pretrained(base_path, revision=config.revision, **kwargs)
        peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, cls._peft_class)
        return peft_class.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                          is_trainable=is_trainable, config=config)

    @classmethod
    def _base_class(cls, config: LoraConfig, import_allowlist: list[str]):
        """The base model class, by PEFT's rules (task type, or auto_mapping for AutoPeftModel)."""
        import transformers
        task_type = config.task_type
        if cls._auto_class_name:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type)
            if expected is not None and expected is not cls._peft_class:
                raise ValueError(f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                                 f"{cls._peft_class.__name__} make sure that you are loading the correct model for "
                                 "your task type.")
            return getattr(transformers, cls._auto_class_name)
        if task_type is not None:
            raise ValueError("Cannot use `AutoPeftModel` with a task type, please use a specific class for your "
                             "task type. (e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`)")
        mapping = config.extra_fields.get("auto_mapping")
        if not isinstance(mapping, dict) or not {"base_model_class", "parent_library"} <= mapping.keys():
            raise ValueError("Cannot infer the auto class from the config, please make sure that you are loading "
                             "the correct model for your task type.")
        library = str(mapping["parent_library"])
        if not any(library == allowed or library.startswith(f"{allowed}.") for allowed in import_allowlist):
            raise ValueError(f"The auto mapping wants to import '{library}' which is not in the import allowlist. "
                             "If you are sure that importing this library is safe, specify "
                             f"`import_allowlist=['{library}']` in `from_pretrained()`.")
        import importlib
        return getattr(importlib.import_module(library), mapping["base_model_class"])


class AutoPeftModel(_AutoPeftModel):
    """For adapters without a task type: the base class comes from the config's auto_mapping."""


class AutoPeftModelForCausalLM(_AutoPeftModel):
    _auto_class_name = "AutoModelForCausalLM"
    _peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    _auto_class_name = "AutoModelForSeq2SeqLM"
    _peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    _auto_class_name = "AutoModelForSequenceClassification"
    _peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    _auto_class_name = "AutoModelForTokenClassification"
    _peft_class = PeftModelForTokenClassification


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    _auto_class_name = "AutoModel"
    _peft_class = PeftModelForFeatureExtraction
