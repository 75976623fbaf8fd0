"""Oracles for LoRA on convolutions: PEFT's lora.Conv1d/2d/3d forward for one adapter."""
import torch
import torch.nn.functional as F

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def lora_conv_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """weight + scaling * reshape(lora_B @ lora_A), in weight's dtype (groups 1)."""
    r = lora_A.shape[0]
    delta = (lora_B.reshape(weight.shape[0], r) @ lora_A.reshape(r, -1)).reshape(weight.shape)
    return (weight + delta * scaling).to(weight.dtype)


def lora_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
              lora_B: torch.Tensor, scaling: float, stride, padding) -> torch.Tensor:
    """conv(x, W, b) + scaling * conv_1x1(conv(x, A), B): PEFT's three convolutions, where
    lora_A has the base's kernel, stride and padding and lora_B is 1x1 (dilation 1, groups 1)."""
    conv = _CONV[weight.dim()]
    z = conv(x, lora_A, None, stride, padding)
    return conv(x, weight, bias, stride, padding) + conv(z, lora_B) * scaling


def dora_conv(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, stride, padding) -> torch.Tensor:
    """PEFT's DoRA conv: base(x) + (g - 1)·conv(x, W) + g·s·conv_1x1(conv(x, A), B), g = magnitude
    / ‖W + s·B·A‖ per output channel (the norm detached)."""
    conv = _CONV[weight.dim()]
    r, out = lora_A.shape[0], weight.shape[0]
    merged = weight + scaling * (lora_B.reshape(out, r) @ lora_A.reshape(r, -1)).reshape(weight.shape).detach()
    channel = (-1,) + (1,) * (weight.dim() - 2)
    g = (magnitude.reshape(-1) / torch.linalg.vector_norm(merged.reshape(out, -1), dim=1).detach()).reshape(channel)
    base = conv(x, weight, None, stride, padding)
    y = base + (g - 1) * base + g * conv(conv(x, lora_A, None, stride, padding), lora_B) * scaling
    return y if bias is None else y + bias.reshape(channel)
