"""LoRA on nn.MultiheadAttention, as PEFT's lora.MultiheadAttention.

nn.MultiheadAttention never calls a Linear's forward: its in-projection is the raw parameter
in_proj_weight [3·embed, embed] (query, key and value stacked) and its out_proj's weight is
read directly by F.multi_head_attention_forward. So a LoRA branch cannot be added to an
output; the adapters act through the weights. As in PEFT, one adapter covers both: lora_A
[r, embed] and lora_B [3·embed, r] on in_proj_weight (this layer), and a LoRA Linear put in
place of out_proj (base_layer.out_proj, with the same r and alpha). For the forward the base
module's own forward reads W + ΔW in place of its weights (see _reading), while the registered
parameters stay as they are: a trainable base weight keeps its identity and its requires_grad.

PEFT's numbers, which saved adapters depend on, carry two quirks reproduced here on purpose
(adapters trained with PEFT give the same outputs and the same training here):
- the out_proj delta is applied twice, in the forward and when merging (PEFT's merge adds it
  once itself and then calls out_proj's merge, which adds it again), so out_proj effectively
  gets 2·s·B·A;
- gradients see the forward weights as PEFT builds them: W_in + ΔW_in and W_out + ΔW_out
  with the second ΔW_out added outside autograd, each adapter added to a detached sum of the
  ones before (only the last active adapter gets gradients), and W itself detached.
lora_dropout is accepted but, with the adapter acting through the weight, never applied
(PEFT's behaviour). Only query/key/value of one embedding size (_qkv_same_embed_dim) are
supported; DoRA and mixed-adapter batches are refused, as by PEFT.
"""
from __future__ import annotations

import warnings
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from .. import init as lora_init
from .base import LoraLayer
from .linear import Linear


@contextmanager
def _reading(module: nn.Module, name: str, value: torch.Tensor):
    """Inside the block `module.<name>` reads as `value`; afterwards exactly as before.

    The value shadows the attribute from the instance dict, which attribute lookup consults
    before nn.Module's parameter table: the registered parameter is never touched, and a plain
    tensor put there by a wrapper (FSDP's use_orig_params views during its forward, which
    torch.func.functional_call would miss) is shadowed and restored as well.
    """
    missing = object()
    previous = module.__dict__.get(name, missing)
    module.__dict__[name] = value
    try:
        yield
    finally:
        if previous is missing:
            del module.__dict__[name]
        else:
            module.__dict__[name] = previous


# inits that factor the base weight: MultiheadAttention has no single `weight` to factor
_WEIGHT_INITS = ("pissa", "olora", "loftq")


