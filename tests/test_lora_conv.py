"""LoRA on convolutions: ops.lora_conv_weight (the merged weight) and ops.lora_conv (one
convolution with it) against lora_ext.reference (PEFT's three convolutions), by the
tolerance rule."""
import math

import pytest
import torch

from lora_ext import ops, reference
from lora_testing import DEVICES, assert_within_torch_error, random_like, relayout

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
KERNELS = {1: (3,), 2: (3, 3), 3: (2, 3, 1)}


def make(dims, in_c=5, out_c=7, r=3, dtype=torch.float32, device="cpu", spatial=6, batch=2, seed=0,
         grads=("x", "lora_A", "lora_B"), kernel=None):
    gen = torch.Generator().manual_seed(seed)
    k = kernel or KERNELS[dims]
    fan_in = in_c * math.prod(k)

    def randn(*shape, std=1.0, name=""):
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(device, dtype)
        return t.requires_grad_(name in grads)
    x_shape = (batch, in_c) if batch else (in_c,)
    return dict(x=randn(*x_shape, *(spatial,) * dims, name="x"),
                weight=randn(out_c, in_c, *k, std=1 / math.sqrt(fan_in), name="weight"),
                bias=randn(out_c, name="bias"),
                lora_A=randn(r, in_c, *k, std=1 / math.sqrt(fan_in), name="lora_A"),
                lora_B=randn(out_c, r, *(1,) * dims, std=1 / math.sqrt(r), name="lora_B"))


def _run(fn, t, grad_y, scaling, stride, padding):
    y = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scaling, stride, padding)
    names = [n for n, v in t.items() if v.requires_grad]
    return y, dict(zip(names, torch.autograd.grad(y, [t[n] for n in names], grad_y))) if names else {}


def assert_conv_matches_reference(t, scaling=1.5, stride=1, padding=1):
    y0 = reference.lora_conv(*(v.detach() for v in t.values()), scaling, stride, padding)
    grad_y = random_like(y0.shape, y0.dtype, y0.device, seed=4)

    def cast(fn=None):
        return {n: (v.detach().double() if fn is None else fn(v.detach().double())).requires_grad_(v.requires_grad)
                for n, v in t.items()}
    y, grads = _run(ops.lora_conv, t, grad_y, scaling, stride, padding)
    y_t, grads_t = _run(reference.lora_conv, t, grad_y, scaling, stride, padding)
    y_o, grads_o = _run(reference.lora_conv, cast(), grad_y.double(), scaling, stride, padding)
    y_m, grads_m = _run(reference.lora_conv, cast(torch.abs), grad_y.double().abs(), abs(scaling), stride, padding)
    assert_within_torch_error(y, y_t, y_o, y_m, "y")
    assert grads.keys() == grads_t.keys()
    for name in grads:
        assert_within_torch_error(grads[name], grads_t[name], grads_o[name], grads_m[name], f"grad of {name}")


# ================================================================ lora_conv_weight


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_merged_weight_matches_reference(device, dtype, dims):
    t = make(dims, in_c=6, out_c=37, r=5, dtype=dtype, device=device, grads=("weight", "lora_A", "lora_B"))
    args = (t["weight"], t["lora_A"], t["lora_B"])
    g = random_like(t["weight"].shape, dtype, device)

    def run(fn, tensors, grad):
        merged = fn(*tensors, 0.8)
        return merged, torch.autograd.grad(merged, tensors, grad)
    merged, grads = run(ops.lora_conv_weight, args, g)
    merged_t, grads_t = run(reference.lora_conv_weight, args, g)
    merged_o, grads_o = run(reference.lora_conv_weight, [a.detach().double().requires_grad_() for a in args],
                            g.double())
    merged_m, grads_m = run(reference.lora_conv_weight, [a.detach().double().abs().requires_grad_() for a in args],
                            g.double().abs())
    assert merged.shape == merged_t.shape == t["weight"].shape and merged.dtype == dtype
    assert_within_torch_error(merged, merged_t, merged_o, merged_m, "merged weight")
    for name, *four in zip(("weight", "lora_A", "lora_B"), grads, grads_t, grads_o, grads_m):
        assert_within_torch_error(*four, f"grad of {name}")


