"""Helpers for the NF4 / QLoRA tests: bitsandbytes layers built on the CPU, tiny Llamas."""
from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


def bnb_linear4bit(linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
                   device: str = "cpu"):
    """A bitsandbytes Linear4bit quantised on the CPU from `linear` (bnb's own quantize_4bit)."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compress_statistics=double_quant, quant_type=quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type,
                                     module=layer).to(device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone().to(device))
    # bnb repacks weights for its AVX512-BF16 CPU kernel in eval/no-grad, re-quantising the
    # nested absmax (lossy); keep it on its plain dequantise path for byte comparisons
    layer.support_avx512bf16_for_cpu = False
    return layer


def bnb_dequantize(layer) -> torch.Tensor:
    """bitsandbytes' dequantised weight, by its generic (pure PyTorch) CPU path.

    bnb 0.50's native AVX512 CPU kernel (dequantize_4bit with an even row length) reads the
    wrong absmax once the blocksize exceeds the row length (e.g. blocksize 256 on a
    [96, 128] weight), so it is not the oracle here; its generic path follows bnb's
    definition (and its CUDA kernels).
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(layer.weight.data.reshape(-1), absmax, state.code, state.blocksize,
                                    state.shape, state.dtype)


def assert_state_dicts_equal(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key].cpu(), theirs[key].cpu()), key


def make_linear(out_features: int, in_features: int, dtype=torch.float32, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    return linear.to(dtype)


def tiny_llama(seed: int = 0, dtype=torch.float32):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def bnb_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose lora_ext NF4Linear layers are bitsandbytes Linear4bit with the same bytes."""
    import copy

    from lora_ext.nf4 import NF4Linear, to_bnb
    clone = copy.deepcopy(model)
    for name, module in list(clone.named_modules()):
        if isinstance(module, NF4Linear):
            layer = to_bnb(module)
            layer.support_avx512bf16_for_cpu = False  # see bnb_linear4bit
            parent, _, child = name.rpartition(".")
            setattr(clone.get_submodule(parent) if parent else clone, child, layer)
    clone.is_loaded_in_4bit = True  # as transformers marks bnb 4-bit models; PEFT dispatches on it
    return clone


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose NF4Linear layers are nn.Linear holding the dequantised weights."""
    import copy

    from lora_ext.nf4 import NF4Linear
    clone = copy.deepcopy(model)
    for name, module in list(clone.named_modules()):
        if isinstance(module, NF4Linear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight = nn.Parameter(module.dequantize(), requires_grad=False)
            if module.bias is not None:
                dense.bias = nn.Parameter(module.bias.detach().clone())
            parent, _, child = name.rpartition(".")
            setattr(clone.get_submodule(parent) if parent else clone, child, dense)
    return clone
