"""Pure-PyTorch oracles, one per op, written for clarity rather than speed.

They define what the kernels compute: the CPU and CUDA kernels are tested against them,
and they run on any device. One private module per kernel family.
"""
from ._conv import dora_conv, lora_conv, lora_conv_weight
from ._embedding import lora_embedding
from ._dora import dora_linear, dora_magnitude_scale, dora_weight_norm
from ._bgmv import (lora_expand, lora_expand_sgmv, lora_shrink, lora_shrink_sgmv,
                    segments_to_idx)
from ._lora_linear import (dropout_mask, dropout_seed, dropout_threshold, lora_dropout, lora_linear,
                           philox4x32_10)
from ._nf4 import (DYNAMIC_CODE, NF4_CODE, dequantize_absmax, nf4_dequantize, nf4_matmul,
                   nf4_quantize, quantize_absmax)

__all__ = ["dequantize_absmax", "dora_conv", "dora_linear", "dora_magnitude_scale", "dora_weight_norm",
           "dropout_mask", "dropout_seed", "dropout_threshold", "DYNAMIC_CODE", "lora_conv", "lora_conv_weight",
           "lora_dropout", "lora_embedding", "lora_expand", "lora_expand_sgmv", "lora_linear", "lora_shrink",
           "lora_shrink_sgmv", "NF4_CODE", "nf4_dequantize", "nf4_matmul", "nf4_quantize", "philox4x32_10",
           "quantize_absmax", "segments_to_idx"]
