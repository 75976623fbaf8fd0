"""Embedding LoRA (PEFT's lora.Embedding, one adapter): wrapper, fakes and autograd."""
import math

import torch
from torch import Tensor

from ._common import SUPPORTED_DTYPES as _SUPPORTED_DTYPES

_ops = torch.ops.lora_ext
_INDEX_DTYPES = (torch.int64, torch.int32)
_HALF = (torch.float16, torch.bfloat16)


def lora_embedding_dtypes_ok(table_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """Whether lora_embedding takes adapters of adapter_dtype over a table of table_dtype:
    the same dtype, or float32 adapters over a half table (PEFT's autocast_adapter_dtype)."""
    return table_dtype in _SUPPORTED_DTYPES and (
        adapter_dtype == table_dtype or (adapter_dtype == torch.float32 and table_dtype in _HALF))


def _check(indices, weight, lora_A, lora_B, scaling, padding_idx) -> int:
    """Raise on bad arguments; the padding index normalised to [0, V) or -1 (none)."""
    op = "lora_embedding"
    for name, t in (("indices", indices), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: indices must be int64 or int32, got {indices.dtype}")
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: weight has dtype {weight.dtype}; expected one of "
                        f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"{op}: lora_A has dtype {lora_A.dtype} but lora_B has {lora_B.dtype}; "
                        "they must share one dtype")
    if not lora_embedding_dtypes_ok(weight.dtype, lora_A.dtype):
        raise TypeError(f"{op}: adapters in {lora_A.dtype} over a {weight.dtype} table; expected the "
                        "table's dtype, or float32 adapters over a float16/bfloat16 table")
    for name, t in (("indices", indices), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but weight is on {weight.device}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [num_embeddings, dim], got shape {tuple(weight.shape)}")
    num, dim = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != num or lora_A.shape[0] < 1:
        raise ValueError(f"{op}: lora_A must have shape [r, {num}] with r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (dim, r):
        raise ValueError(f"{op}: lora_B must have shape [{dim}, {r}], got {tuple(lora_B.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"{op}: scaling must be a finite float, got {scaling!r}")
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not -num <= padding_idx < num:
        raise ValueError(f"{op}: padding_idx must be None or an int in [-{num}, {num}) (as for "
                         f"nn.Embedding), got {padding_idx!r}")
    return padding_idx % num


def lora_embedding(indices: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                   padding_idx: int | None = None) -> Tensor:
    """Fused Embedding LoRA: the base lookup and the adapter term in one pass per token.

    Semantics (reference.lora_embedding)::

        y = weight[indices] + scaling * lora_A.T[indices] @ lora_B.T     # in weight's dtype

    Shapes: indices any shape (int64/int32), weight [V, dim] (nn.Embedding's table),
    lora_A [r, V], lora_B [dim, r] (PEFT's lora_embedding_A / lora_embedding_B) -> y
    [*indices.shape, dim]. Each token gathers its table row and the r values of its column
    of lora_A, and adds their rank-r expansion, accumulated in fp32 (fp64 for fp64) and
    rounded once to weight's dtype, as PEFT rounds the same sum. Adapters share weight's
    dtype, or are fp32 over a half table (PEFT's autocast_adapter_dtype). torch.autocast does
    not change the op: PEFT's base lookup is not autocast either, and the adapter term is
    already accumulated in fp32.

    padding_idx (None, or as for nn.Embedding) changes only the gradient: tokens equal to it
    give the table rows they read (weight's and lora_A's column) no gradient, as
    F.embedding's padding_idx does in PEFT's layer. Indices outside [0, V): an IndexError on
    the CPU; on CUDA (no host sync to raise with) that token's output row is zeros.

    Backward: grad_B = s·gᵀ·A[:, idx]ᵀ and grad_z = g·B as GEMMs in fp32, then the
    per-index sums into lora_A's columns (and weight's rows when it requires grad) by a
    deterministic segment-sum kernel over the sorted indices, rounded once.
    """
    pad = _check(indices, weight, lora_A, lora_B, scaling, padding_idx)
    return _ops.lora_embedding_forward(indices, weight, lora_A, lora_B, float(scaling), pad)


@torch.library.register_fake("lora_ext::lora_embedding_forward")
def _forward_fake(indices, weight, lora_A, lora_B, scaling, padding_idx):
    return weight.new_empty((*indices.shape, weight.shape[1]))


@torch.library.register_fake("lora_ext::lora_embedding_backward")
def _backward_fake(grad_y, indices, lora_A, lora_B, scaling, padding_idx, output_mask):
    shapes = ((lora_A.shape[1], lora_B.shape[0]), tuple(lora_A.shape), tuple(lora_B.shape))
    likes = (grad_y, lora_A, lora_B)
    return tuple(like.new_empty(shape if needed else (0,))
                 for like, shape, needed in zip(likes, shapes, output_mask))


def _setup_context(ctx, inputs, output):
    indices, weight, lora_A, lora_B, scaling, padding_idx = inputs
    ctx.save_for_backward(indices, weight, lora_A, lora_B)
    ctx.scalars = (scaling, padding_idx)


def _backward(ctx, grad_y):
    indices, weight, lora_A, lora_B = ctx.saved_tensors
    scaling, padding_idx = ctx.scalars
    need_w, need_a, need_b = ctx.needs_input_grad[1:4]
    if torch.is_grad_enabled():
        return _backward_differentiable(ctx, grad_y, indices, weight, lora_A, lora_B)
    grad_w, grad_a, grad_b = _ops.lora_embedding_backward(
        grad_y, indices, lora_A, lora_B, scaling, padding_idx, [need_w, need_a, need_b])
    return (None, grad_w if need_w else None, grad_a if need_a else None,
            grad_b if need_b else None, None, None)


def _backward_differentiable(ctx, grad_y, indices, weight, lora_A, lora_B):
    """The same gradients through the reference's PyTorch ops, for create_graph=True (higher
    derivatives), where being right matters more than speed."""
    from ..reference import lora_embedding as reference
    scaling, padding_idx = ctx.scalars
    wanted = [(i, t) for i, t in ((1, weight), (2, lora_A), (3, lora_B)) if ctx.needs_input_grad[i]]
    with torch.enable_grad():
        y = reference(indices, weight, lora_A, lora_B, scaling, None if padding_idx < 0 else padding_idx)
        grads = torch.autograd.grad(y, [t for _, t in wanted], grad_y, create_graph=True)
    result = [None] * 6
    for (i, _), grad in zip(wanted, grads):
        result[i] = grad
    return tuple(result)


torch.library.register_autograd("lora_ext::lora_embedding_forward", _backward,
                                setup_context=_setup_context)
