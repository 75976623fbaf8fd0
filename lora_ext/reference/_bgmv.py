"""Oracles for BGMV / SGMV (many adapters in one batch), computed in the inputs' dtype."""
import torch


def _with_zero_slot(pool: torch.Tensor) -> torch.Tensor:
    """The pool plus one zero slot at index N, which rows with idx -1 read (so an empty
    pool, N = 0, needs no special case)."""
    return torch.cat([pool, pool.new_zeros((1, *pool.shape[1:]))])


def _slots(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.where(idx >= 0, idx, n)


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """z[t] = x[t] @ lora_A[idx[t]].T, or 0 where idx[t] == -1."""
    has_adapter = idx >= 0
    A_rows = _with_zero_slot(lora_A)[_slots(idx, lora_A.shape[0])]   # [T, r, in]
    z = torch.bmm(A_rows, x.unsqueeze(-1)).squeeze(-1)      # [T, r]
    return torch.where(has_adapter.unsqueeze(-1), z, torch.zeros_like(z))


def lora_expand(y: torch.Tensor, z: torch.Tensor, lora_B: torch.Tensor, idx: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """out[t] = y[t] + scale[idx[t]] * z[t] @ lora_B[idx[t]].T, or y[t] where idx[t] == -1."""
    has_adapter = idx >= 0
    slot = _slots(idx, lora_B.shape[0])
    B_rows = _with_zero_slot(lora_B)[slot]                  # [T, out, r]
    delta = torch.bmm(B_rows, z.unsqueeze(-1)).squeeze(-1)  # [T, out]
    delta = delta * _with_zero_slot(scale)[slot].to(delta.dtype).unsqueeze(-1)
    return torch.where(has_adapter.unsqueeze(-1), y + delta, y)


def segments_to_idx(seg_starts: torch.Tensor, seg_adapter: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row adapter index of SGMV segments: row t in [seg_starts[s], seg_starts[s+1]) gets
    seg_adapter[s]; rows outside every segment get -1."""
    idx = torch.full((rows,), -1, dtype=torch.int64, device=seg_adapter.device)
    for s in range(seg_adapter.shape[0]):
        idx[int(seg_starts[s]):int(seg_starts[s + 1])] = int(seg_adapter[s])
    return idx


def lora_shrink_sgmv(x, lora_A, seg_starts, seg_adapter):
    return lora_shrink(x, lora_A, segments_to_idx(seg_starts, seg_adapter, x.shape[0]))


def lora_expand_sgmv(y, z, lora_B, seg_starts, seg_adapter, scale):
    return lora_expand(y, z, lora_B, segments_to_idx(seg_starts, seg_adapter, y.shape[0]), scale)
