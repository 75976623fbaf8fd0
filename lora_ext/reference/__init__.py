"""Pure-PyTorch oracles, one per op, written for clarity rather than speed.

They define what the kernels compute: the CPU and CUDA kernels are tested against them,
and they run on any device. One private module per kernel family.
"""
from ._dora import dora_linear, dora_magnitude_scale, dora_weight_norm
from ._lora_linear import dropout_mask, dropout_threshold, lora_dropout, lora_linear, philox4x32_10

__all__ = ["dora_linear", "dora_magnitude_scale", "dora_weight_norm", "dropout_mask", "dropout_threshold", "lora_dropout", "lora_linear", "philox4x32_10"]
