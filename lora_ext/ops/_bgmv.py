"""BGMV / SGMV: many LoRA adapters in one batch (wrappers, fakes, segment helper).

Row t of the batch uses adapter slot idx[t] of a stacked pool (lora_A [N, r, in],
lora_B [N, out, r], scale [N]); idx[t] = -1 means no adapter. Adapters of smaller rank
are zero-padded to r, which changes no result. BGMV reads one index per row (decode);
SGMV reads segments of consecutive rows sharing an adapter (prefill), the same numbers.

These ops serve inference: they have no backward (PEFT also refuses adapter_names in
training mode), and differentiating through them raises a RuntimeError that says so.

Out-of-range indices: on the CPU the kernels raise (naming the index and the valid
range); the CUDA kernels cannot raise without a host synchronisation, so they treat any
index outside [-1, N) as -1 (the row gets no adapter) and never access memory out of
bounds. Launch shapes depend only on tensor sizes, so the CUDA path can be captured in a
CUDA graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import SUPPORTED_DTYPES as _SUPPORTED_DTYPES

_ops = torch.ops.lora_ext
_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")


def _check_data(op: str, named: dict[str, Tensor]) -> None:
    first_name, first = next(iter(named.items()))
    if first.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {first_name} has dtype {first.dtype}; expected one of "
                        f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}")
    for name, t in named.items():
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "they must share one dtype")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")


def _check_index(op: str, name: str, t: Tensor, like: Tensor, length: int | None) -> None:
    _check_tensor(op, name, t)
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int64 or int32, got {t.dtype}")
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = f"[{length}]" if length is not None else "1-D"
        raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the data is on {like.device}")


def _check_shrink(op: str, x, lora_A) -> None:
    _check_tensor(op, "x", x)
    _check_tensor(op, "lora_A", lora_A)
    _check_data(op, {"x": x, "lora_A": lora_A})
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [T, in], got shape {tuple(x.shape)}")
    if lora_A.dim() != 3 or lora_A.shape[2] != x.shape[1]:
        raise ValueError(f"{op}: lora_A must have shape [N, r, {x.shape[1]}] to match x, "
                         f"got {tuple(lora_A.shape)}")


def _check_expand(op: str, y, z, lora_B, scale) -> None:
    for name, t in (("y", y), ("z", z), ("lora_B", lora_B), ("scale", scale)):
        _check_tensor(op, name, t)
    _check_data(op, {"y": y, "z": z, "lora_B": lora_B})
    if y.dim() != 2 or z.dim() != 2 or y.shape[0] != z.shape[0]:
        raise ValueError(f"{op}: y must be [T, out] and z [T, r] with the same T, got "
                         f"{tuple(y.shape)} and {tuple(z.shape)}")
    if lora_B.dim() != 3 or tuple(lora_B.shape[1:]) != (y.shape[1], z.shape[1]):
        raise ValueError(f"{op}: lora_B must have shape [N, {y.shape[1]}, {z.shape[1]}], "
                         f"got {tuple(lora_B.shape)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (lora_B.shape[0],):
        raise ValueError(f"{op}: scale must be float32 of shape [{lora_B.shape[0]}] (one per adapter "
                         f"slot), got {scale.dtype} {tuple(scale.shape)}")
    if scale.device != y.device:
        raise ValueError(f"{op}: scale is on {scale.device} but y is on {y.device}")
    # A NaN/Inf scale would silently poison every row of its slot. Checked on the CPU only
    # (on CUDA it would cost a host sync per call); AdapterPool.load checks on every device.
    if scale.is_cpu and not torch.compiler.is_compiling():
        finite = torch.isfinite(scale)
        if not bool(finite.all()):
            slot = int((~finite).nonzero()[0, 0])
            raise ValueError(f"{op}: scale[{slot}] = {float(scale[slot])} is not finite; every adapter "
                             "slot's scale must be a finite float")


def _check_segments(op: str, seg_starts, seg_adapter, like: Tensor) -> None:
    _check_index(op, "seg_adapter", seg_adapter, like, None)
    _check_index(op, "seg_starts", seg_starts, like, seg_adapter.shape[0] + 1)


# ---------------------------------------------------------------- BGMV


def lora_shrink(x: Tensor, lora_A: Tensor, idx: Tensor) -> Tensor:
    """z = x·A[idx]ᵀ per row: the first half of a mixed-batch LoRA.

    Semantics (reference.lora_shrink)::

        z[t] = x[t] @ lora_A[idx[t]].T   if idx[t] >= 0 else 0

    Shapes: x [T, in], lora_A [N, r, in], idx [T] (int64 or int32) -> z [T, r] (x's dtype,
    accumulated in fp32, fp64 for fp64). r = 0 (an empty pool) gives z [T, 0].
    Indices outside [-1, N): a RuntimeError naming the row on the CPU; on CUDA (no host sync
    to raise with) the kernel clamps through core::bgmv_slot, so the row reads as -1 (z[t] = 0)
    and no load leaves lora_A.
    """
    _check_shrink("lora_shrink", x, lora_A)
    _check_index("lora_shrink", "idx", idx, x, x.shape[0])
    return _ops.lora_shrink(x, lora_A, idx)


def lora_expand(y: Tensor, z: Tensor, lora_B: Tensor, idx: Tensor, scale: Tensor) -> Tensor:
    """y + scale[idx]·z·B[idx]ᵀ per row (a new tensor): the second half.

    Semantics (reference.lora_expand)::

        out[t] = y[t] + scale[idx[t]] * z[t] @ lora_B[idx[t]].T   if idx[t] >= 0 else y[t]

    Shapes: y [T, out], z [T, r], lora_B [N, out, r], idx [T], scale [N] float32 and finite
    (checked on the CPU). Indices outside [-1, N): a RuntimeError on the CPU; on CUDA the row
    reads as -1 (y[t] is copied unchanged) and neither lora_B nor scale is read out of bounds.
    """
    _check_expand("lora_expand", y, z, lora_B, scale)
    _check_index("lora_expand", "idx", idx, y, y.shape[0])
    return _ops.lora_expand(y, z, lora_B, idx, scale)


# ---------------------------------------------------------------- SGMV


def lora_shrink_sgmv(x: Tensor, lora_A: Tensor, seg_starts: Tensor, seg_adapter: Tensor) -> Tensor:
    """lora_shrink with segments: rows seg_starts[s] .. seg_starts[s+1]-1 use seg_adapter[s].

    Semantics (reference.lora_shrink_sgmv)::

        idx = reference.segments_to_idx(seg_starts, seg_adapter, T)   # -1 outside segments
        z = lora_shrink(x, lora_A, idx)

    seg_starts [S+1] is nondecreasing within [0, T]; empty segments are allowed (so a
    fixed S, e.g. S = T from segments_from_idx, needs no host synchronisation).
    A malformed table (starts out of [0, T] or decreasing, adapters outside [-1, N)) raises on
    the CPU; on CUDA each row's binary search only reads seg_starts[0..S] and seg_adapter[0..S-1],
    and its slot is clamped as in lora_shrink, so the result is some valid assignment of
    adapters (or none) to rows, never an out-of-bounds access.
    """
    _check_shrink("lora_shrink_sgmv", x, lora_A)
    _check_segments("lora_shrink_sgmv", seg_starts, seg_adapter, x)
    return _ops.lora_shrink_sgmv(x, lora_A, seg_starts, seg_adapter)


def lora_expand_sgmv(y: Tensor, z: Tensor, lora_B: Tensor, seg_starts: Tensor, seg_adapter: Tensor,
                     scale: Tensor) -> Tensor:
    """lora_expand with segments (see lora_shrink_sgmv).

    Semantics (reference.lora_expand_sgmv)::

        idx = reference.segments_to_idx(seg_starts, seg_adapter, T)
        out = lora_expand(y, z, lora_B, idx, scale)
    """
    _check_expand("lora_expand_sgmv", y, z, lora_B, scale)
    _check_segments("lora_expand_sgmv", seg_starts, seg_adapter, y)
    return _ops.lora_expand_sgmv(y, z, lora_B, seg_starts, seg_adapter, scale)


def segments_from_idx(idx: Tensor) -> tuple[Tensor, Tensor]:
    """(seg_starts [T+1], seg_adapter [T]) for runs of equal consecutive idx values.

    Computed with tensor ops only (no host synchronisation, sizes fixed by T): the real
    runs come first, the rest are empty segments at T with adapter -1.
    """
    _check_tensor("segments_from_idx", "idx", idx)
    if idx.dtype not in _INDEX_DTYPES or idx.dim() != 1:
        raise TypeError(f"segments_from_idx: idx must be a 1-D int64/int32 tensor, got "
                        f"{idx.dtype} {tuple(idx.shape)}")
    idx = idx.to(torch.int64)
    rows = idx.shape[0]
    boundary = torch.ones_like(idx, dtype=torch.bool)
    boundary[1:] = idx[1:] != idx[:-1]
    seg_id = torch.cumsum(boundary.to(torch.int64), 0) - 1
    positions = torch.arange(rows, device=idx.device, dtype=torch.int64)
    seg_starts = torch.full((rows + 1,), rows, device=idx.device, dtype=torch.int64)
    seg_starts = seg_starts.scatter_reduce(0, seg_id, positions, reduce="amin")
    seg_adapter = torch.full((rows,), -1, device=idx.device, dtype=torch.int64)
    seg_adapter = seg_adapter.scatter(0, seg_id, idx)  # every row of a run holds the same value
    return seg_starts, seg_adapter


# ---------------------------------------------------------------- fakes and (no) autograd


@torch.library.register_fake("lora_ext::lora_shrink")
def _lora_shrink_fake(x, lora_A, idx):
    return x.new_empty((x.shape[0], lora_A.shape[1]))


@torch.library.register_fake("lora_ext::lora_shrink_sgmv")
def _lora_shrink_sgmv_fake(x, lora_A, seg_starts, seg_adapter):
    return x.new_empty((x.shape[0], lora_A.shape[1]))


@torch.library.register_fake("lora_ext::lora_expand")
def _lora_expand_fake(y, z, lora_B, idx, scale):
    return y.new_empty(y.shape)


@torch.library.register_fake("lora_ext::lora_expand_sgmv")
def _lora_expand_sgmv_fake(y, z, lora_B, seg_starts, seg_adapter, scale):
    return y.new_empty(y.shape)


def _no_backward(name: str):
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"lora_ext.ops.{name} has no backward: the mixed-batch (BGMV/SGMV) path serves "
                           "inference only. Train each adapter with the regular LoRA layers.")
    torch.library.register_autograd(f"lora_ext::{name}", backward, setup_context=setup_context)


for _name in ("lora_shrink", "lora_expand", "lora_shrink_sgmv", "lora_expand_sgmv"):
    _no_backward(_name)
