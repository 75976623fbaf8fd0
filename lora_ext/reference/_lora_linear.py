"""Oracles for the fused LoRA linear and its Philox dropout mask.

Integers are held in int64 tensors and masked to 32 bits,
since PyTorch has no full unsigned 32-bit arithmetic.
"""
import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a < 2^32 (int64 tensor) and a 32-bit b.

    a * b can reach 2^64, past int64, so b is split into 16-bit halves.
    """
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo                      # < 2^48
    p_hi = a * b_hi                      # < 2^48
    t = p_lo + ((p_hi & 0xFFFF) << 16)   # < 2^49
    lo = t & _MASK32
    hi = (p_hi >> 16) + (t >> 32)        # < 2^32 by construction
    return hi, lo


def philox4x32_10(counter: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox-4x32-10 of four int64 counter-word tensors and a two-word key."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return [c0, c1, c2, c3]


def dropout_threshold(p: float) -> int:
    """32-bit words below this are dropped: floor(p * 2^32)."""
    return int(p * 4294967296.0)


def dropout_mask(like: torch.Tensor, dropout_p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """keep[i] for every element i of `like` in row-major order.

    Element i uses lane i % 4 of Philox-4x32-10 at counter (lo(i//4), hi(i//4), lo(offset),
    hi(offset)) with key (lo(seed), hi(seed)); it is kept when that word >= floor(p * 2^32).
    seed is an int or a one-element integer tensor, as the ops take it.
    """
    seed = int(seed) & ((1 << 64) - 1)
    offset &= (1 << 64) - 1
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int64)
    group = index >> 2
    lane = index & 3
    counter = [group & _MASK32, group >> 32,
               torch.full_like(group, offset & _MASK32), torch.full_like(group, offset >> 32)]
    words = torch.stack(philox4x32_10(counter, (seed & _MASK32, seed >> 32)), dim=-1)
    word = words.gather(-1, lane.unsqueeze(-1)).squeeze(-1)
    return (word >= dropout_threshold(dropout_p)).reshape(like.shape)


def dropout_seed(device="cpu") -> torch.Tensor:
    """A fresh seed from the default generator of `device`, uniform in [0, 2^62)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def lora_dropout(x: torch.Tensor, dropout_p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """drop(x) = x * mask / (1 - p), with the Philox mask above."""
    if dropout_p == 0.0:
        return x
    return x * dropout_mask(x, dropout_p, seed, offset) / (1.0 - dropout_p)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                seed: int = 0, training: bool = True, offset: int = 0, lora_bias=None) -> torch.Tensor:
    """y = x @ weight.T + bias + scaling * ((drop(x) @ lora_A.T) @ lora_B.T + lora_bias)"""
    p = dropout_p if training else 0.0
    y = torch.nn.functional.linear(x, weight, bias)
    z = lora_dropout(x, p, seed, offset) @ lora_A.T
    branch = z @ lora_B.T
    if lora_bias is not None:
        branch = branch + lora_bias
    return y + scaling * branch
