"""Fused LoRA linear (lora_ext.ops.lora_linear) and its dropout mask, against
lora_ext.reference, the oracle."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ext import ops, reference
from lora_testing import (DEVICES, PARAM_NAMES, assert_matches_reference, make_lora_inputs,
                          random_like, relayout)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


# ================================================================ accuracy vs reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_matches_reference_per_dtype(device, dtype, dropout_p, bias):
    inputs = make_lora_inputs((3, 5, 37), 29, 7, dtype=dtype, device=device, bias=bias)
    assert_matches_reference(inputs, dropout_p=dropout_p, seed=17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("lead", [(), (1,), (6,), (2, 3), (2, 2, 3)], ids=str)
@pytest.mark.parametrize("in_f,out_f,r", [(13, 37, 1), (37, 13, 7), (129, 13, 16),
                                          (13, 129, 16), (64, 37, 256)], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_shapes(dtype, lead, in_f, out_f, r, dropout_p):
    inputs = make_lora_inputs((*lead, in_f), out_f, r, dtype=dtype)
    assert_matches_reference(inputs, dropout_p=dropout_p, seed=3, offset=5)


NON_CONTIGUOUS = {
    "x_transposed": {"x": "transposed"},
    "x_strided": {"x": "strided"},
    "x_batch_transposed": {"x": "batch_transposed"},
    "weight_transposed": {"weight": "transposed"},
    "lora_A_transposed": {"lora_A": "transposed"},
    "lora_B_transposed": {"lora_B": "transposed"},
    "lora_A_strided": {"lora_A": "strided"},
    "bias_strided": {"bias": "strided"},
    "all": {"x": "strided", "weight": "transposed", "bias": "strided",
            "lora_A": "transposed", "lora_B": "strided"},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layouts", NON_CONTIGUOUS.values(), ids=NON_CONTIGUOUS.keys())
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_non_contiguous_inputs(device, layouts, dropout_p):
    inputs = make_lora_inputs((4, 6, 13), 11, 5, device=device, layouts=layouts)
    assert_matches_reference(inputs, dropout_p=dropout_p, seed=21)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_shape", [(0, 13), (2, 0, 13)], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_empty_batch(device, x_shape, dropout_p):
    inputs = make_lora_inputs(x_shape, 7, 3, device=device)
    y = ops.lora_linear(*inputs.args(), 2.0, dropout_p, 1)
    assert y.shape == (*x_shape[:-1], 7)
    y.sum().backward()
    assert inputs.x.grad.shape == x_shape
    for name in ("weight", "bias", "lora_A", "lora_B"):
        grad = getattr(inputs, name).grad
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad)), name
    assert_matches_reference(make_lora_inputs(x_shape, 7, 3, device=device),
                             dropout_p=dropout_p, seed=1)


GRAD_SETS = {
    "all": PARAM_NAMES,
    "frozen_base": ("x", "lora_A", "lora_B"),          # the LoRA training fast path
    "adapter_only": ("lora_A", "lora_B"),              # first layer: x is data
    "base_only": ("x", "weight", "bias"),              # adapter frozen
    "weight_and_B": ("weight", "lora_B"),
    "only_x": ("x",),
    "bias_and_B": ("bias", "lora_B"),
}


@pytest.mark.parametrize("grad_names", GRAD_SETS.values(), ids=GRAD_SETS.keys())
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_gradients_for_any_requires_grad_set(grad_names, dropout_p):
    """W and bias requiring grad get correct gradients; frozen tensors get none."""
    inputs = make_lora_inputs((3, 4, 13), 9, 4, requires_grad=grad_names)
    assert_matches_reference(inputs, dropout_p=dropout_p, seed=8)
    ops.lora_linear(*inputs.args(), 1.5, dropout_p, 8).sum().backward()
    for name, t in inputs.named().items():
        assert (t.grad is not None) == (name in grad_names), name


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_realistic_layer_size(device, dtype):
    inputs = make_lora_inputs((2, 256, 1024), 1024, 64, dtype=dtype, device=device,
                              requires_grad=("x", "lora_A", "lora_B"))
    assert_matches_reference(inputs, scaling=2.0, dropout_p=0.05, seed=2024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_row_tiles_that_split_philox_groups(dtype):
    # On CPU the low-rank work runs over tiles of about 64K elements of x; with 13 features a
    # tile ends mid Philox group (4 elements), so the mask of a tile starts off a group edge.
    inputs = make_lora_inputs((3 * 5041 + 7, 13), 6, 3, dtype=dtype,
                              requires_grad=("x", "lora_A", "lora_B"))
    assert_matches_reference(inputs, scaling=1.5, dropout_p=0.3, seed=77)


@pytest.mark.parametrize("grad_layout", ["transposed", "strided", "batch_transposed", "expanded"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_non_contiguous_incoming_gradient(grad_layout, dropout_p):
    inputs = make_lora_inputs((4, 6, 13), 11, 5)
    assert_matches_reference(inputs, dropout_p=dropout_p, seed=6, grad_layout=grad_layout)


@pytest.mark.parametrize("seed,offset", [(0, 0), (-1, 3), (2**40 + 5, -7), (-2**63, 2**33 + 1),
                                         (2**64 - 1, 2**63)], ids=str)
def test_dropout_matches_reference_for_any_seed_and_offset(seed, offset):
    inputs = make_lora_inputs((5, 3, 13), 9, 4, dtype=torch.float64)
    assert_matches_reference(inputs, dropout_p=0.3, seed=seed, offset=offset)


def test_in_place_parameter_update_before_backward_is_caught():
    inputs = make_lora_inputs((4, 13), 9, 4, requires_grad=("x", "lora_A"))
    y = ops.lora_linear(*inputs.args(), 1.0, 0.1, 5)
    with torch.no_grad():
        inputs.lora_B.mul_(2)
    with pytest.raises(RuntimeError, match="lora_B was modified in place"):
        y.sum().backward()


# ================================================================ dropout mask


MASK_CASES = [  # (shape, p, seed, offset)
    ((1,), 0.5, 0, 0),
    ((3,), 0.1, 1, 0),
    ((5,), 0.5, -1, -1),
    ((7, 13), 0.05, 2**32 + 3, 2**32 + 9),
    ((1001,), 0.3, -2**63, 2**63 - 1),
    ((3, 5, 7), 0.9, 2**64 - 1, 2**40),
    ((4099,), 0.5, 123456789, -(2**35)),
    ((2, 17, 9), 0.0, 42, 7),
    ((33,), 0.999, 7, 0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,p,seed,offset", MASK_CASES, ids=str)
def test_mask_matches_reference_bitwise(device, shape, p, seed, offset):
    like = torch.empty(shape, device=device)
    mask = ops.dropout_mask(like, p, seed, offset)
    assert mask.dtype == torch.bool and mask.shape == like.shape and mask.device == like.device
    assert torch.equal(mask.cpu(), reference.dropout_mask(like.cpu(), p, seed, offset))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,p,seed,offset", MASK_CASES + [((2**20 + 5,), 0.1, 99, 3)],
                         ids=str)
def test_cuda_mask_equals_cpu_mask_bitwise(shape, p, seed, offset):
    cpu = ops.dropout_mask(torch.empty(shape), p, seed, offset)
    cuda = ops.dropout_mask(torch.empty(shape, device="cuda"), p, seed, offset)
    assert cuda.is_cuda
    assert torch.equal(cuda.cpu(), cpu)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(numel=st.integers(1, 300), p=st.floats(0.0, 0.99),
       seed=st.integers(-(2**63), 2**64 - 1), offset=st.integers(-(2**63), 2**64 - 1))
def test_mask_matches_reference_property(numel, p, seed, offset):
    like = torch.empty(numel)
    assert torch.equal(ops.dropout_mask(like, p, seed, offset),
                       reference.dropout_mask(like, p, seed, offset))


def test_mask_is_a_pure_function():
    def mask(seed=11, offset=3, like=torch.empty(4097)):
        return ops.dropout_mask(like, 0.5, seed, offset)

    base = mask()
    assert torch.equal(base, mask())
    assert torch.equal(base, mask(like=torch.zeros(4097, dtype=torch.float64))), \
        "the mask depends on like's values or dtype"
    assert not torch.equal(base, mask(seed=12)), "seed ignored"
    assert not torch.equal(base, mask(seed=11 + 2**32)), "seed's high word ignored"
    assert not torch.equal(base, mask(offset=4)), "offset ignored"
    assert not torch.equal(base, mask(offset=3 + 2**32)), "offset's high word ignored"
    # element i depends on its logical index only: a prefix and a reshape see the same bits
    assert torch.equal(mask(like=torch.empty(1000)), base[:1000])
    assert torch.equal(mask(like=torch.empty(17, 241)).flatten(), base[:17 * 241])


def test_seed_and_offset_are_read_as_uint64():
    like = torch.empty(999)
    assert torch.equal(ops.dropout_mask(like, 0.4, -1, -2),
                       ops.dropout_mask(like, 0.4, 2**64 - 1, 2**64 - 2))


def test_mask_is_monotone_in_p():
    like = torch.empty(10_001)
    masks = [ops.dropout_mask(like, p, 5, 0) for p in (0.0, 0.1, 0.5, 0.9)]
    assert bool(masks[0].all())
    for looser, stricter in zip(masks, masks[1:]):
        assert bool((stricter <= looser).all()), "kept at a larger p but dropped at a smaller p"


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("seed,offset", [(0, 0), (-3, 2**40)], ids=str)
def test_kept_fraction_binomial(p, seed, offset):
    n = 2**20 + 3
    kept = ops.dropout_mask(torch.empty(n), p, seed, offset).sum().item()
    z = (kept - n * (1 - p)) / math.sqrt(n * p * (1 - p))
    assert abs(z) < 5, f"kept {kept} of {n} at p={p}: z-score {z:.2f}"


def revealed_masks(x: torch.Tensor, p: float, seed: int, offset: int, train_adapter: bool):
    """Masks used by lora_linear's forward and backward, read off with W = 0 and
    A = B = I: then y = drop(x) and grad_x = drop(grad_y). x must have no zeros."""
    n = x.shape[-1]
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    x = x.detach().requires_grad_()
    lora_A = eye.clone().requires_grad_(train_adapter)
    y = ops.lora_linear(x, torch.zeros_like(eye), None, lora_A, eye, 1.0, p, seed, offset=offset)
    (grad_x,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    torch.testing.assert_close(y[y != 0], (x / (1 - p))[y != 0], rtol=1e-14, atol=0)
    torch.testing.assert_close(grad_x[grad_x != 0],
                               torch.full_like(x, 1 / (1 - p))[grad_x != 0], rtol=1e-14, atol=0)
    return y != 0, grad_x != 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [None, "transposed", "strided", "batch_transposed"])
@pytest.mark.parametrize("p,seed,offset", [(0.1, 0, 0), (0.5, -9, 2**36 + 1),
                                           (0.3, 2**50 + 1, -5)], ids=str)
@pytest.mark.parametrize("train_adapter", [False, True], ids=["x_grad_only", "x_and_A_grads"])
def test_lora_linear_uses_exactly_the_dropout_mask(device, layout, p, seed, offset, train_adapter):
    """Forward and backward apply ops.dropout_mask of the logical row-major x, whatever
    x's strides (a non-contiguous x drops what its contiguous copy drops)."""
    x = torch.rand(3, 5, 21, dtype=torch.float64, device=device) + 0.5
    if layout is not None:
        x = relayout(x, layout)
        assert not x.is_contiguous()
    expected = ops.dropout_mask(torch.empty(x.shape), p, seed, offset)
    forward_mask, backward_mask = revealed_masks(x, p, seed, offset, train_adapter)
    assert torch.equal(forward_mask.cpu(), expected)
    assert torch.equal(backward_mask.cpu(), expected)
    contiguous_mask, _ = revealed_masks(x.contiguous(), p, seed, offset, train_adapter)
    assert torch.equal(contiguous_mask.cpu(), expected)