@pytest.mark.parametrize("layout", ["weight_strided", "A_transposed", "B_strided"])
def test_merged_weight_non_contiguous(layout):
    t = make(2, grads=())
    if layout == "weight_strided":
        t["weight"] = relayout(t["weight"], "strided")
    elif layout == "A_transposed":
        t["lora_A"] = t["lora_A"].transpose(0, 1).contiguous().transpose(0, 1)
    else:
        t["lora_B"] = relayout(t["lora_B"].reshape(7, 3), "strided").reshape(7, 3, 1, 1)
    torch.testing.assert_close(ops.lora_conv_weight(t["weight"], t["lora_A"], t["lora_B"], 2.0),
                               reference.lora_conv_weight(t["weight"], t["lora_A"], t["lora_B"], 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_merged_weight(device):
    for dims in (1, 2, 3):
        t = make(dims, device=device, grads=("weight", "lora_A", "lora_B"))
        torch.library.opcheck(torch.ops.lora_ext.lora_conv_weight.default,
                              (t["weight"], t["lora_A"], t["lora_B"], 0.5))


def test_gradcheck_merged_weight():
    t = make(2, out_c=3, in_c=2, r=2, dtype=torch.float64, grads=("weight", "lora_A", "lora_B"))
    assert torch.autograd.gradcheck(lambda w, a, b: ops.lora_conv_weight(w, a, b, 0.7),
                                    (t["weight"], t["lora_A"], t["lora_B"]))


# ================================================================ lora_conv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("grads", [("x", "lora_A", "lora_B"), ("x", "weight", "bias", "lora_A", "lora_B"),
                                   ("lora_B",), ("x",)], ids=["frozen_W", "trained_W", "B_only", "x_only"])
def test_conv_matches_reference(device, dtype, dims, grads):
    assert_conv_matches_reference(make(dims, dtype=dtype, device=device, grads=grads))


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((2, 1), (0, 2))], ids=str)
@pytest.mark.parametrize("batch", [0, 1, 3], ids=["unbatched", "b1", "b3"])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (2, 5)], ids=str)
def test_conv_odd_shapes(stride, padding, batch, kernel):
    assert_conv_matches_reference(make(2, batch=batch, kernel=kernel, spatial=7, r=1 if kernel == (1, 1) else 4),
                                  stride=stride, padding=padding)


def test_conv_empty_batch():
    t = make(2, batch=0, grads=("x", "lora_A", "lora_B"))
    t["x"] = torch.zeros(0, 5, 6, 6, requires_grad=True)
    y = ops.lora_conv(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0, 1, 1)
    assert y.shape == (0, 7, 6, 6)
    y.sum().backward()
    assert torch.equal(t["lora_A"].grad, torch.zeros_like(t["lora_A"]))
    assert torch.equal(t["lora_B"].grad, torch.zeros_like(t["lora_B"]))