class MultiheadAttention(nn.Module, LoraLayer):
    """LoRA adapters on the in-projection and the out-projection of an nn.MultiheadAttention."""

    fan_in_fan_out = False  # Linear.get_delta_weight reads it

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                 lora_bias: bool = False, **kwargs: Any) -> None:
        name = type(self).__name__
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ValueError(f"Only same embed for query/key/value is supported as of now for {name}.")
        if use_dora:
            raise ValueError(f"{name} does not support DoRA (yet), please set use_dora to False")
        self._check_lora_bias(lora_bias)
        super().__init__()
        self._init_lora_state(base_layer, base_layer.embed_dim, 3 * base_layer.embed_dim)
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(f"out_proj must be an instance of nn.Linear for {name}.")
        settings = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights,
                        use_rslora=use_rslora, use_dora=use_dora)
        self._check_init(init_lora_weights)
        # PEFT's order of construction, which fixes its RNG draws: out_proj's adapter is made when
        # the LoRA Linear is built and made again by update_layer, after the in-projection's.
        base_layer.out_proj = Linear(base_layer.out_proj, adapter_name, **settings)
        self.update_layer(adapter_name, **settings)
        self.set_adapter(adapter_name)

    @staticmethod
    def _check_lora_bias(lora_bias: bool) -> None:
        # PEFT creates the bias but its MultiheadAttention forward never trains it (the bias enters only
        # through out_proj's in-place merge); rather than a bias that silently stays at zero, refuse it
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for MultiheadAttention by lora-ext (PEFT's "
                             "MultiheadAttention never trains the bias); please set lora_bias=False")

    @staticmethod
    def _check_init(init_lora_weights) -> None:
        if isinstance(init_lora_weights, str) and init_lora_weights.lower().startswith(_WEIGHT_INITS):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported for MultiheadAttention: it "
                             "factors a single base weight; expected True, 'gaussian' or False")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                     lora_bias: bool = False, **kwargs: Any) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if use_dora:
            raise ValueError(f"{type(self).__name__} does not support DoRA (yet), please set use_dora to False")
        self._check_lora_bias(lora_bias)
        self._check_init(init_lora_weights)
        self._set_scaling(adapter_name, r, lora_alpha, use_rslora)
        self.use_dora[adapter_name] = False
        self.lora_dropout[adapter_name] = self._dropout_module(lora_dropout)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        lora_init.init_lora_weights(self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight,
                                    init_lora_weights, r=r, scaling=self.scaling[adapter_name])
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters)
        self.base_layer.out_proj.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights,
                                              use_rslora, use_dora)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        weight = self.base_layer.out_proj.weight  # PEFT follows out_proj's device and dtype
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for container in (self.lora_A, self.lora_B):
            if adapter_name in container:
                container[adapter_name].to(weight.device, dtype)

    # ---------------------------------------------------------------- the base module's face

    embed_dim = property(lambda self: self.base_layer.embed_dim)
    kdim = property(lambda self: self.base_layer.kdim)
    vdim = property(lambda self: self.base_layer.vdim)
    _qkv_same_embed_dim = property(lambda self: self.base_layer._qkv_same_embed_dim)
    num_heads = property(lambda self: self.base_layer.num_heads)
    dropout = property(lambda self: self.base_layer.dropout)
    batch_first = property(lambda self: self.base_layer.batch_first)
    head_dim = property(lambda self: self.base_layer.head_dim)
    in_proj_weight = property(lambda self: self.base_layer.in_proj_weight)
    in_proj_bias = property(lambda self: self.base_layer.in_proj_bias)
    bias_k = property(lambda self: self.base_layer.bias_k)
    bias_v = property(lambda self: self.base_layer.bias_v)
    add_zero_attn = property(lambda self: self.base_layer.add_zero_attn)

    @property
    def out_proj(self) -> nn.Module:
        """The plain out-projection Linear (as PEFT; the LoRA one is base_layer.out_proj)."""
        return self.base_layer.out_proj.get_base_layer()

    def merge_masks(self, *args: Any, **kwargs: Any):
        return self.base_layer.merge_masks(*args, **kwargs)

    # ---------------------------------------------------------------- merging

    get_delta_weight = Linear.get_delta_weight  # s·B·A on in_proj_weight [3·embed, embed]

    def merged_weight(self, adapter: str) -> torch.Tensor:
        """in_proj_weight with this adapter merged (out_proj is a LoRA layer of its own)."""
        weight = self.base_layer.in_proj_weight
        return weight.data + self.get_delta_weight(adapter).to(self.base_layer.out_proj.weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base, out_proj = self.base_layer, self.base_layer.out_proj
        dtype = out_proj.weight.dtype
        for name in self._check_adapters_to_merge(adapter_names):
            merged_in = self.merged_weight(name)
            merged_out = out_proj.weight.data + out_proj.get_delta_weight(name).to(dtype)
            if safe_merge and not (torch.isfinite(merged_in).all() and torch.isfinite(merged_out).all()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            base.in_proj_weight.data = merged_in
            out_proj.weight.data = merged_out
            out_proj.merge(adapter_names=[name])  # adds out_proj's delta a second time, as PEFT does
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base, out_proj = self.base_layer, self.base_layer.out_proj
        dtype = out_proj.weight.dtype
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                base.in_proj_weight.data = base.in_proj_weight.data - self.get_delta_weight(name).to(dtype)
                out_proj.weight.data = out_proj.weight.data - out_proj.get_delta_weight(name).to(dtype)
        out_proj.unmerge()  # takes out the second delta

    # ---------------------------------------------------------------- forward

    def _forward_weights(self, adapters: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """in_proj_weight and out_proj's weight as PEFT's forward sees them (see the module doc)."""
        out_proj = self.base_layer.out_proj
        dtype = out_proj.weight.dtype
        weight_in, weight_out = self.base_layer.in_proj_weight, out_proj.weight
        for name in adapters:
            weight_in = weight_in.detach() + self.get_delta_weight(name).to(dtype)
            delta_out = out_proj.get_delta_weight(name)
            weight_out = weight_out.detach() + delta_out.to(dtype)
            twice = (weight_out.detach() + delta_out.detach()).to(dtype)
            weight_out = twice + (weight_out - weight_out.detach())  # the value of `twice`, the gradient of one delta
        return weight_in, weight_out

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any):
        if "adapter_names" in kwargs:
            raise TypeError(f"lora.{type(self).__name__} does not support mixed adapter batches.")
        previous_dtype = query.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(query, *args, **kwargs)
        elif self.merged:
            result = self.base_layer(query, *args, **kwargs)
        else:
            out_proj = self.base_layer.out_proj
            if out_proj.active_adapters != self.active_adapters:
                kind = type(self.base_layer).__name__
                raise ValueError(f"The out_proj layer of {kind} has merged layers but {kind} itself doesn't; please "
                                 "ensure that either both or none have merged layers")
            adapters = [name for name in self.active_adapters if name in self.lora_A]
            with ExitStack() as stack:
                if adapters:
                    weight_in, weight_out = self._forward_weights(adapters)
                    stack.enter_context(_reading(self.base_layer, "in_proj_weight", weight_in))
                    stack.enter_context(_reading(self.base_layer.out_proj.base_layer, "weight", weight_out))
                result = self.base_layer(query, *args, **kwargs)
        output, attention = result
        return output.to(previous_dtype), (attention.to(previous_dtype) if attention is not None else None)

    def __repr__(self) -> str:
        return "lora_ext." + super().__repr__()