@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_training_false_ignores_dropout(dropout_p):
    inputs = make_lora_inputs((4, 6, 13), 9, 4)
    grad_y = random_like(inputs.y_shape, torch.float32, "cpu")

    def run(**kwargs):
        y = ops.lora_linear(*inputs.args(), 1.5, **kwargs)
        return [y, *torch.autograd.grad(y, list(inputs.named().values()), grad_y)]

    no_dropout = run(dropout_p=0.0, seed=0)
    for got, want in zip(run(dropout_p=dropout_p, seed=77, training=False), no_dropout):
        assert torch.equal(got, want)
    assert_matches_reference(inputs, dropout_p=dropout_p, seed=77, training=False)


def test_p0_equals_no_dropout():
    inputs = make_lora_inputs((4, 6, 13), 9, 4)
    y0 = ops.lora_linear(*inputs.args(), 1.5, 0.0, 1)
    assert torch.equal(y0, ops.lora_linear(*inputs.args(), 1.5, 0.0, 2, offset=99)), \
        "seed/offset matter at p = 0"
    x, weight, bias, lora_A, lora_B = inputs.args()
    plain = torch.nn.functional.linear(x, weight, bias) + 1.5 * (x @ lora_A.T) @ lora_B.T
    torch.testing.assert_close(y0, plain)
    assert_matches_reference(inputs, dropout_p=0.0, seed=1)


