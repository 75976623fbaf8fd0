"""Trainable tokens (PEFT's LoraConfig.trainable_token_indices): train a few rows of an embedding.

Only the given token rows are trained: each adapter holds the new values of its rows
(`trainable_tokens_delta`, [n_tokens, dim], starting as copies of the base rows) and the
original rows (`trainable_tokens_original`, not saved). Forward looks tokens up in the base
table with those rows replaced, so the gradient reaches the delta only. With weight tying
(lm_head sharing the embedding's weight) the output layer gets a tied layer that shares the
embedding layer's adapters, as PEFT does.

Names and state_dict keys are PEFT's: `<emb>.token_adapter.base_layer.weight` and
`<emb>.token_adapter.trainable_tokens_delta.<adapter>` in the model,
`<emb>.token_adapter.trainable_tokens_delta` in a saved adapter (tied layers save nothing).
"""
from __future__ import annotations

import re
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterStatus, LoraLayer
from .modules_to_save import AuxiliaryTrainingWrapper


class _BufferDict(nn.Module):
    """Adapter name -> tensor, held as non-persistent buffers: they follow .to() and device
    moves but are never saved (PEFT's BufferDict with persistent=False)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=False)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: str) -> bool:
        return key in self._buffers

    def __iter__(self):
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def items(self):
        return self._buffers.items()

    def values(self):
        return self._buffers.values()


class TrainableTokensLayer(nn.Module, AdapterStatus):
    """The rows of `base_layer.weight` (an nn.Embedding, or a tied nn.Linear head) that each
    adapter trains. A tied layer (tied_adapter given) shares its adapters and holds none."""

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(self, base_layer: nn.Module, adapter_name: str, token_indices: list[int] | None = None,
                 tied_adapter: "TrainableTokensLayer | None" = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._active_adapter = [adapter_name]
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # a list keeps the tied layer out of named_modules() and so out of the state_dict twice
        self._tied_adapter = [tied_adapter] if tied_adapter is not None else []
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = _BufferDict()
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices

    @property
    def tied_adapter(self) -> "TrainableTokensLayer | None":
        return self._tied_adapter[0] if self._tied_adapter else None

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:
        """New adapter: its delta starts as a copy of the base rows (PEFT's init_weights=True)."""
        if self.tied_adapter is not None:
            return  # the layer this one is tied to holds the adapters
        weight = self.base_layer.weight
        rows = weight.shape[0]
        bad = [i for i in token_indices if not -rows <= i < rows]
        if bad:
            raise ValueError(f"trainable_token_indices {bad} are out of range for a layer of {rows} tokens "
                             f"({type(self.base_layer).__name__} with weight {tuple(weight.shape)})")
        self.token_indices[adapter_name] = list(token_indices)
        originals = weight.detach()[list(token_indices)]
        values = originals if init_weights else torch.randn(originals.shape, dtype=weight.dtype,
                                                            device=weight.device)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values.clone())
        self.trainable_tokens_original[adapter_name] = originals.clone()

    # ---------------------------------------------------------------- adapters

    def _get_available_adapters(self) -> set[str]:
        return set(self.trainable_tokens_delta)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for key, param in self.trainable_tokens_delta.items():
            param.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for param in self.trainable_tokens_delta.values():
                param.requires_grad_(False)
        self._disable_adapters = not enabled

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for key, param in self.trainable_tokens_delta.items():
            if key in names:
                param.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.trainable_tokens_delta, self.trainable_tokens_original, self.token_indices):
            if adapter_name in table:
                del table[adapter_name]
        self._active_adapter = [n for n in self._active_adapter if n != adapter_name]

    # ---------------------------------------------------------------- weights

    def _check_overlapping_tokens(self, adapter_names: list[str]) -> None:
        """Several adapters (merged or active together) may not replace the same row."""
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + list(adapter_names)):
            rows = set(self.token_indices[name])
            if seen & rows:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in undefined "
                                 "merging behavior. Only disjunct token indices are currently supported.")
            seen |= rows

    def _index(self, adapter: str, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.token_indices[adapter], dtype=torch.long, device=device)

    def get_merged_weights(self, adapter_names: list[str]) -> torch.Tensor:
        """The base weight with the rows of these adapters replaced (differentiable in the deltas)."""
        weight = self.base_layer.weight
        for name in adapter_names:
            weight = weight.index_copy(0, self._index(name, weight.device),
                                       self.trainable_tokens_delta[name].to(weight))
        return weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self.token_indices and n not in self.merged_adapters]
        if not names:
            return
        self._check_overlapping_tokens(names)
        merged = self.base_layer.weight.data
        for name in names:
            merged = merged.index_copy(0, self._index(name, merged.device),
                                       self.trainable_tokens_delta[name].detach().to(merged))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        self.base_layer.weight.data = merged
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.token_indices:
                weight.data.index_copy_(0, self._index(name, weight.device),
                                        self.trainable_tokens_original[name].to(weight))

    # ---------------------------------------------------------------- forward

    def forward_adapters(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        names = [n for n in adapter_names if n in self.token_indices]
        if self.disable_adapters or not names:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        self._check_overlapping_tokens(names)
        weight = self.get_merged_weights(names)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            result = F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                                 norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                                 sparse=base.sparse)
            embed_scale = getattr(base, "embed_scale", None)  # e.g. Gemma's scaled embeddings
            if isinstance(embed_scale, (int, float)) or (isinstance(embed_scale, torch.Tensor)
                                                          and embed_scale.numel() == 1):
                result = result * torch.as_tensor(embed_scale).to(result)
            return result
        if isinstance(base, nn.Linear):  # the output head tied to the embedding (PEFT passes no bias)
            return F.linear(x, weight)
        raise ValueError("TrainableTokensLayer wraps an unknown layer type, maybe you are targeting the wrong layer?")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward_adapters(x, self.active_adapters, *args, **kwargs)

    def __repr__(self) -> str:
        return "lora_ext." + super().__repr__()


