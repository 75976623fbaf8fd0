"""BGMV / SGMV ops (lora_shrink, lora_expand and their segment variants) against the
pure-PyTorch reference under the tolerance rule; opcheck, torch.compile, odd shapes,
non-contiguous inputs, empty batches, every dtype, bad input; the adapter pool."""
from __future__ import annotations

import pytest
import torch

from lora_ext import ops, reference
from lora_ext.serving import AdapterPool

from lora_testing import DEVICES, assert_within_torch_error, relayout

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_pool(n, r, in_f, out_f, *, ranks=None, dtype=torch.float32, device="cpu", seed=0):
    """Stacked adapters; ranks (per slot) below r are zero-padded as the pool pads them."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r, in_f, generator=gen, dtype=torch.float64) / in_f ** 0.5
    B = torch.randn(n, out_f, r, generator=gen, dtype=torch.float64) / r ** 0.5
    if ranks is not None:
        for a, ra in enumerate(ranks):
            A[a, ra:] = 0
            B[a, :, ra:] = 0
    scale = torch.rand(n, generator=gen, dtype=torch.float64).to(torch.float32) * 2 + 0.5
    return A.to(device, dtype), B.to(device, dtype), scale.to(device)


def make_idx(rows, n, *, seed=1, device="cpu", dtype=torch.int64, none_every=3):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, max(n, 1), (rows,), generator=gen)
    if none_every:
        idx[::none_every] = -1
    return idx.to(device=device, dtype=dtype)


def rand(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def check_shrink(x, A, idx, sgmv=None):
    """ours vs reference in x's precision vs fp64 oracle (and |.| for the floor)."""
    if sgmv is None:
        ours, ref = ops.lora_shrink(x, A, idx), reference.lora_shrink
        args = (idx,)
    else:
        ours, ref = ops.lora_shrink_sgmv(x, A, *sgmv), reference.lora_shrink_sgmv
        args = sgmv
    torchs = ref(x, A, *args)
    oracle = ref(x.double(), A.double(), *args)
    magnitude = ref(x.double().abs(), A.double().abs(), *args)
    assert_within_torch_error(ours, torchs, oracle, magnitude, "z")
    return ours


def check_expand(y, z, B, idx, scale, sgmv=None):
    if sgmv is None:
        ours, ref, args = ops.lora_expand(y, z, B, idx, scale), reference.lora_expand, (idx,)
    else:
        ours, ref, args = ops.lora_expand_sgmv(y, z, B, *sgmv, scale), reference.lora_expand_sgmv, sgmv
    torchs = ref(y, z, B, *args, scale)
    oracle = ref(y.double(), z.double(), B.double(), *args, scale)
    magnitude = ref(y.double().abs(), z.double().abs(), B.double().abs(), *args, scale.abs())
    assert_within_torch_error(ours, torchs, oracle, magnitude, "y")
    return ours


# ================================================================ against the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,r,in_f,out_f", [
    (1, 1, 1, 1, 1), (7, 3, 5, 33, 17), (64, 16, 16, 128, 96), (40, 64, 8, 65, 130), (19, 2, 3, 300, 7)])