# ================================================================ memory: what backward keeps


@pytest.mark.parametrize("x_shape", [(13,), (24, 13), (2, 12, 13)], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("x_requires_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("x_layout", [None, "strided"])
def test_backward_saves_only_x_and_z(x_shape, dropout_p, x_requires_grad, bias, x_layout):
    r = 5
    trainable = ("lora_A", "lora_B") + (("x",) if x_requires_grad else ())
    inputs = make_lora_inputs(x_shape, 9, r, bias=bias, requires_grad=trainable,
                              layouts={"x": x_layout} if x_layout else None)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.lora_linear(*inputs.args(), 2.0, dropout_p, 4)
    x = inputs.x
    rows = math.prod(x_shape[:-1])
    assert len(saved) == 2, f"saved {[tuple(t.shape) for t in saved]}, expected only x and z"
    is_x = [t.data_ptr() == x.data_ptr() and t.shape == x.shape and t.stride() == x.stride()
            for t in saved]
    assert sum(is_x) == 1, "x itself (not a copy) must be saved"
    (z,) = [t for t, same in zip(saved, is_x) if not same]
    assert z.shape == (rows, r)
    assert not any(t.numel() == x.numel() for t, same in zip(saved, is_x) if not same), \
        "an activation-sized tensor besides x was saved"
    y.sum().backward()  # and the saved pair suffices
    assert inputs.lora_A.grad is not None and inputs.lora_B.grad is not None


# ================================================================ opcheck


def _forward_args(x_shape, bias, dropout_p, seed=3, offset=0, device="cpu", dtype=torch.float32):
    inputs = make_lora_inputs(x_shape, 9, 4, bias=bias, device=device, dtype=dtype)
    return (*inputs.args(), 0.75, dropout_p, torch.tensor(seed), offset)


FORWARD_ARG_SETS = {
    "bias_p0": dict(x_shape=(6, 13), bias=True, dropout_p=0.0),
    "nobias_p0": dict(x_shape=(6, 13), bias=False, dropout_p=0.0),
    "bias_p01": dict(x_shape=(6, 13), bias=True, dropout_p=0.1),
    "nobias_p01_3d": dict(x_shape=(2, 3, 13), bias=False, dropout_p=0.1, seed=-5, offset=2**40),
    "bias_p01_3d": dict(x_shape=(2, 3, 13), bias=True, dropout_p=0.1),
    "1d": dict(x_shape=(13,), bias=True, dropout_p=0.1),
    "fp64": dict(x_shape=(2, 3, 13), bias=True, dropout_p=0.1, dtype=torch.float64),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", FORWARD_ARG_SETS.values(), ids=FORWARD_ARG_SETS.keys())
def test_opcheck_forward(device, kwargs):
    torch.library.opcheck(torch.ops.lora_ext.lora_linear_forward.default,
                          _forward_args(device=device, **kwargs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("output_mask", [[True, True, True], [True, False, False],
                                         [False, True, False], [False, False, True],
                                         [False, True, True], [False, False, False]], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("x_shape", [(6, 13), (2, 3, 13)], ids=str)
def test_opcheck_backward(device, output_mask, dropout_p, x_shape):
    x, weight, bias, lora_A, lora_B, scaling, p, seed, offset = _forward_args(
        x_shape, True, dropout_p, device=device)
    with torch.no_grad():
        y, z = torch.ops.lora_ext.lora_linear_forward(x, weight, bias, lora_A, lora_B, scaling,
                                                      p, seed, offset)
    grad_y = random_like(y.shape, y.dtype, device)
    args = (grad_y, x.detach(), z, weight.detach(), lora_A.detach(), lora_B.detach(), scaling, p,
            seed, offset, output_mask)
    torch.library.opcheck(torch.ops.lora_ext.lora_linear_backward.default, args)
    grads = torch.ops.lora_ext.lora_linear_backward(*args)
    for needed, grad, like in zip(output_mask, grads, (x, lora_A, lora_B)):
        assert grad.shape == (like.shape if needed else (0,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,p,seed,offset", [((3, 5), 0.2, 1, 2), ((7,), 0.0, -1, 0),
                                                 ((2, 3, 5), 0.5, 2**40, -3), ((0, 4), 0.1, 0, 0)],
                         ids=str)
def test_opcheck_dropout_mask(device, shape, p, seed, offset):
    torch.library.opcheck(torch.ops.lora_ext.dropout_mask.default,
                          (torch.randn(shape, device=device), p, torch.tensor(seed), offset))


# ================================================================ torch.compile


def test_compile_fullgraph_inductor_matches_eager():
    torch._dynamo.reset()

    def step(x, weight, bias, lora_A, lora_B):
        y = ops.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.1, 1234, offset=7)
        return torch.nn.functional.gelu(y).square().mean()

    inputs = make_lora_inputs((2, 5, 13), 9, 4, requires_grad=("x", "lora_A", "lora_B"))
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    results = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        loss = fn(*inputs.args())
        results[name] = [loss, *torch.autograd.grad(loss, [inputs.x, inputs.lora_A, inputs.lora_B])]
    for got, want in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, want)


# ================================================================ gradcheck (fp64)


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("x_shape", [(3, 5), (2, 3, 5), (5,)], ids=str)
def test_gradcheck_fp64(dropout_p, bias, x_shape):
    inputs = make_lora_inputs(x_shape, 4, 2, dtype=torch.float64, bias=bias)
    args = [t for t in inputs.args() if t is not None]

    def fn(*tensors):
        tensors = list(tensors)
        if not bias:
            tensors.insert(2, None)
        return ops.lora_linear(*tensors, 0.7, dropout_p, 11, offset=2)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_double_backward_is_correct_or_refused(dropout_p):
    inputs = make_lora_inputs((3, 5), 4, 2, dtype=torch.float64)
    grad_y = random_like(inputs.y_shape, torch.float64, "cpu")

    leaves = list(inputs.named().values())

    def second_order(fn):  # d/d(leaves) of |first-order gradients|^2
        y = fn(*inputs.args(), 0.5, dropout_p, 3)
        grads = torch.autograd.grad(y, leaves, grad_y, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        return torch.autograd.grad(penalty, leaves, allow_unused=True, materialize_grads=True)

    try:
        ours = second_order(ops.lora_linear)
    except RuntimeError as error:  # refusing is fine, if it says why
        assert "backward" in str(error)
        return
    for got, want in zip(ours, second_order(reference.lora_linear)):
        torch.testing.assert_close(got, want)


# ================================================================ bad input


def _bad(**changes):
    """Valid lora_linear arguments (x [4, 13], W [9, 13], A [3, 13], B [9, 3]) with changes."""
    inputs = make_lora_inputs((4, 13), 9, 3, requires_grad=())
    kwargs = dict(x=inputs.x, weight=inputs.weight, bias=inputs.bias, lora_A=inputs.lora_A,
                  lora_B=inputs.lora_B, scaling=2.0, dropout_p=0.1, seed=0)
    for key, value in changes.items():
        kwargs[key] = value(kwargs) if callable(value) else value
    return kwargs


BAD_INPUTS = {  # name: (changes, exception, message pattern)
    "in_features_mismatch": (dict(x=torch.randn(4, 12)), ValueError, r"x must have shape.*13"),
    "lora_A_in_features": (dict(lora_A=torch.randn(3, 12)), ValueError, r"lora_A"),
    "lora_B_wrong_rank": (dict(lora_B=torch.randn(9, 4)), ValueError, r"lora_B.*\[9, 3\]"),
    "lora_B_wrong_out": (dict(lora_B=torch.randn(8, 3)), ValueError, r"lora_B.*\[9, 3\]"),
    "lora_B_1d": (dict(lora_B=torch.randn(9)), ValueError, r"lora_B"),
    "rank_zero": (dict(lora_A=torch.randn(0, 13), lora_B=torch.randn(9, 0)), ValueError, r"r >= 1"),
    "weight_1d": (dict(weight=torch.randn(13)), ValueError, r"weight"),
    "dtype_mismatch_weight": (dict(weight=lambda k: k["weight"].double()), TypeError,
                              r"weight.*dtype.*float64"),
    "dtype_mismatch_lora_B": (dict(lora_B=lambda k: k["lora_B"].half()), TypeError,
                              r"lora_B.*dtype"),
    "dtype_mismatch_bias": (dict(bias=lambda k: k["bias"].bfloat16()), TypeError, r"bias.*dtype"),
    "integer_x": (dict(x=torch.ones(4, 13, dtype=torch.int64)), TypeError, r"x.*dtype.*int64"),
    "integer_all": (dict(x=torch.ones(4, 13, dtype=torch.int32),
                         weight=torch.ones(9, 13, dtype=torch.int32), bias=None,
                         lora_A=torch.ones(3, 13, dtype=torch.int32),
                         lora_B=torch.ones(9, 3, dtype=torch.int32)), TypeError, r"dtype"),
    "dropout_negative": (dict(dropout_p=-0.1), ValueError, r"dropout_p"),
    "dropout_one": (dict(dropout_p=1.0), ValueError, r"dropout_p"),
    "dropout_above_one": (dict(dropout_p=1.5), ValueError, r"dropout_p"),
    "dropout_nan": (dict(dropout_p=float("nan")), ValueError, r"dropout_p"),
    "scaling_nan": (dict(scaling=float("nan")), ValueError, r"scaling"),
    "scaling_inf": (dict(scaling=float("inf")), ValueError, r"scaling"),
    "scaling_neg_inf": (dict(scaling=-float("inf")), ValueError, r"scaling"),
    "seed_float": (dict(seed=1.5), TypeError, r"seed"),
    "seed_str": (dict(seed="3"), TypeError, r"seed"),
    "seed_none": (dict(seed=None), TypeError, r"seed"),
    "seed_too_big": (dict(seed=2**64), ValueError, r"seed"),
    "offset_float": (dict(offset=2.0), TypeError, r"offset"),
    "bias_wrong_length": (dict(bias=torch.randn(8)), ValueError, r"bias.*\[9\]"),
    "bias_2d": (dict(bias=torch.randn(1, 9)), ValueError, r"bias.*\[9\]"),
    "x_not_tensor": (dict(x=[[1.0] * 13]), TypeError, r"x must be a Tensor"),
}


@pytest.mark.parametrize("changes,error,pattern", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_clear_error(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.lora_linear(**_bad(**changes))


def test_bad_dropout_rejected_in_eval_mode_too():
    with pytest.raises(ValueError, match="dropout_p"):
        ops.lora_linear(**_bad(dropout_p=1.5), training=False)


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.5), ValueError, "dropout_p"),
    (dict(seed=0.5), TypeError, "seed"),
    (dict(offset="1"), TypeError, "offset"),
    (dict(like=[1.0, 2.0]), TypeError, "like must be a Tensor"),
], ids=["p_one", "p_negative", "seed_float", "offset_str", "like_list"])
def test_dropout_mask_bad_input(kwargs, error, pattern):
    args = dict(like=torch.empty(5), dropout_p=0.1, seed=0, offset=0) | kwargs
    with pytest.raises(error, match=pattern):
        ops.dropout_mask(**args)


@pytest.mark.gpu
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="lora_A is on cuda"):
        ops.lora_linear(**_bad(lora_A=lambda k: k["lora_A"].cuda()))


def test_extension_ops_have_cpu_kernels():
    for name in ("lora_linear_forward", "lora_linear_backward", "dropout_mask"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ext::{name}", "CPU"), name
