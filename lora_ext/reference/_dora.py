"""Oracles for DoRA: the weight norm and PEFT's DoRA linear layer, written as PEFT computes them."""
import torch
import torch.nn.functional as F

from ._lora_linear import lora_dropout


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dora_weight_norm(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ per row of W [out, in], in fp32 (fp64 for fp64 inputs)."""
    acc = _acc_dtype(weight.dtype)
    combined = weight.to(acc) + scaling * (lora_B.to(acc) @ lora_A.to(acc))
    return torch.linalg.vector_norm(combined, dim=1)


def dora_magnitude_scale(magnitude, weight_norm) -> torch.Tensor:
    """g = magnitude / ‖W + s·B·A‖ (norm detached), in the accumulation type, used in x's dtype."""
    acc = _acc_dtype(magnitude.dtype)
    return (magnitude.to(acc) / weight_norm.detach().to(acc)).to(magnitude.dtype)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float = 0.0,
                seed: int = 0, training: bool = True, offset: int = 0, weight_norm=None) -> torch.Tensor:
    """PEFT's DoRA linear (peft.tuners.lora.dora.DoraLinearLayer with the Philox dropout):

        g = magnitude / weight_norm.detach()        # weight_norm = dora_weight_norm(W, A, B, s)
        d = drop(x)                                 # identity when p = 0 or not training
        y = x @ W.T + bias + (g - 1) * (d @ W.T) + g * s * (d @ A.T) @ B.T
    """
    p = dropout_p if training else 0.0
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), scaling)
    g = dora_magnitude_scale(magnitude, weight_norm)
    d = lora_dropout(x, p, seed, offset)
    base = F.linear(x, weight, bias)
    return base + (g - 1) * F.linear(d, weight) + g * scaling * ((d @ lora_A.T) @ lora_B.T)
