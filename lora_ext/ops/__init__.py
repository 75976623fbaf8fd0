"""The Python face of every lora_ext op: typed wrappers, fakes and autograd formulas.

This package is the only code that touches torch.ops.lora_ext; one private module per
kernel family. Schemas live in csrc/registration.cpp; the semantics of each op is the
function of the same name in lora_ext.reference.
"""
from ._conv import dora_conv, lora_conv, lora_conv_weight
from ._dora import dora_linear, dora_weight_norm
from ._bgmv import lora_expand, lora_expand_sgmv, lora_shrink, lora_shrink_sgmv, segments_from_idx
from ._embedding import lora_embedding, lora_embedding_dtypes_ok
from ._lora_linear import dropout_mask, dropout_seed, lora_linear
from ._nf4 import (DYNAMIC_CODE, NF4_CODE, dequantize_absmax, nf4_dequantize, nf4_matmul,
                   nf4_quantize, quantize_absmax)

__all__ = ["dequantize_absmax", "dora_conv", "dora_linear", "dora_weight_norm", "dropout_mask", "dropout_seed",
           "DYNAMIC_CODE", "lora_conv", "lora_conv_weight", "lora_embedding", "lora_embedding_dtypes_ok",
           "lora_expand", "lora_expand_sgmv", "lora_linear", "lora_shrink", "lora_shrink_sgmv", "NF4_CODE",
           "nf4_dequantize", "nf4_matmul", "nf4_quantize", "quantize_absmax", "segments_from_idx"]
