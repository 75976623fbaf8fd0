"""DoRA ops (lora_ext.ops.dora_weight_norm, ops.dora_linear) against lora_ext.reference."""
import math

import pytest
import torch

from lora_ext import ops, reference
from lora_testing import (DEVICES, assert_within_torch_error, make_lora_inputs, random_like,
                          relayout)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DORA_NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


# ================================================================ weight norm


def norm_factors(out_f, in_f, r, regime, dtype, device="cpu", seed=0):
    """(W, A, B, s) in fp64 for one regime of s·B·A against W:
    small: the adapter is a perturbation; large: it dominates W; cancel: s·B·A ≈ -W, the
    norm is a thousandth of ‖W‖ (where ‖W‖² + 2s·B·(W·Aᵀ) + s²·‖B·A‖² loses everything)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, in_f, generator=gen, dtype=torch.float64) / math.sqrt(in_f)
    B = torch.randn(out_f, r, generator=gen, dtype=torch.float64)
    s = 1.7
    noise = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) / math.sqrt(in_f)
    if regime == "small":
        W, B = noise, B * 1e-3
    elif regime == "large":
        W, B = noise * 1e-2, B * 10
    else:  # cancel
        W = -s * (B @ A) + 1e-3 * noise
        W = W.to(dtype).to(torch.float64)  # cancellation measured on representable values
    return [t.to(device=device, dtype=dtype) for t in (W, A, B)] + [s]


def assert_norm_ok(W, A, B, s):
    ours = ops.dora_weight_norm(W, A, B, s)
    acc = torch.float64 if W.dtype == torch.float64 else torch.float32
    assert ours.dtype == acc and ours.shape == (W.shape[0],) and ours.device == W.device
    torchs = reference.dora_weight_norm(W, A, B, s)   # PyTorch: form W + s·B·A in acc, norm
    oracle = reference.dora_weight_norm(W.double(), A.double(), B.double(), s)
    magnitude = reference.dora_weight_norm(W.double().abs(), A.double().abs(), B.double().abs(), s)
    assert_within_torch_error(ours, torchs, oracle, magnitude, "dora_weight_norm")
    return ours, oracle


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("regime", ["small", "large", "cancel"])
@pytest.mark.parametrize("layout", [None, "transposed", "strided"])
def test_norm_matches_fp64_in_every_regime(device, dtype, regime, layout):
    W, A, B, s = norm_factors(37, 131, 8, regime, dtype, device)
    if layout:
        W = relayout(W, layout)
    ours, oracle = assert_norm_ok(W, A, B, s)
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        # relative accuracy of an fp32 computation from the stored values, in every regime
        rel = ((ours.double().cpu() - oracle.cpu()).abs() / oracle.cpu()).max().item()
        assert rel < (1e-4 if regime == "cancel" else 1e-5), rel


def test_cancel_regime_defeats_the_algebraic_expansion():
    """The regime is a real test: the expansion in fp32 is far off where we are not."""
    W, A, B, s = norm_factors(64, 256, 8, "cancel", torch.float32)
    oracle = reference.dora_weight_norm(W.double(), A.double(), B.double(), s)
    sq = W.square().sum(1) + 2 * s * (B * (W @ A.T)).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
    expansion = sq.clamp_min(0).sqrt()
    ours = ops.dora_weight_norm(W, A, B, s)
    err_expansion = (expansion.double() - oracle).abs().max().item()
    err_ours = (ours.double() - oracle).abs().max().item()
    assert err_expansion > 100 * err_ours, (err_expansion, err_ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("out_f,in_f,r", [(1, 1, 1), (3, 5, 2), (4, 16, 1), (5, 17, 3), (17, 4, 9),
                                          (70, 33, 16), (8, 300, 64), (129, 65, 7), (2, 1000, 5)],
                         ids=str)
@pytest.mark.parametrize("layout", [None, "transposed"])
def test_norm_odd_shapes(dtype, out_f, in_f, r, layout):
    W, A, B, s = norm_factors(out_f, in_f, r, "large", dtype)
    if layout and out_f > 1 and in_f > 1:
        W = relayout(W, layout)
    assert_norm_ok(W, A, B, s)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_norm_non_contiguous_factors(layout):
    W, A, B, s = norm_factors(9, 21, 4, "large", torch.float32)
    assert_norm_ok(W, relayout(A, layout), relayout(B, layout), s)
    assert_norm_ok(W[:, ::2], A[:, ::2], B, s)  # a column slice of a wider weight


def test_norm_empty_weight():
    assert ops.dora_weight_norm(torch.empty(0, 5), torch.randn(2, 5), torch.empty(0, 2), 1.0).shape == (0,)
    got = ops.dora_weight_norm(torch.empty(3, 0), torch.empty(2, 0), torch.randn(3, 2), 1.0)
    assert torch.equal(got, torch.zeros(3))


def test_norm_is_not_differentiable_and_says_so():
    W, A, B, s = norm_factors(4, 6, 2, "small", torch.float64)
    out = ops.dora_weight_norm(W, A.requires_grad_(), B, s)
    with pytest.raises(RuntimeError, match="not differentiable"):
        out.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", [None, "transposed"])
def test_opcheck_norm(device, dtype, layout):
    W, A, B, s = norm_factors(7, 19, 3, "large", dtype, device)
    if layout:
        W = relayout(W, layout)
    torch.library.opcheck(torch.ops.lora_ext.dora_weight_norm.default, (W, A, B, s))


def test_norm_compiles_fullgraph():
    torch._dynamo.reset()
    W, A, B, s = norm_factors(9, 21, 4, "large", torch.float32)
    fn = torch.compile(lambda W, A, B: ops.dora_weight_norm(W, A, B, s) * 2, fullgraph=True)
    torch.testing.assert_close(fn(W, A, B), 2 * ops.dora_weight_norm(W, A, B, s))


NORM_BAD = {
    "weight_1d": (lambda W, A, B: (W[0], A, B, 1.0), ValueError, "weight must be 2-D"),
    "A_in": (lambda W, A, B: (W, A[:, :-1], B, 1.0), ValueError, r"lora_A must have shape \[r, 6\]"),
    "B_rank": (lambda W, A, B: (W, A, B[:, :1], 1.0), ValueError, r"lora_B must have shape \[4, 2\]"),
    "dtype": (lambda W, A, B: (W, A.double(), B, 1.0), TypeError, "lora_A has dtype torch.float64"),
    "int": (lambda W, A, B: (W.int(), A.int(), B.int(), 1.0), TypeError, "expected one of"),
    "scaling_nan": (lambda W, A, B: (W, A, B, float("nan")), ValueError, "scaling"),
    "not_tensor": (lambda W, A, B: (W.tolist(), A, B, 1.0), TypeError, "weight must be a Tensor"),
}


@pytest.mark.parametrize("make,error,pattern", NORM_BAD.values(), ids=NORM_BAD.keys())
def test_norm_bad_input(make, error, pattern):
    W, A, B, _ = norm_factors(4, 6, 2, "small", torch.float32)
    with pytest.raises(error, match=pattern):
        ops.dora_weight_norm(*make(W, A, B))


# ================================================================ DoRA linear


class DoraInputs:
    def __init__(self, x_shape, out_f, r, *, dtype=torch.float32, device="cpu", bias=True,
                 layouts=None, requires_grad=("x", "lora_A", "lora_B", "magnitude"), seed=0):
        lora = make_lora_inputs(x_shape, out_f, r, dtype=dtype, device=device, bias=bias,
                                layouts=layouts, requires_grad=requires_grad, seed=seed)
        self.x, self.weight, self.bias, self.lora_A, self.lora_B = lora.args()
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            base = reference.dora_weight_norm(self.weight.double(), self.lora_A.double(),
                                              self.lora_B.double(), 1.5)
            mag = base * (0.5 + torch.rand(out_f, generator=gen, dtype=torch.float64))
        self.magnitude = mag.to(device=device, dtype=dtype).requires_grad_("magnitude" in requires_grad)

    def args(self):
        return (self.x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude)

    def named(self):
        return {n: t for n, t in zip(DORA_NAMES, self.args()) if t is not None}

    def cast(self, dtype, fn=None):
        other = object.__new__(DoraInputs)
        for name in DORA_NAMES:
            t = getattr(self, name)
            if t is not None:
                v = t.detach().to(dtype)
                t = (v if fn is None else fn(v)).requires_grad_(t.requires_grad)
            setattr(other, name, t)
        return other


def _run(fn, inputs, grad_y, **kwargs):
    y = fn(*inputs.args(), **kwargs)
    named = {n: t for n, t in inputs.named().items() if t.requires_grad}
    if grad_y is None or not named:
        return y, {}
    return y, dict(zip(named, torch.autograd.grad(y, list(named.values()), grad_y)))


def assert_dora_matches_reference(inputs, scaling=1.5, grad_layout=None, **kwargs):
    dtype, device = inputs.x.dtype, inputs.x.device
    y_shape = (*inputs.x.shape[:-1], inputs.weight.shape[0])
    grad_y = random_like(y_shape, dtype, device)
    if grad_layout is not None:
        grad_y = relayout(grad_y, grad_layout)
    g64 = grad_y.double()
    # One norm for every run (the norm is detached; its own accuracy is tested above).
    norm = reference.dora_weight_norm(inputs.weight.detach().double(), inputs.lora_A.detach().double(),
                                      inputs.lora_B.detach().double(), scaling)
    y, grads = _run(ops.dora_linear, inputs, grad_y, scaling=scaling, weight_norm=norm.to(device), **kwargs)
    y_t, grads_t = _run(reference.dora_linear, inputs, grad_y, scaling=scaling, weight_norm=norm.to(device),
                        **kwargs)
    y_o, grads_o = _run(reference.dora_linear, inputs.cast(torch.float64), g64, scaling=scaling,
                        weight_norm=norm.to(device), **kwargs)
    y_m, grads_m = _run(reference.dora_linear, inputs.cast(torch.float64, torch.abs), g64.abs(),
                        scaling=abs(scaling), weight_norm=norm.to(device), **kwargs)
    assert_within_torch_error(y, y_t, y_o, y_m, "y")
    assert grads.keys() == grads_t.keys()
    for name in grads:
        assert_within_torch_error(grads[name], grads_t[name], grads_o[name], grads_m[name],
                                  f"grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_dora_linear_matches_reference_per_dtype(device, dtype, dropout_p, bias):
    inputs = DoraInputs((3, 5, 37), 29, 7, dtype=dtype, device=device, bias=bias)
    assert_dora_matches_reference(inputs, dropout_p=dropout_p, seed=17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("lead", [(), (1,), (6,), (2, 3)], ids=str)
@pytest.mark.parametrize("in_f,out_f,r", [(13, 37, 1), (37, 13, 7), (129, 13, 16), (64, 37, 256)], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_dora_linear_shapes(dtype, lead, in_f, out_f, r, dropout_p):
    inputs = DoraInputs((*lead, in_f), out_f, r, dtype=dtype)
    assert_dora_matches_reference(inputs, dropout_p=dropout_p, seed=3, offset=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("rows,in_f,out_f", [(300, 70, 200), (257, 33, 128), (5, 300, 64)], ids=str)
def test_dora_linear_dropout_across_column_blocks_and_row_chunks(dtype, rows, in_f, out_f):
    # The CPU dropout path works on blocks of 64 output columns and chunks of 256 rows: full
    # blocks, a partial last block, and more than one chunk.
    inputs = DoraInputs((rows, in_f), out_f, 8, dtype=dtype)
    assert_dora_matches_reference(inputs, dropout_p=0.1, seed=11, offset=3)


DORA_LAYOUTS = {
    "x_transposed": {"x": "transposed"},
    "x_strided": {"x": "strided"},
    "weight_transposed": {"weight": "transposed"},   # Conv1D stores Wᵀ
    "factors": {"lora_A": "transposed", "lora_B": "strided"},
    "all": {"x": "strided", "weight": "transposed", "bias": "strided", "lora_A": "transposed",
            "lora_B": "strided"},
}


@pytest.mark.parametrize("layouts", DORA_LAYOUTS.values(), ids=DORA_LAYOUTS.keys())
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("grad_layout", [None, "transposed"])
def test_dora_linear_non_contiguous(layouts, dropout_p, grad_layout):
    inputs = DoraInputs((4, 6, 13), 11, 5, layouts=layouts)
    assert_dora_matches_reference(inputs, dropout_p=dropout_p, seed=21, grad_layout=grad_layout)


GRAD_SETS = {
    "dora_training": ("x", "lora_A", "lora_B", "magnitude"),
    "adapter_only": ("lora_A", "lora_B", "magnitude"),
    "magnitude_only": ("magnitude",),
    "everything": DORA_NAMES,
    "base_only": ("x", "weight", "bias"),
}


@pytest.mark.parametrize("names", GRAD_SETS.values(), ids=GRAD_SETS.keys())
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_dora_linear_any_requires_grad_set(names, dropout_p):
    inputs = DoraInputs((3, 4, 13), 9, 4, requires_grad=names)
    assert_dora_matches_reference(inputs, dropout_p=dropout_p, seed=8)
    ops.dora_linear(*inputs.args(), 1.5, dropout_p, 8).sum().backward()
    for name, t in inputs.named().items():
        assert (t.grad is not None) == (name in names), name


@pytest.mark.parametrize("x_shape", [(0, 13), (2, 0, 13)], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_dora_linear_empty_batch(x_shape, dropout_p):
    inputs = DoraInputs(x_shape, 7, 3)
    y = ops.dora_linear(*inputs.args(), 2.0, dropout_p, 1)
    assert y.shape == (*x_shape[:-1], 7)
    y.sum().backward()
    assert inputs.x.grad.shape == x_shape
    for name in ("lora_A", "lora_B", "magnitude"):
        grad = getattr(inputs, name).grad
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("dropout_p,seed,offset", [(0.3, 5, 0), (0.5, -9, 2**36 + 1)], ids=str)
def test_unit_magnitude_scale_is_lora_with_the_same_mask(dropout_p, seed, offset):
    """g = 1 turns DoRA into LoRA: the same Philox mask as ops.lora_linear for (seed, offset)."""
    inputs = DoraInputs((5, 3, 13), 9, 4, dtype=torch.float64)
    norm = ops.dora_weight_norm(inputs.weight.detach(), inputs.lora_A.detach(), inputs.lora_B.detach(), 1.5)
    y = ops.dora_linear(inputs.x, inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B, norm.clone(),
                        1.5, dropout_p, seed, offset=offset, weight_norm=norm)
    want = ops.lora_linear(inputs.x, inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B, 1.5,
                           dropout_p, seed, offset=offset)
    torch.testing.assert_close(y, want)
    other = ops.dora_linear(inputs.x, inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B, norm.clone(),
                            1.5, dropout_p, seed + 1, offset=offset, weight_norm=norm)
    assert not torch.allclose(other, want), "a different seed must give a different mask"


def test_training_false_ignores_dropout():
    inputs = DoraInputs((4, 13), 9, 4)
    a = ops.dora_linear(*inputs.args(), 1.5, 0.5, 3, training=False)
    b = ops.dora_linear(*inputs.args(), 1.5, 0.0, 99)
    torch.testing.assert_close(a, b)


def _big_gemms(fn, in_f, out_f):
    """How many GEMMs with the [in, out] weight operand fn runs (counted by the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    count = 0
    for event in prof.events():
        if event.name in ("aten::mm", "aten::addmm", "aten::addmm_") and [in_f, out_f] in event.input_shapes:
            count += 1
    return count


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_forward_runs_the_base_gemm_once(dropout_p):
    # With dropout PEFT's DoRA needs drop(x)·Wᵀ besides x·Wᵀ; on CPU we get it from x·Wᵀ and a
    # product over the dropped elements only.
    inputs = DoraInputs((6, 23), 19, 3)
    with torch.no_grad():
        count = _big_gemms(lambda: ops.dora_linear(*inputs.args(), 1.5, dropout_p, 1), 23, 19)
    assert count == 1


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_backward_runs_one_base_gemm_for_grad_x(dropout_p):
    inputs = DoraInputs((6, 23), 19, 3)
    y = ops.dora_linear(*inputs.args(), 1.5, dropout_p, 1)
    grad = torch.randn_like(y)
    # grad_x's base GEMM has the [out, in] weight as its second operand: grad_y [rows, out]·W.
    count = _big_gemms(lambda: y.backward(grad), 19, 23)
    assert count == 1


def test_backward_saves_only_x_z_and_hm():
    inputs = DoraInputs((2, 12, 13), 9, 5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.dora_linear(*inputs.args(), 2.0, 0.2, 4)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(2, 12, 13), (24, 5), (24, 9)]), shapes
    y.sum().backward()


