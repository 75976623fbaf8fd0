"""The Python face of every lora_ext op: typed wrappers, fakes and autograd formulas.

This package is the only code that touches torch.ops.lora_ext; one private module per
kernel family. Schemas live in csrc/registration.cpp; the semantics of each op is the
function of the same name in lora_ext.reference.
"""
from ._dora import dora_linear, dora_weight_norm
from ._lora_linear import dropout_mask, lora_linear

__all__ = ["dora_linear", "dora_weight_norm", "dropout_mask", "lora_linear"]