def test_conv_gradcheck_fp64():
    for grads in (("x", "lora_A", "lora_B"), ("x", "weight", "bias", "lora_A", "lora_B")):
        t = make(2, in_c=2, out_c=3, r=2, dtype=torch.float64, spatial=4, grads=grads)
        names = [n for n in t if t[n].requires_grad]

        def fn(*leaves):
            args = dict(t, **dict(zip(names, leaves)))
            return ops.lora_conv(args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"], 0.7, 2, 1)
        assert torch.autograd.gradcheck(fn, [t[n] for n in names])


def test_conv_double_backward_is_refused():
    t = make(2, dtype=torch.float64)
    y = ops.lora_conv(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.7, 1, 1)
    (grad_a,) = torch.autograd.grad(y.square().sum(), [t["lora_A"]], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|marked with @once_differentiable"):
        grad_a.sum().backward()


def test_conv_compiles_fullgraph():
    torch._dynamo.reset()
    t = make(2)

    def step(x, A, B):
        return ops.lora_conv(x, t["weight"], t["bias"], A, B, 0.5, 1, 1).square().mean()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    results = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        loss = fn(t["x"], t["lora_A"], t["lora_B"])
        results[name] = [loss, *torch.autograd.grad(loss, [t["x"], t["lora_A"], t["lora_B"]])]
    for got, want in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, want)


BAD = {
    "dtypes": (lambda t: t.update(lora_A=t["lora_A"].double()), TypeError, "must share one dtype"),
    "grouped weight": (lambda t: t.update(lora_A=t["lora_A"][:, :2]), ValueError, r"lora_A must have shape \[r, 5, 3, 3\]"),
    "B shape": (lambda t: t.update(lora_B=t["lora_B"][:, :, :, :0]), ValueError, r"lora_B must have shape \[7, 3, 1, 1\]"),
    "2-D weight": (lambda t: t.update(weight=t["weight"][:, :, 0, 0]), ValueError, "Conv1d/2d/3d weight"),
    "x dtype": (lambda t: t.update(x=t["x"].double()), TypeError, "x is torch.float64"),
    "x dims": (lambda t: t.update(x=t["x"][0, 0]), ValueError, r"x must be \[N, 5, spatial x2\]"),
    "stride": (lambda t: t.update(stride=(1, 2, 3)), ValueError, "stride must be an int or 2 ints"),
    "scaling": (lambda t: t.update(scaling=float("inf")), ValueError, "scaling must be a finite float"),
}


@pytest.mark.parametrize("change,error,pattern", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_clear_error(change, error, pattern):
    t = {n: v.detach() for n, v in make(2).items()}
    t.update(scaling=1.0, stride=1, padding=1)
    change(t)
    with pytest.raises(error, match=pattern):
        ops.lora_conv(**t)


# ================================================================ dora_conv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("magnitude_shape", ["peft", "flat"])
def test_dora_conv_matches_reference(dtype, dims, magnitude_shape):
    t = make(dims, dtype=dtype, grads=("x", "lora_A", "lora_B"))
    gen = torch.Generator().manual_seed(9)
    shape = (1, 7, *(1,) * dims) if magnitude_shape == "peft" else (7,)
    t["magnitude"] = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()

    def run(fn, tensors, grad):
        y = fn(tensors["x"], tensors["weight"], tensors["bias"], tensors["lora_A"], tensors["lora_B"],
               tensors["magnitude"], 0.9, 1, 1)
        names = [n for n, v in tensors.items() if v.requires_grad]
        return y, dict(zip(names, torch.autograd.grad(y, [tensors[n] for n in names], grad)))
    y0 = reference.dora_conv(*(v.detach() for v in t.values()), 0.9, 1, 1)
    grad = random_like(y0.shape, dtype, "cpu", seed=3)

    def cast(fn=None):
        return {n: (v.detach().double() if fn is None else fn(v.detach().double())).requires_grad_(v.requires_grad)
                for n, v in t.items()}
    y, grads = run(ops.dora_conv, t, grad)
    y_t, grads_t = run(reference.dora_conv, t, grad)
    y_o, grads_o = run(reference.dora_conv, cast(), grad.double())
    assert_within_torch_error(y, y_t, y_o, what="y")
    for name in grads:
        assert_within_torch_error(grads[name], grads_t[name], grads_o[name], what=f"grad of {name}")


def test_dora_conv_bad_magnitude():
    t = {n: v.detach() for n, v in make(2).items()}
    with pytest.raises(ValueError, match="magnitude must be a torch.float32 tensor of 7 elements"):
        ops.dora_conv(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], torch.ones(6), 1.0, 1, 1)
