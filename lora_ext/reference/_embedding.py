"""Oracle for the Embedding LoRA: PEFT's lora.Embedding forward for one adapter."""
import torch
import torch.nn.functional as F


def lora_embedding(indices: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, scaling: float, padding_idx: int | None = None) -> torch.Tensor:
    """y = weight[indices] + scaling * lora_A.T[indices] @ lora_B.T, in weight's dtype.

    The base lookup runs in weight's dtype, the adapter term in the adapters' dtype, and the
    sum is rounded to weight's dtype, as PEFT does (also for fp32 adapters over a half table).
    padding_idx changes only the gradient: the table rows it names get none, from any token.
    """
    base = F.embedding(indices, weight, padding_idx=padding_idx)
    after_A = F.embedding(indices, lora_A.T, padding_idx=padding_idx)
    return (base + (after_A @ lora_B.T) * scaling).to(weight.dtype)