def test_bgmv_matches_reference(device, dtype, rows, n, r, in_f, out_f):
    A, B, scale = make_pool(n, r, in_f, out_f, dtype=dtype, device=device)
    idx = make_idx(rows, n, device=device)
    x = rand((rows, in_f), dtype, device, 2)
    y = rand((rows, out_f), dtype, device, 3)
    z = check_shrink(x, A, idx)
    out = check_expand(y, z, B, idx, scale)
    none = idx == -1
    assert torch.equal(z[none], torch.zeros_like(z[none]))
    assert torch.equal(out[none], y[none])  # rows without an adapter are untouched, bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgmv_matches_reference_and_bgmv(device, dtype):
    n, r, in_f, out_f = 5, 8, 70, 45
    A, B, scale = make_pool(n, r, in_f, out_f, dtype=dtype, device=device)
    # segments with gaps, empty segments and a -1 segment; rows 0-1 and 29 outside every segment
    seg_starts = torch.tensor([2, 6, 6, 13, 20, 29], device=device)
    seg_adapter = torch.tensor([3, 0, -1, 4, 1], device=device)
    rows = 30
    x = rand((rows, in_f), dtype, device, 4)
    y = rand((rows, out_f), dtype, device, 5)
    z = check_shrink(x, A, None, (seg_starts, seg_adapter))
    out = check_expand(y, z, B, None, scale, (seg_starts, seg_adapter))
    idx = reference.segments_to_idx(seg_starts, seg_adapter, rows)
    torch.testing.assert_close(z, ops.lora_shrink(x, A, idx), rtol=0, atol=0)
    torch.testing.assert_close(out, ops.lora_expand(y, z, B, idx, scale), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_segments_from_idx(device):
    idx = torch.tensor([2, 2, -1, 0, 0, 0, 2, 1, 1], device=device)
    seg_starts, seg_adapter = ops.segments_from_idx(idx)
    assert seg_starts.shape == (10,) and seg_adapter.shape == (9,)
    assert seg_starts[:7].tolist() == [0, 2, 3, 6, 7, 9, 9]
    assert seg_adapter[:5].tolist() == [2, -1, 0, 2, 1] and set(seg_adapter[5:].tolist()) == {-1}
    assert torch.equal(reference.segments_to_idx(seg_starts, seg_adapter, 9), idx)
    empty_starts, empty_adapter = ops.segments_from_idx(idx[:0])
    assert empty_starts.tolist() == [0] and empty_adapter.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_ranks_padded_equal_unpadded(device):
    """Adapters of ranks 2, 8 and 5 in one pool padded to 8 give each adapter's own result."""
    ranks = [2, 8, 5]
    A, B, scale = make_pool(3, 8, 40, 24, ranks=ranks, dtype=torch.float64, device=device)
    idx = torch.tensor([0, 1, 2, -1, 2, 0], device=device)
    x = rand((6, 40), torch.float64, device, 6)
    y = rand((6, 24), torch.float64, device, 7)
    out = ops.lora_expand(y, ops.lora_shrink(x, A, idx), B, idx, scale)
    for t, a in enumerate(idx.tolist()):
        if a < 0:
            want = y[t]
        else:
            ra = ranks[a]
            want = y[t] + scale[a].double() * (B[a, :, :ra] @ (A[a, :ra] @ x[t]))
        torch.testing.assert_close(out[t], want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_inputs(device, layout):
    A, B, scale = make_pool(4, 6, 30, 20, device=device)
    idx = make_idx(11, 4, device=device, dtype=torch.int32)
    x = rand((11, 30), torch.float32, device, 8)
    y = rand((11, 20), torch.float32, device, 9)
    z = ops.lora_shrink(x, A, idx)
    out = ops.lora_expand(y, z, B, idx, scale)
    A_nc = A.transpose(1, 2).contiguous().transpose(1, 2)
    B_nc = B.transpose(1, 2).contiguous().transpose(1, 2)
    idx_nc = relayout(idx, "strided")
    z2 = ops.lora_shrink(relayout(x, layout), A_nc, idx_nc)
    out2 = ops.lora_expand(relayout(y, layout), relayout(z, layout), B_nc, idx_nc, relayout(scale, "strided"))
    torch.testing.assert_close(z2, z, rtol=0, atol=0)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_empty_pool(device):
    A, B, scale = make_pool(3, 4, 10, 12, device=device)
    idx = torch.zeros(0, dtype=torch.int64, device=device)
    z = ops.lora_shrink(torch.zeros(0, 10, device=device), A, idx)
    assert z.shape == (0, 4)
    out = ops.lora_expand(torch.zeros(0, 12, device=device), z, B, idx, scale)
    assert out.shape == (0, 12)
    # a pool with no slots: every row must be -1
    x = rand((3, 10), torch.float32, device, 1)
    none = torch.full((3,), -1, device=device)
    z = ops.lora_shrink(x, A[:0], none)
    assert torch.equal(z, torch.zeros(3, 4, device=device))
    y = rand((3, 12), torch.float32, device, 2)
    assert torch.equal(ops.lora_expand(y, z, B[:0], none, scale[:0]), y)


def test_expand_does_not_modify_y():
    A, B, scale = make_pool(2, 4, 10, 12)
    idx = torch.tensor([0, 1, 1])
    y = rand((3, 12), torch.float32, "cpu", 1)
    y_before = y.clone()
    ops.lora_expand(y, ops.lora_shrink(rand((3, 10), torch.float32, "cpu", 2), A, idx), B, idx, scale)
    assert torch.equal(y, y_before)


# ================================================================ bad input


def test_out_of_range_idx_raises_on_cpu():
    A, B, scale = make_pool(3, 4, 10, 12)
    x = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match=r"idx\[2\] = 3 is out of range.*\[0, 3\)"):
        ops.lora_shrink(x, A, torch.tensor([0, 1, 3, -1]))
    with pytest.raises(RuntimeError, match=r"idx\[0\] = -2 is out of range"):
        ops.lora_expand(torch.randn(4, 12), torch.randn(4, 4), B, torch.tensor([-2, 1, 0, -1]), scale)
    with pytest.raises(RuntimeError, match=r"seg_adapter\[1\] = 7 is out of range"):
        ops.lora_shrink_sgmv(x, A, torch.tensor([0, 2, 4]), torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match="nondecreasing"):
        ops.lora_shrink_sgmv(x, A, torch.tensor([0, 3, 2]), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"seg_starts must lie in \[0, 4\]"):
        ops.lora_shrink_sgmv(x, A, torch.tensor([0, 2, 5]), torch.tensor([0, 1]))


@pytest.mark.parametrize("call,error,match", [
    (lambda A, B, s: ops.lora_shrink(torch.randn(4, 9), A, torch.zeros(4, dtype=torch.int64)),
     ValueError, r"lora_A must have shape \[N, r, 9\]"),
    (lambda A, B, s: ops.lora_shrink(torch.randn(4, 10).double(), A, torch.zeros(4, dtype=torch.int64)),
     TypeError, "lora_A has dtype torch.float32 but x has torch.float64"),
    (lambda A, B, s: ops.lora_shrink(torch.randn(4, 10), A, torch.zeros(4)),
     TypeError, "idx must be int64 or int32"),
    (lambda A, B, s: ops.lora_shrink(torch.randn(4, 10), A, torch.zeros(3, dtype=torch.int64)),
     ValueError, r"idx must have shape \[4\]"),
    (lambda A, B, s: ops.lora_shrink(torch.randn(2, 4, 10), A, torch.zeros(2, dtype=torch.int64)),
     ValueError, "x must be 2-D"),
    (lambda A, B, s: ops.lora_shrink(torch.randn(4, 10).int(), A, torch.zeros(4, dtype=torch.int64)),
     TypeError, "x has dtype torch.int32"),
    (lambda A, B, s: ops.lora_expand(torch.randn(4, 12), torch.randn(4, 4), B, torch.zeros(4, dtype=torch.int64),
                                     s.double()), ValueError, "scale must be float32 of shape"),
    (lambda A, B, s: ops.lora_expand(torch.randn(4, 11), torch.randn(4, 4), B, torch.zeros(4, dtype=torch.int64), s),
     ValueError, r"lora_B must have shape \[N, 11, 4\]"),
    (lambda A, B, s: ops.lora_expand(torch.randn(4, 12), torch.randn(3, 4), B, torch.zeros(4, dtype=torch.int64), s),
     ValueError, "same T"),
    (lambda A, B, s: ops.lora_expand_sgmv(torch.randn(4, 12), torch.randn(4, 4), B, torch.tensor([0, 4]),
                                          torch.tensor([0, 1]), s), ValueError, r"seg_starts must have shape \[3\]"),
    (lambda A, B, s: ops.lora_shrink([[1.0]], A, torch.zeros(1, dtype=torch.int64)),
     TypeError, "x must be a Tensor"),
])
def test_bad_input_messages(call, error, match):
    A, B, scale = make_pool(3, 4, 10, 12)
    with pytest.raises(error, match=match):
        call(A, B, scale)


def test_no_backward_raises_clearly():
    A, B, scale = make_pool(2, 4, 10, 12)
    x = torch.randn(3, 10, requires_grad=True)
    z = ops.lora_shrink(x, A, torch.tensor([0, 1, -1]))
    with pytest.raises(RuntimeError, match="has no backward: the mixed-batch"):
        z.sum().backward()


# ================================================================ opcheck and compile


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [0, 1, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, rows, dtype):
    A, B, scale = make_pool(4, 5, 12, 7, dtype=dtype, device=device)
    idx = make_idx(rows, 4, device=device)
    x = rand((rows, 12), dtype, device, 1)
    y = rand((rows, 7), dtype, device, 2)
    z = ops.lora_shrink(x, A, idx)
    starts, adapters = ops.segments_from_idx(idx)
    torch.library.opcheck(torch.ops.lora_ext.lora_shrink.default, (x, A, idx))
    torch.library.opcheck(torch.ops.lora_ext.lora_expand.default, (y, z, B, idx, scale))
    torch.library.opcheck(torch.ops.lora_ext.lora_shrink_sgmv.default, (x, A, starts, adapters))
    torch.library.opcheck(torch.ops.lora_ext.lora_expand_sgmv.default, (y, z, B, starts, adapters, scale))


def test_compile_fullgraph_matches_eager():
    A, B, scale = make_pool(6, 8, 32, 24)
    idx = make_idx(10, 6)
    x = rand((10, 32), torch.float32, "cpu", 1)
    y = rand((10, 24), torch.float32, "cpu", 2)

    def step(x, y, idx):
        z = ops.lora_shrink(x, A, idx)
        out = ops.lora_expand(y, z, B, idx, scale)
        starts, adapters = ops.segments_from_idx(idx)
        z2 = ops.lora_shrink_sgmv(x, A, starts, adapters)
        return out, ops.lora_expand_sgmv(y, z2, B, starts, adapters, scale)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(x, y, idx), step(x, y, idx)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the segments variant and BGMV agree
    out, out_sgmv = step(x, y, idx)
    torch.testing.assert_close(out, out_sgmv, rtol=0, atol=0)


# ================================================================ the adapter pool


def test_pool_grows_geometrically_and_touches_one_slot():
    pool = AdapterPool(10, 12, torch.device("cpu"), torch.float32)
    weights = {}
    for i in range(5):
        r = 2 + i % 3
        weights[f"a{i}"] = (torch.randn(r, 10), torch.randn(12, r), 0.5 + i)
        pool.load(f"a{i}", *weights[f"a{i}"])
    assert pool.capacity == 8 and pool.rank == 4
    assert pool.slots == {f"a{i}": i for i in range(5)}
    A_before, B_before = pool.lora_A.clone(), pool.lora_B.clone()
    storage = pool.lora_A.data_ptr()
    new = (torch.randn(3, 10), torch.randn(12, 3), 9.0)
    pool.load("a2", *new)  # refresh: only slot 2 changes, no re-stack
    assert pool.lora_A.data_ptr() == storage
    others = [0, 1, 3, 4]
    assert torch.equal(pool.lora_A[others], A_before[others]) and torch.equal(pool.lora_B[others], B_before[others])
    assert torch.equal(pool.lora_A[2, :3], new[0]) and torch.equal(pool.lora_A[2, 3:], torch.zeros(1, 10))
    assert pool.scale[2].item() == 9.0
    pool.remove("a1")
    assert "a1" not in pool.slots and pool.scale[1].item() == 0.0
    pool.load("b", torch.randn(2, 10), torch.randn(12, 2), 1.0)
    assert pool.slots["b"] == 1 and pool.lora_A.data_ptr() == storage  # the freed slot is reused
    idx, any_adapter = pool.indices(["b", "__base__", "a4", "unknown"])
    assert idx.tolist() == [1, -1, 4, -1] and any_adapter
    assert pool.indices(["__base__"])[1] is False
    with pytest.raises(ValueError, match=r"expected lora_A \[r, 10\]"):
        pool.load("c", torch.randn(2, 11), torch.randn(12, 2), 1.0)
