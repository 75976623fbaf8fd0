"""LoftQ: LoRA initialised so that Q + B·A approximates W, Q being W's NF4 quantisation.

PEFT 0.21's algorithm (peft/utils/loftq_utils.py), on any device:

    res = W (fp32)
    repeat loftq_iter times:
        Q = dequant(nf4(res))                    # blocksize 64, no double quantisation
        res = W - Q
        L, R = rank-r truncated SVD of res:  L = U_r·√S_r,  R = √S_r·V_rᵀ
        (except after the last round) res = W - L·R
    base ← Q, lora_A ← R, lora_B ← L

As in PEFT, B·A fits W - Q without the LoRA scaling s = lora_alpha / r, so Q + s·B·A
approximates W only for s = 1 (lora_alpha = r); other values get a warning.

This module is initialisation: it works on tensors and knows no layer or model (the layers
call it). For a model already quantised, lora_ext.loftq_model.replace_lora_weights_loftq.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import ops

LOFTQ_BLOCKSIZE = 64  # PEFT quantises with bnb's default blocksize and no double quantisation


@dataclass
class LoftQConfig:
    """PEFT's LoftQConfig: quantisation bits and alternating iterations."""

    loftq_bits: int = 4
    loftq_iter: int = 1


def check_loftq_config(loftq_config) -> tuple[int, int]:
    """(bits, iterations) from a LoftQConfig (ours or PEFT's) or its dict."""
    if loftq_config is None:
        raise ValueError("init_lora_weights='loftq' needs loftq_config (e.g. {'loftq_bits': 4, 'loftq_iter': 1})")
    config = loftq_config if isinstance(loftq_config, dict) else dict(vars(loftq_config))
    for key in ("loftq_bits", "loftq_iter"):
        if key not in config:
            raise ValueError(f"loftq_config lacks {key!r}; expected {{'loftq_bits': 4, 'loftq_iter': <n>}}, "
                             f"got {config!r}")
    bits, iters = config["loftq_bits"], config["loftq_iter"]
    if bits == 8:
        raise NotImplementedError("loftq_bits=8 (PEFT's int8 LoftQ) is not implemented by lora_ext; use loftq_bits=4")
    if bits != 4:
        raise ValueError(f"loftq_config: loftq_bits must be 4 (NF4), got {bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
        raise ValueError(f"loftq_config: loftq_iter must be a positive int, got {iters!r}")
    return bits, iters


def _nf4_roundtrip(weight: Tensor) -> Tensor:
    packed, absmax = ops.nf4_quantize(weight, LOFTQ_BLOCKSIZE)
    return ops.nf4_dequantize(packed, absmax, tuple(weight.shape), LOFTQ_BLOCKSIZE, weight.dtype)


def low_rank_factors(residual: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(L [m, r], R [r, n]) with L·R the best rank-r approximation: L = U_r·√S_r, R = √S_r·V_rᵀ."""
    if residual.dim() != 2:
        raise ValueError(f"LoftQ: the weight must be 2-D, got shape {tuple(residual.shape)}")
    if rank > min(residual.shape):
        raise ValueError(f"LoftQ: rank r = {rank} exceeds min(out, in) = {min(residual.shape)}")
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(S[:rank])
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


@torch.no_grad()
def loftq_init(weight: Tensor, num_bits: int = 4, reduced_rank: int = 16,
               num_iter: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(Q in weight's dtype and device, lora_A = R, lora_B = L), PEFT's loftq_init."""
    check_loftq_config({"loftq_bits": num_bits, "loftq_iter": num_iter})
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.dtype not in (
            torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("LoftQ: the base weight must be a 2-D float32, float16 or bfloat16 tensor (initialise "
                        "before quantising; for a quantised model use replace_lora_weights_loftq)")
    w = weight.detach().to(torch.float32)
    residual = w
    for step in range(num_iter):
        quantized = _nf4_roundtrip(residual)
        L, R = low_rank_factors(w - quantized, reduced_rank)
        if step + 1 < num_iter:
            residual = w - L @ R
    return quantized.to(weight.dtype), R, L


def warn_scaling(scaling: float) -> None:
    if scaling != 1.0:
        warnings.warn(f"LoftQ (as in PEFT) fits B·A to W - Q without the LoRA scaling; with lora_alpha / r = "
                      f"{scaling} != 1 the initial Q + s·B·A does not approximate W (set lora_alpha = r)",
                      stacklevel=3)


def loftq_layer_init(lora_A: Tensor, lora_B: Tensor, base_weight: Any, r: int, scaling: float,
                     fan_in_fan_out: bool, loftq_config) -> Tensor:
    """init_lora_weights='loftq' for one linear layer: writes A and B, returns the new base weight Q."""
    bits, iters = check_loftq_config(loftq_config)
    if fan_in_fan_out:
        raise ValueError("init_lora_weights='loftq' with fan_in_fan_out=True (Conv1D) is not supported "
                         "(PEFT's LoftQ builds adapters of the wrong orientation there)")
    if not isinstance(base_weight, Tensor) or base_weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("init_lora_weights='loftq' needs a float32, float16 or bfloat16 base weight (initialise "
                        "before quantising; for a quantised model use lora_ext.replace_lora_weights_loftq)")
    if tuple(lora_A.shape) != (r, base_weight.shape[1]) or tuple(lora_B.shape) != (base_weight.shape[0], r):
        raise ValueError(f"LoftQ: base weight {tuple(base_weight.shape)} needs lora_A [{r}, {base_weight.shape[1]}] "
                         f"and lora_B [{base_weight.shape[0]}, {r}], got {tuple(lora_A.shape)} and "
                         f"{tuple(lora_B.shape)}")
    warn_scaling(scaling)
    quantized, A, B = loftq_init(base_weight, bits, r, iters)
    with torch.no_grad():
        lora_A.copy_(A)
        lora_B.copy_(B)
    return quantized
