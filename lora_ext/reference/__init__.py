"""Pure-PyTorch oracles, one per op, written for clarity rather than speed.

They define what the kernels compute: the CPU and CUDA kernels are tested against them,
and they run on any device. One private module per kernel family.
"""
from ._bgmv import (lora_expand, lora_expand_sgmv, lora_shrink, lora_shrink_sgmv,
                    segments_to_idx)
from ._lora_linear import dropout_mask, dropout_threshold, lora_dropout, lora_linear, philox4x32_10

__all__ = ["lora_expand", "lora_expand_sgmv", "lora_shrink", "lora_shrink_sgmv", "segments_to_idx",
           "dropout_mask", "dropout_threshold", "lora_dropout", "lora_linear", "philox4x32_10"]
