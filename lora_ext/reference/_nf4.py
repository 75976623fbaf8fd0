"""Oracles for the NF4 family: 4-bit NormalFloat quantisation as bitsandbytes does it.

Every function here reproduces bitsandbytes 0.50's CPU results to the bit; the comments say
which bitsandbytes rule each line follows, since those rules (rather than "round to the
nearest code") are what a checkpoint written by bitsandbytes depends on.

Layout: a tensor of n elements, flattened row-major, is cut into ceil(n / blocksize) blocks;
each block has an fp32 absmax; element 2k goes in the high nibble of byte k, element 2k+1 in
its low nibble (an odd n pads one zero code, index 7, in the last low nibble).
"""
import math

import torch

# The NF4 codebook, exactly as bitsandbytes writes it (decimal literals rounded to fp32).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# Decision thresholds: the fp32 midpoints of neighbouring codes. A scaled value equal to a
# midpoint takes the LOWER code (bitsandbytes uses torch.bucketize with right=False).
NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def _dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)).

    Seven exponent levels 10^-6 .. 10^0; level i holds 2^i + 1 evenly spaced boundaries in
    [0.1, 1] whose midpoints, scaled by the level's power of ten, are the codes (with their
    negatives); then 0 and 1.0, sorted. Built with fp32 tensor arithmetic as bitsandbytes
    builds it, so the values match to the bit.
    """
    values: list[float] = []
    for level in range(7):
        edges = torch.linspace(0.1, 1, 2 ** level + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (level - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = _dynamic_code()


def _blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def nf4_quantize(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2), 1], absmax fp32 [ceil(n/blocksize)]) of x flattened.

        v = x.flatten().float();  absmax[b] = max |v| over block b
        s = clamp(v * (1 / max(absmax, 1e-38)), -1, 1)      # full blocks: times the reciprocal
        s = clamp(v / max(absmax, 1e-38), -1, 1)            # the last, partial block: divided
        code = number of NF4_BOUNDS strictly below s         # ties go to the lower code
        packed[k] = code[2k] << 4 | code[2k+1]
    """
    v = x.reshape(-1).float()
    n = v.numel()
    full = n - n % blocksize
    body = v[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail_max = v[full:].abs().max()
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(v[full:] / tail_max.clamp(min=1e-38), -1, 1)])
    codes = torch.bucketize(scaled, NF4_BOUNDS.to(x.device)).to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.reshape(-1, 1), absmax


def nf4_unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n 4-bit codes (int64) of packed bytes, high nibble first."""
    flat = packed.reshape(-1).to(torch.int64)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n]


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NF4_CODE[code[i]] * absmax[i // blocksize], multiplied in fp32, then cast to dtype."""
    n = math.prod(shape)
    codes = nf4_unpack(packed, n)
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (NF4_CODE.to(packed.device)[codes] * scale).to(dtype).reshape(shape)


def _dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantiser looks codes up in a 65536-entry table.

    Entry i stands for the fp32 value -1 + (2 * i) / 65535 and holds the number of code
    midpoints 0.5 * (c[j] + c[j+1]) strictly below it (the nearest code, ties to the lower).
    """
    i = torch.arange(65536, dtype=torch.float32)
    val = (2.0 * i) / 65535.0 - 1.0
    mids = 0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    return torch.bucketize(val, mids).to(torch.uint8)


_DYNAMIC_LUT = _dynamic_lut()


def _lut_index(s: torch.Tensor) -> torch.Tensor:
    """trunc(fma((clamp(s, -1, 1) + 1) * 0.5, 65535, 0.5)): the table slot of a scaled value.

    bitsandbytes' compiled code contracts the last multiply-add into one FMA; in float64 the
    product of an fp32 and 65535 is exact, so one rounding to fp32 afterwards reproduces it.
    NaN lands in slot 0, as the compiled truncation (0x80000000 -> low 16 bits) puts it.
    """
    t = (torch.clamp(s, -1.0, 1.0) + 1.0) * 0.5
    u = (t.double() * 65535.0 + 0.5).float()
    idx = torch.trunc(u).nan_to_num(0.0).to(torch.int64)
    return idx


def quantize_absmax(absmax: torch.Tensor, blocksize: int = 256):
    """Double quantisation of NF4 absmax (bitsandbytes compress_statistics=True).

        offset = absmax.mean()
        c = absmax - offset;   absmax2[b] = max |c| over block b of `blocksize`
        codes[i] = LUT[slot(c[i] * (1 / absmax2[b]))]       # 0 for a block whose absmax2 is 0
    Returns (codes uint8 [n], absmax2 fp32 [ceil(n/blocksize)], offset 0-d fp32).
    """
    a = absmax.float().reshape(-1)
    offset = a.mean()
    c = a - offset
    n = c.numel()
    nb = _blocks(n, blocksize)
    padded = torch.nn.functional.pad(c, (0, nb * blocksize - n)).reshape(nb, blocksize)
    absmax2 = padded.abs().amax(dim=1)
    inv = 1.0 / absmax2
    scaled = (padded * inv.unsqueeze(1)).reshape(-1)[:n]
    codes = _DYNAMIC_LUT.to(a.device)[_lut_index(scaled)]
    zero_block = (absmax2 == 0).repeat_interleave(blocksize)[:n]
    codes = torch.where(zero_block, torch.zeros_like(codes), codes)
    return codes, absmax2, offset


def dequantize_absmax(codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = 256) -> torch.Tensor:
    """DYNAMIC_CODE[codes[i]] * absmax2[i // blocksize] + offset, each step rounded to fp32."""
    n = codes.numel()
    scale = absmax2.float().repeat_interleave(blocksize)[:n]
    return DYNAMIC_CODE.to(codes.device)[codes.reshape(-1).long()] * scale + offset.float()


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, out_features: int,
               blocksize: int = 64, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W).T + bias, with W [out_features, in] dequantised to x's dtype."""
    in_features = x.shape[-1]
    w = nf4_dequantize(packed, absmax, (out_features, in_features), blocksize, x.dtype)
    return torch.nn.functional.linear(x, w, bias)
