"""The Python face of every lora_ext op: typed wrappers, fakes and autograd formulas.

This package is the only code that touches torch.ops.lora_ext; one private module per
kernel family. Schemas live in csrc/registration.cpp; the semantics of each op is the
function of the same name in lora_ext.reference.
"""
from ._lora_linear import dropout_mask, lora_linear
from ._bgmv import (lora_expand, lora_expand_sgmv, lora_shrink, lora_shrink_sgmv,  # noqa: E402
                    segments_from_idx)

__all__ = ["dropout_mask", "lora_linear", "lora_expand", "lora_expand_sgmv", "lora_shrink",
           "lora_shrink_sgmv", "segments_from_idx"]