class TrainableTokensWrapper(AuxiliaryTrainingWrapper):
    """Stands where the embedding (or tied head) was; `token_adapter` does the work. At most
    one adapter with trainable tokens is active per wrapper, as in PEFT."""

    def __init__(self, module: nn.Module, adapter_name: str, token_indices: list[int],
                 tied_adapter: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        if isinstance(module, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList, LoraLayer,
                               AuxiliaryTrainingWrapper)):
            raise TypeError(f"trainable_token_indices cannot be applied to modules of type {type(module)}")
        self.token_adapter = TrainableTokensLayer(module, adapter_name, tied_adapter=tied_adapter)
        self._adapters: set[str] = set()
        self._active_adapter = [adapter_name]
        self.update(adapter_name, token_indices=token_indices, tied_adapter=tied_adapter)

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("_modules", "token_adapter"):
                raise
        original = self.token_adapter.base_layer
        if name == "weight" and not self.disable_adapters and self.active_adapters:
            # what models read as the embedding table: the base rows with the active adapter's rows
            return self.token_adapter.get_merged_weights(self.token_adapter.active_adapters)
        return getattr(original, name)

    def update(self, adapter_name: str, token_indices: list[int] | None = None,
               tied_adapter: TrainableTokensLayer | None = None) -> None:
        if adapter_name not in self._adapters:
            if tied_adapter is None:
                self.token_adapter.update_layer(adapter_name, token_indices)
            self._adapters.add(adapter_name)

    def _get_available_adapters(self) -> set[str]:
        return set(self._adapters)  # a tied wrapper's adapters too (their tensors live in the embedding's)

    def adapter_parameters(self):
        return list(self.token_adapter.trainable_tokens_delta.values())

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        mine = [n for n in names if n in self._adapters]
        if len(mine) > 1:
            raise ValueError(f"Only one adapter can be set at a time for {self}, got {len(mine)}")
        self._active_adapter = mine
        self.token_adapter.set_adapter(mine, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        self.token_adapter.set_requires_grad(adapter_names, requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        self.token_adapter.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        self.token_adapter.delete_adapter(adapter_name)
        self._adapters.discard(adapter_name)
        self._active_adapter = [n for n in self._active_adapter if n != adapter_name]

    def unloaded_module(self) -> nn.Module:
        """The embedding (merged or not, as the token layer stands) for unload/merge_and_unload."""
        return self.token_adapter.base_layer

    def saved_keys(self, adapter_name: str) -> dict[str, str]:
        """Saved key suffix -> model key suffix of this adapter's tensors (none for a tied layer)."""
        if self.token_adapter.tied_adapter is not None or adapter_name not in self.token_adapter.trainable_tokens_delta:
            return {}
        return {"token_adapter.trainable_tokens_delta": f"token_adapter.trainable_tokens_delta.{adapter_name}"}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None or self.disable_adapters:
            return self.token_adapter(x, *args, **kwargs)
        if len(x) != len(adapter_names):
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {len(x)} respectively.")
        result = None
        for name in dict.fromkeys(adapter_names):  # rows of each adapter through its own rows of the table
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            output = self.token_adapter.forward_adapters(x[rows], [name], *args, **kwargs)
            if result is None:
                result = output.new_empty((len(x), *output.shape[1:]))
            result[rows] = output
        return result


def _input_embeddings_name(model: nn.Module, default: str) -> str:
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if embeddings is not None:
        for name, module in model.named_modules():
            if module is embeddings:
                return name
    return default


def _names_tied_with_embedding(model: nn.Module) -> list[str]:
    """Modules that share the input embedding's weight (e.g. lm_head) when the model's config
    ties them (tie_word_embeddings), by module name, PEFT wrappers looked through."""
    config = getattr(model, "config", None)
    getter = getattr(model, "get_input_embeddings", None)
    if not getattr(config, "tie_word_embeddings", False) or not callable(getter):
        return []
    embeddings = getter()
    if isinstance(embeddings, TrainableTokensWrapper):
        embeddings = embeddings.original_module
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        return []
    own = {name for name, module in model.named_modules() if module is embeddings}
    names = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is weight:
            module_name = re.sub(r"\.(token_adapter\.)?base_layer$", "", name.rpartition(".")[0])
            if module_name not in own and not any(module_name.startswith(f"{o}.") for o in own):
                names.add(module_name)
    return sorted(names)


def _wrap(model: nn.Module, adapter_name: str, target: str, active: bool, inference_mode: bool,
          token_indices: list[int], tied_adapter: TrainableTokensLayer | None = None) -> None:
    """Wrap (or add the adapter to) every module whose name ends with `target` (PEFT's match)."""
    found = False
    for key, module in list(model.named_modules(remove_duplicate=False)):
        if not key.endswith(target):
            continue
        parent_name, _, child = key.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        grandparent_name = parent_name.rpartition(".")[0]
        if parent_name and isinstance(model.get_submodule(grandparent_name) if grandparent_name else model, LoraLayer):
            raise ValueError(f"You are trying to target a module with trainable_token_indices that is a child of a "
                             f"LoRA layer ({key}). Please ensure that the adapter name, '{adapter_name}', does not "
                             "conflict with any of the targeted modules.")
        found = True
        if isinstance(module, TrainableTokensWrapper):
            module.update(adapter_name, token_indices=token_indices, tied_adapter=tied_adapter)
            module.set_adapter(module.active_adapters, inference_mode=inference_mode)
            continue
        wrapper = TrainableTokensWrapper(module, adapter_name, token_indices, tied_adapter=tied_adapter)
        wrapper.set_adapter(adapter_name if active else [], inference_mode=inference_mode)
        setattr(parent, child, wrapper)
    if not found:
        raise ValueError(f"Target modules {{'{target}'}} not found in the base model. Please check the target modules "
                         "and try again.")


def add_trainable_tokens(model: nn.Module, config, adapter_name: str, active: bool) -> None:
    """Wrap the layers named by config.trainable_token_indices for this adapter (PEFT's rules:
    a bare list means the input embedding; with tied weights and equal indices the tied
    head shares the embedding's adapter)."""
    indices = config.trainable_token_indices
    if indices is None:
        return
    targets = dict(indices) if isinstance(indices, dict) else {_input_embeddings_name(model, "embed_tokens"): indices}
    for name in targets:
        if name in (config.modules_to_save or []):
            raise ValueError("The embedding layer is already marked to be trained fully, either specify "
                             f'`modules_to_save=[..., "{name}", ...]` or `trainable_tokens={{\'{name}\': x}}` but '
                             "not both.")
    tied_names = _names_tied_with_embedding(model)
    skip: set[str] = set()
    mismatch = False
    if len(targets) > 1 and tied_names:
        embedding_name = _input_embeddings_name(model, "")
        tied_keys = [t for t in targets if embedding_name.endswith(t)
                     or any(n.endswith(t) or t in n.split(".") for n in tied_names)]
        if len(tied_keys) >= 2:
            mismatch = any(targets[k] != targets[tied_keys[0]] for k in tied_keys[1:])
            if not mismatch:
                skip = set(tied_keys) & set(tied_names)
    for name, token_indices in targets.items():
        if name not in skip:
            _wrap(model, adapter_name, name, active, config.inference_mode, token_indices)
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    if tied_names and isinstance(embeddings, TrainableTokensWrapper) and not mismatch:
        layer = embeddings.token_adapter
        for name in tied_names:
            _wrap(model, adapter_name, name, active, config.inference_mode, layer.token_indices.get(adapter_name),
                  tied_adapter=layer)