def test_in_place_magnitude_update_before_backward_is_caught():
    inputs = DoraInputs((4, 13), 9, 4)
    y = ops.dora_linear(*inputs.args(), 1.0, 0.1, 5)
    with torch.no_grad():
        inputs.magnitude.mul_(2)
    with pytest.raises(RuntimeError, match="magnitude was modified in place"):
        y.sum().backward()


# ---------------------------------------------------------------- opcheck, compile, gradcheck


def _forward_op_args(x_shape, bias, dropout_p, dtype=torch.float32, device="cpu", seed=3, offset=0):
    inputs = DoraInputs(x_shape, 9, 4, bias=bias, dtype=dtype, device=device)
    norm = ops.dora_weight_norm(inputs.weight.detach(), inputs.lora_A.detach(), inputs.lora_B.detach(), 0.75)
    x, w, b, A, B, m = inputs.args()
    return (x, w, b, A, B, m, norm, 0.75, dropout_p, torch.tensor(seed), offset)


OPCHECK_SETS = {
    "bias_p0": dict(x_shape=(6, 13), bias=True, dropout_p=0.0),
    "nobias_p0": dict(x_shape=(6, 13), bias=False, dropout_p=0.0),
    "bias_p01_3d": dict(x_shape=(2, 3, 13), bias=True, dropout_p=0.1, seed=-5, offset=2**40),
    "1d": dict(x_shape=(13,), bias=True, dropout_p=0.1),
    "fp64": dict(x_shape=(2, 3, 13), bias=False, dropout_p=0.1, dtype=torch.float64),
    "bf16": dict(x_shape=(2, 3, 13), bias=True, dropout_p=0.0, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", OPCHECK_SETS.values(), ids=OPCHECK_SETS.keys())
def test_opcheck_dora_linear_forward(device, kwargs):
    torch.library.opcheck(torch.ops.lora_ext.dora_linear_forward.default,
                          _forward_op_args(device=device, **kwargs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("output_mask", [[True, True, True, True], [True, False, False, False],
                                         [False, True, True, False], [False, False, False, True],
                                         [False, False, False, False]], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_opcheck_dora_linear_backward(device, output_mask, dropout_p):
    x, w, b, A, B, m, norm, s, p, seed, offset = _forward_op_args((2, 3, 13), True, dropout_p, device=device)
    with torch.no_grad():
        y, z, hm = torch.ops.lora_ext.dora_linear_forward(x, w, b, A, B, m, norm, s, p, seed, offset)
    grad_y = random_like(y.shape, y.dtype, device)
    args = (grad_y, x.detach(), z, hm, w.detach(), A.detach(), B.detach(), m.detach(), norm, s, p, seed,
            offset, output_mask)
    torch.library.opcheck(torch.ops.lora_ext.dora_linear_backward.default, args)
    grads = torch.ops.lora_ext.dora_linear_backward(*args)
    for needed, grad, like in zip(output_mask, grads, (x, A, B, m)):
        assert grad.shape == (like.shape if needed else (0,))


@pytest.mark.parametrize("cached_norm", [False, True])
def test_compile_fullgraph_matches_eager(cached_norm):
    torch._dynamo.reset()
    inputs = DoraInputs((2, 5, 13), 9, 4)
    norm = ops.dora_weight_norm(inputs.weight, inputs.lora_A.detach(), inputs.lora_B.detach(), 0.5)

    def step(x, weight, bias, lora_A, lora_B, magnitude):
        y = ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, 0.5, 0.1, 1234, offset=7,
                            weight_norm=norm if cached_norm else None)
        return torch.nn.functional.gelu(y).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    leaves = [inputs.x, inputs.lora_A, inputs.lora_B, inputs.magnitude]
    results = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        loss = fn(*inputs.args())
        results[name] = [loss, *torch.autograd.grad(loss, leaves)]
    for got, want in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("x_shape", [(3, 5), (2, 3, 5), (5,)], ids=str)
def test_gradcheck_fp64(dropout_p, bias, x_shape):
    inputs = DoraInputs(x_shape, 4, 2, dtype=torch.float64, bias=bias, requires_grad=DORA_NAMES)
    # the norm is a constant of the layer (detached): hold it fixed while W is perturbed
    norm = ops.dora_weight_norm(inputs.weight.detach(), inputs.lora_A.detach(), inputs.lora_B.detach(), 0.7)
    args = [t for t in inputs.args() if t is not None]

    def fn(*tensors):
        tensors = list(tensors)
        if not bias:
            tensors.insert(2, None)
        return ops.dora_linear(*tensors, 0.7, dropout_p, 11, offset=2, weight_norm=norm)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_double_backward_matches_reference(dropout_p):
    inputs = DoraInputs((3, 5), 4, 2, dtype=torch.float64, requires_grad=DORA_NAMES)
    norm = ops.dora_weight_norm(inputs.weight.detach(), inputs.lora_A.detach(), inputs.lora_B.detach(), 0.5)
    grad_y = random_like((3, 4), torch.float64, "cpu")
    leaves = list(inputs.named().values())

    def second_order(fn):
        y = fn(*inputs.args(), 0.5, dropout_p, 3, weight_norm=norm)
        grads = torch.autograd.grad(y, leaves, grad_y, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        return torch.autograd.grad(penalty, leaves, allow_unused=True, materialize_grads=True)

    for got, want in zip(second_order(ops.dora_linear), second_order(reference.dora_linear)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- bad input


def _bad(**changes):
    inputs = DoraInputs((4, 13), 9, 3, requires_grad=())
    kwargs = dict(x=inputs.x, weight=inputs.weight, bias=inputs.bias, lora_A=inputs.lora_A,
                  lora_B=inputs.lora_B, magnitude=inputs.magnitude, scaling=2.0, dropout_p=0.1, seed=0)
    for key, value in changes.items():
        kwargs[key] = value(kwargs) if callable(value) else value
    return kwargs


BAD_INPUTS = {
    "in_features": (dict(x=torch.randn(4, 12)), ValueError, r"x must have shape.*13"),
    "lora_B_rank": (dict(lora_B=torch.randn(9, 4)), ValueError, r"lora_B.*\[9, 3\]"),
    "magnitude_length": (dict(magnitude=torch.randn(8)), ValueError, r"magnitude must have shape \[9\]"),
    "magnitude_2d": (dict(magnitude=torch.randn(1, 9)), ValueError, r"magnitude must have shape \[9\]"),
    "magnitude_dtype": (dict(magnitude=lambda k: k["magnitude"].double()), TypeError, r"magnitude.*dtype"),
    "magnitude_missing": (dict(magnitude=None), TypeError, r"magnitude must be a Tensor"),
    "norm_length": (dict(weight_norm=torch.ones(8)), ValueError, r"weight_norm must have shape \[9\]"),
    "norm_int": (dict(weight_norm=torch.ones(9, dtype=torch.int64)), TypeError, r"weight_norm"),
    "bias_length": (dict(bias=torch.randn(8)), ValueError, r"bias.*\[9\]"),
    "weight_dtype": (dict(weight=lambda k: k["weight"].half()), TypeError, r"weight.*dtype"),
    "dropout": (dict(dropout_p=1.0), ValueError, r"dropout_p"),
    "scaling": (dict(scaling=float("inf")), ValueError, r"scaling"),
    "seed": (dict(seed=0.5), TypeError, r"seed"),
}


@pytest.mark.parametrize("changes,error,pattern", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_dora_linear_bad_input(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.dora_linear(**_bad(**changes))


@pytest.mark.gpu
def test_dora_linear_mixed_devices_rejected():
    with pytest.raises(ValueError, match="magnitude is on cuda"):
        ops.dora_linear(**_bad(magnitude=lambda k: k["magnitude"].cuda()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("regime", ["small", "large", "cancel"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (33, 517, 16), (4096, 1000, 64), (200, 3000, 5)], ids=str)
@pytest.mark.parametrize("layout", [None, "transposed"])
def test_cuda_norm_matches_cpu(dtype, regime, shape, layout):
    W, A, B, s = norm_factors(*shape, regime, dtype)
    if layout and min(shape[:2]) > 1:
        W = relayout(W, layout)
    cpu = ops.dora_weight_norm(W, A, B, s)
    gpu = ops.dora_weight_norm(W.cuda(), A.cuda(), B.cuda(), s)
    assert_norm_ok(W.cuda(), A.cuda(), B.cuda(), s)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)


def test_extension_ops_have_cpu_kernels():
    for name in ("dora_weight_norm", "dora_linear_forward", "dora_linear_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ext::{name}", "CPU"), name


# Dropout takes the sparse correction (drop(x)·Wᵀ from the base output and the dropped
# elements) up to p = 0.5 and the dense product above it; on CUDA, LORA_EXT_DORA_CUDA_SPARSE
# forces either (auto: sparse for fp32/fp64). Every route gives PEFT's numbers and masks.
DROPOUT_ROUTES = [pytest.param("cpu", "auto", id="cpu")] + [
    pytest.param("cuda", value, id=f"cuda-sparse-{value}", marks=pytest.mark.gpu) for value in ("auto", "0", "1")]


@pytest.mark.parametrize("device,cuda_sparse", DROPOUT_ROUTES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dropout_p", [0.05, 0.5, 0.7])
@pytest.mark.parametrize("shape", [((3, 5, 37), 29, 7), ((2, 9, 300), 520, 16)], ids=["small", "tails"])
def test_dora_dropout_routes_match_reference(monkeypatch, device, cuda_sparse, dtype, dropout_p, shape):
    monkeypatch.setenv("LORA_EXT_DORA_CUDA_SPARSE", cuda_sparse)
    x_shape, out_f, r = shape
    inputs = DoraInputs(x_shape, out_f, r, dtype=dtype, device=device, bias=True)
    assert_dora_matches_reference(inputs, dropout_p=dropout_p, seed=29, offset=3)


@pytest.mark.gpu
def test_dora_cuda_sparse_setting_checked(monkeypatch):
    monkeypatch.setenv("LORA_EXT_DORA_CUDA_SPARSE", "yes")
    inputs = DoraInputs((4, 13), 11, 3, dtype=torch.float32, device="cuda", bias=False)
    with pytest.raises(RuntimeError, match="LORA_EXT_DORA_CUDA_SPARSE='yes' must be 0, 1 or auto"):
        ops.dora_linear(inputs.x, inputs.weight, None, inputs.lora_A, inputs.lora_B, inputs.magnitude, 1.0,
                        0.1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_dora_dropout_cpu_same_bits_for_any_thread_count(dtype):
    # The CPU correction splits rows and column blocks into tasks and adds partial sums in a
    # fixed order: one thread and several give the same y, grad_x and magnitude gradient.
    # Shapes past one task each way (1024 rows, 8 column blocks of 64). (lora_A's and lora_B's
    # gradients are LoRA's, summed per thread: not compared.)
    inputs = DoraInputs((1100, 70), 600, 5, dtype=dtype, bias=True)
    grad_y = random_like((1100, 600), dtype, "cpu")
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            y, grads = _run(ops.dora_linear, inputs, grad_y, scaling=1.5, dropout_p=0.1, seed=7)
            results.append((y, grads))
    finally:
        torch.set_num_threads(threads)
    (y1, g1), (y3, g3) = results
    assert torch.equal(y1, y3)
    for name in ("x", "magnitude"):
        assert torch.equal(g1[name], g3[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("dropout_p", [0.0, 0.05])
def test_dora_magnitude_gradient_over_many_rows(dtype, dropout_p):
    # The magnitude's gradient sums grad_y ⊙ hm over every row (CPU: in chunks of 128 rows, then
    # the chunks): within the tolerance rule over thousands of rows too.
    inputs = DoraInputs((4100, 24), 70, 4, dtype=dtype, bias=False)
    assert_dora_matches_reference(inputs, dropout_p=dropout_p, seed=13)
