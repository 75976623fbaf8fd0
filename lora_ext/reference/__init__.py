"""Pure-PyTorch oracles, one per op, written for clarity rather than speed.

They define what the kernels compute: the CPU and CUDA kernels are tested against them,
and they run on any device. One private module per kernel family.
"""
from ._lora_linear import dropout_mask, dropout_threshold, lora_dropout, lora_linear, philox4x32_10
from ._nf4 import (DYNAMIC_CODE, NF4_CODE, dequantize_absmax, nf4_dequantize, nf4_matmul,
                   nf4_quantize, quantize_absmax)

__all__ = ["DYNAMIC_CODE", "NF4_CODE", "dequantize_absmax", "dropout_mask", "dropout_threshold",
           "lora_dropout", "lora_linear", "nf4_dequantize", "nf4_matmul", "nf4_quantize",
           "philox4x32_10", "quantize_absmax"]
