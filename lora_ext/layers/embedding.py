"""LoRA on nn.Embedding: lookups into lora_embedding_A [r, num_embeddings], then B [dim, r].

As in PEFT, the adapter path applies no dropout (its dropout module exists only for
configuration parity) and A starts at zero with B Gaussian. One active plain adapter on an
nn.Embedding runs ops.lora_embedding (the base row and the adapter term in one pass per
token); DoRA, several active adapters, max_norm / sparse / scale_grad_by_freq lookups and
scaled embeddings (embed_scale) take the composed path below.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import dora
from .. import ops, serving
from .base import LoraLayer


class Embedding(nn.Module, LoraLayer):
    def __init__(self, base_layer: nn.Embedding, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, init_lora_weights=True, use_rslora: bool = False,
                 use_dora: bool = False, **kwargs: Any) -> None:
        super().__init__()
        num_embeddings, embedding_dim = base_layer.weight.shape
        self._init_lora_state(base_layer, num_embeddings, embedding_dim)
        self._dora_merge_norms: dict[str, torch.Tensor] = {}  # DoRA: the norms used at merge time
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora,
                          lora_bias=kwargs.get("lora_bias", False))
        self.set_adapter(adapter_name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                     loftq_config=None, lora_bias: bool = False) -> None:  # loftq_config: refused by the init here
        if lora_bias:  # PEFT's words: its embedding adapters are bare parameters, with no bias
            raise ValueError(f"lora_bias={lora_bias} is not supported for {type(self).__name__}.")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.lora_bias[adapter_name] = False
        self._set_scaling(adapter_name, r, lora_alpha, use_rslora)
        self.use_dora[adapter_name] = bool(use_dora)
        self.lora_dropout[adapter_name] = self._dropout_module(lora_dropout)
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))
        self._initialise(adapter_name, init_lora_weights, "embedding")
        self._move_adapter_to_base(adapter_name)
        if use_dora:  # magnitude per embedding dimension, as PEFT's DoraEmbeddingLayer
            self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude(self, adapter_name)
        self.set_adapter(self.active_adapters)

    # DoRA sees the table as Wᵀ [embedding_dim, num_embeddings]: one norm per output dimension.
    def base_weight_out_in(self) -> torch.Tensor:
        return self.base_layer.weight.T

    def dora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]

    def to_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    from_out_in = to_out_in

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight_A, weight_B = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
        dtype = weight_A.dtype
        if weight_A.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            weight_A, weight_B = weight_A.float(), weight_B.float()
        return ((weight_B @ weight_A).T * self.scaling[adapter]).to(dtype)

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                           sparse=base.sparse)

    def _adapter_output(self, ids: torch.Tensor, adapter: str) -> torch.Tensor:
        after_A = self._embed(ids, self.lora_embedding_A[adapter].T)
        output = (after_A @ self.lora_embedding_B[adapter].T) * self.scaling[adapter]
        embed_scale = getattr(self.base_layer, "embed_scale", None)  # e.g. Gemma's scaled embeddings
        if isinstance(embed_scale, torch.Tensor):
            output = output * embed_scale.to(output.dtype)
        return output

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            self._check_adapter_names(x, adapter_names)
            result = self.base_layer(x, *args, **kwargs)
            return serving.mixed_batch_embedding(self, x, result, adapter_names)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        fused = self._fusable_adapter(x) if not (args or kwargs) else None
        if fused is not None:
            base = self.base_layer
            return ops.lora_embedding(x, base.weight, self.lora_embedding_A[fused], self.lora_embedding_B[fused],
                                      self.scaling[fused], base.padding_idx)
        result = self.base_layer(x, *args, **kwargs)
        # fp32 adapters (autocast_adapter_dtype) over a half base: the output keeps the
        # base's dtype, as PEFT's, so the next half-precision layer can take it
        base_dtype = result.dtype
        for name in self.active_adapters:
            if name in self.lora_embedding_A:
                if self.use_dora.get(name, False):
                    result = dora.dora_embedding_forward(self, x, name, result)
                else:
                    result = result + self._adapter_output(x, name)
        return result.to(base_dtype)

    def _fusable_adapter(self, x: torch.Tensor) -> str | None:
        """The one active adapter when ops.lora_embedding can stand in for the forward, else None."""
        active = [name for name in self.active_adapters if name in self.lora_embedding_A]
        base = self.base_layer
        if len(active) != 1 or self.use_dora.get(active[0], False) or type(base) is not nn.Embedding:
            return None
        if base.max_norm is not None or base.sparse or base.scale_grad_by_freq or hasattr(base, "embed_scale"):
            return None
        A = self.lora_embedding_A[active[0]]
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int64, torch.int32) \
                or x.device != base.weight.device or A.device != base.weight.device:
            return None
        if A.dtype != self.lora_embedding_B[active[0]].dtype \
                or not ops.lora_embedding_dtypes_ok(base.weight.dtype, A.dtype):
            return None
        return active[0]

    def __repr__(self) -> str:
        return "lora_ext." + super().__repr__()
