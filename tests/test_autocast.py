"""Autocast and mixed dtypes: where PEFT users train.

- Under torch.autocast (transformers' Trainer with bf16=True / fp16=True) with fp32 adapters
  (PEFT's default autocast_adapter_dtype=True), the fused ops run in the autocast dtype through
  their autocast rules, and fp32 parameters get fp32 gradients.
- Without autocast, fp32 adapters over a bf16/fp16 base take the op's mixed path: PEFT's
  arithmetic (adapter branch in fp32, the sum rounded once), gradients in each parameter's dtype.

Every comparison uses the tolerance rule (lora_testing) against PEFT's own arithmetic, written
out here in PyTorch or run through PEFT itself; DispatchCounter proves which kernels ran.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lora_ext
from lora_ext import ops, reference
from lora_testing import DispatchCounter, assert_within_torch_error, make_lora_inputs, random_like
from peft_twins import BASES, randomize_adapters

peft = pytest.importorskip("peft")

HALF = [torch.bfloat16, torch.float16]
NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")


def _inputs(dtype_base, dtype_adapter, dora=False, seed=0):
    """x, weight, bias in dtype_base; lora_A, lora_B (and magnitude) in dtype_adapter; all leaves."""
    base = make_lora_inputs((3, 11, 40), 24, 6, dtype=torch.float64, seed=seed)
    named = {"x": base.x, "weight": base.weight, "bias": base.bias, "lora_A": base.lora_A,
             "lora_B": base.lora_B}
    if dora:
        norm = reference.dora_weight_norm(base.weight, base.lora_A, base.lora_B, 1.5)
        gen = torch.Generator().manual_seed(seed + 1)
        named["magnitude"] = norm * (1 + 0.2 * torch.randn(norm.shape, generator=gen, dtype=torch.float64))
    return {n: t.detach().to(dtype_base if n in ("x", "weight", "bias") else dtype_adapter).requires_grad_()
            for n, t in named.items()}


def _run(fn, named, grad_y, autocast_dtype=None):
    """(y, {name: grad}) of fn(**named) (under autocast when autocast_dtype is given)."""
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = fn(**named)
    grads = torch.autograd.grad(y, list(named.values()), grad_y.to(y.dtype))
    return y, dict(zip(named, grads))


def _compare(fn_ours, fn_torch, named, autocast_dtype=None, what=""):
    """The tolerance rule for y and every gradient: ours and PyTorch's in the same precision
    against fp64, with the floor from the same computation on |inputs|."""
    y_shape = (*named["x"].shape[:-1], named["weight"].shape[0])
    out_dtype = autocast_dtype or named["x"].dtype
    grad_y = random_like(y_shape, out_dtype, "cpu")
    y, grads = _run(fn_ours, named, grad_y, autocast_dtype)
    y_t, grads_t = _run(fn_torch, named, grad_y, autocast_dtype)
    as64 = {n: t.detach().double().requires_grad_() for n, t in named.items()}
    abs64 = {n: t.detach().double().abs().requires_grad_() for n, t in named.items()}
    y_o, grads_o = _run(fn_torch, as64, grad_y.double())
    y_m, grads_m = _run(fn_torch, abs64, grad_y.double().abs())
    assert y.dtype == y_t.dtype == out_dtype
    assert_within_torch_error(y, y_t, y_o, y_m, f"{what} y")
    for name, grad in grads.items():
        assert grad.dtype == named[name].dtype, f"{what}: grad of {name} in {grad.dtype}"
        grad_t = grads_t[name]
        if autocast_dtype is not None:
            # Under autocast both compute in the autocast dtype and return fp32 parameters' grads
            # upcast; the rule (and its floor of one rounding unit) applies in that precision.
            grad, grad_t = grad.to(autocast_dtype), grad_t.to(autocast_dtype)
        assert_within_torch_error(grad, grad_t, grads_o[name], grads_m[name], f"{what} grad of {name}")


# ---------------------------------------------------------------- PEFT's arithmetic, written out


def _peft_lora(x, weight, bias, lora_A, lora_B, scaling=1.5, p=0.0, seed=0):
    """peft.tuners.lora.layer.Linear.forward: base in its dtype, x cast to the adapters' dtype
    for the branch, the sum cast back to the base result's dtype."""
    result = F.linear(x, weight, bias)
    d = reference.lora_dropout(x.to(lora_A.dtype), p, seed)
    return (result + (d @ lora_A.T) @ lora_B.T * scaling).to(result.dtype)


def _peft_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling=1.5, p=0.0, seed=0):
    """PEFT's DoraLinearLayer.forward on top of Linear.forward (dtype handling included)."""
    result = F.linear(x, weight, bias)
    xa = x.to(lora_A.dtype)
    w = weight.to(xa.dtype)
    norm = reference.dora_weight_norm(w.detach(), lora_A.detach(), lora_B.detach(), scaling)
    g = magnitude / norm.to(magnitude.dtype)
    d = reference.lora_dropout(xa, p, seed)
    base = (result - bias) if p == 0.0 else F.linear(d, w)
    return (result + (g - 1) * base + g * ((d @ lora_A.T) @ lora_B.T) * scaling).to(result.dtype)


# ---------------------------------------------------------------- the ops under autocast


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", HALF)
def test_lora_linear_under_autocast_runs_the_kernel_in_the_autocast_dtype(dtype, dropout_p):
    named = _inputs(torch.float32, torch.float32)

    def ours(**t):
        return ops.lora_linear(**t, scaling=1.5, dropout_p=dropout_p, seed=9)

    def torchs(**t):  # reference.lora_linear under autocast is F.linear and matmuls there
        return reference.lora_linear(**t, scaling=1.5, dropout_p=dropout_p, seed=9)

    with DispatchCounter() as counter:
        _compare(ours, torchs, named, dtype, f"autocast {dtype}")
    assert counter.counts["lora_linear_forward"] == 1 and counter.dtypes["lora_linear_forward"] == {dtype}
    assert counter.counts["lora_linear_backward"] == 1


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", HALF)
def test_dora_linear_under_autocast_runs_the_kernel_in_the_autocast_dtype(dtype, dropout_p):
    named = _inputs(torch.float32, torch.float32, dora=True)

    def ours(**t):
        return ops.dora_linear(**t, scaling=1.5, dropout_p=dropout_p, seed=9)

    def torchs(**t):  # as PEFT under autocast: GEMMs in the autocast dtype, g and the sum in fp32
        return reference.dora_linear(**t, scaling=1.5, dropout_p=dropout_p, seed=9).to(dtype)

    with DispatchCounter() as counter:
        _compare(ours, torchs, named, dtype, f"DoRA autocast {dtype}")
    assert counter.counts["dora_linear_forward"] == 1 and counter.dtypes["dora_linear_forward"] == {dtype}


@pytest.mark.parametrize("dtype", HALF)
def test_direct_op_calls_follow_autocast(dtype):
    """The autocast rules live on the ops themselves (torch.ops.lora_ext.*), not only in the
    Python wrappers; fp32 statistics (NF4 absmax, DoRA's norm) are left alone."""
    t = _inputs(torch.float32, torch.float32, dora=True)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"])
    norm = ops.dora_weight_norm(t["weight"].detach(), t["lora_A"].detach(), t["lora_B"].detach(), 1.5)
    packed, absmax = ops.nf4_quantize(t["weight"].detach())
    with torch.autocast("cpu", dtype=dtype):
        y, z = torch.ops.lora_ext.lora_linear_forward(*args, 1.5, 0.1, torch.tensor(3), 0)
        y_d, _, _ = torch.ops.lora_ext.dora_linear_forward(*args, t["magnitude"], norm, 1.5, 0.0, torch.tensor(0), 0)
        y_q = torch.ops.lora_ext.nf4_matmul(t["x"], packed, absmax, 24, 64, t["bias"])
        norm_again = torch.ops.lora_ext.dora_weight_norm(t["weight"], t["lora_A"], t["lora_B"], 1.5)
    assert y.dtype == z.dtype == y_d.dtype == y_q.dtype == dtype
    assert norm_again.dtype == torch.float32
    torch.testing.assert_close(norm_again, norm)  # computed in fp32 (no half GEMM inside)
    (y.float().sum() + y_d.float().sum() + y_q.float().sum()).backward()
    for name, leaf in t.items():
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32, name


@pytest.mark.parametrize("dtype", HALF)
def test_nf4_matmul_under_autocast(dtype):
    x = torch.randn(5, 7, 64, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(24, 64) / 8
    bias = torch.randn(24, requires_grad=True)
    packed, absmax = ops.nf4_quantize(weight)
    dense = ops.nf4_dequantize(packed, absmax, (24, 64))
    grad_y = random_like((5, 7, 24), dtype, "cpu")
    results = {}
    for name, fn in (("ours", lambda x, b: ops.nf4_matmul(x, packed, absmax, 24, 64, b)),
                     ("torch", lambda x, b: F.linear(x, dense, b))):
        with torch.autocast("cpu", dtype=dtype):
            y = fn(x, bias)
        results[name] = (y, *torch.autograd.grad(y, [x, bias], grad_y))
    y_o = F.linear(x.double(), dense.double(), bias.double())
    gx_o, gb_o = grad_y.double() @ dense.double(), grad_y.double().sum((0, 1))
    ours, torchs = results["ours"], results["torch"]
    assert ours[0].dtype == dtype and ours[1].dtype == ours[2].dtype == torch.float32
    for got, want, oracle, what in zip(ours, torchs, (y_o, gx_o, gb_o), ("y", "grad x", "grad bias")):
        assert_within_torch_error(got, want, oracle, what=what)


# ---------------------------------------------------------------- the ops with fp32 adapters on a half base


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", HALF)
def test_lora_linear_with_fp32_adapters_on_a_half_base_matches_peft(dtype, dropout_p):
    named = _inputs(dtype, torch.float32)
    _compare(lambda **t: ops.lora_linear(**t, scaling=1.5, dropout_p=dropout_p, seed=9),
             lambda **t: _peft_lora(**t, p=dropout_p, seed=9), named, what=f"mixed {dtype}")


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", HALF)
def test_dora_linear_with_fp32_adapters_on_a_half_base_matches_peft(dtype, dropout_p):
    named = _inputs(dtype, torch.float32, dora=True)
    _compare(lambda **t: ops.dora_linear(**t, scaling=1.5, dropout_p=dropout_p, seed=9),
             lambda **t: _peft_dora(**t, p=dropout_p, seed=9), named, what=f"DoRA mixed {dtype}")


def test_mixed_path_keeps_only_x_and_z_for_backward():
    """As the fused kernel: no activation-sized copy (drop(x) or x in fp32) is saved."""
    t = _inputs(torch.bfloat16, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        ops.lora_linear(**t, scaling=1.5, dropout_p=0.2, seed=1)
    rows, in_features = 33, 40
    activations = [s for s in saved if s.numel() >= rows * in_features and s.data_ptr() not in
                   (t["x"].data_ptr(), t["weight"].data_ptr())]
    assert activations == [], [(s.shape, s.dtype) for s in activations]
    assert any(s.shape == (rows, 6) and s.dtype == torch.float32 for s in saved)  # z


def test_mixed_path_double_backward_matches_peft():
    t = _inputs(torch.float64, torch.float32)  # fp64 base, fp32 adapters: a precise mixed case
    grads = {}
    for name, fn in (("ours", lambda **k: ops.lora_linear(**k, scaling=1.5, dropout_p=0.2, seed=4)),
                     ("peft", lambda **k: _peft_lora(**k, p=0.2, seed=4))):
        y = fn(**t)
        gx, = torch.autograd.grad(y.square().sum(), t["x"], create_graph=True)
        grads[name] = torch.autograd.grad(gx.square().sum(), [t["lora_A"], t["lora_B"]])
    for got, want in zip(grads["ours"], grads["peft"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["autocast", "mixed"])
def test_compile_fullgraph_matches_eager(mode):
    torch._dynamo.reset()
    autocast = mode == "autocast"
    t = _inputs(torch.float32 if autocast else torch.bfloat16, torch.float32)

    def step(x, weight, bias, lora_A, lora_B):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = ops.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, 0.1, 1234)
        return y.float().square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    results = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        loss = fn(*t.values())
        results[name] = [loss, *torch.autograd.grad(loss, [t["x"], t["lora_A"], t["lora_B"]])]
    for got, want in zip(results["compiled"], results["eager"]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("op", ["lora_linear_forward", "dora_linear_forward", "nf4_matmul"])
@pytest.mark.parametrize("dtype", HALF)
def test_opcheck_under_autocast(dtype, op):
    t = _inputs(torch.float32, torch.float32, dora=True)
    factors = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"])
    if op == "lora_linear_forward":
        args = (*factors, 1.5, 0.1, torch.tensor(3), 0)
    elif op == "dora_linear_forward":
        norm = ops.dora_weight_norm(t["weight"].detach(), t["lora_A"].detach(), t["lora_B"].detach(), 1.5)
        args = (*factors, t["magnitude"], norm, 1.5, 0.1, torch.tensor(3), 0)
    else:
        packed, absmax = ops.nf4_quantize(t["weight"].detach())
        args = (t["x"], packed, absmax, 24, 64, t["bias"])
    with torch.autocast("cpu", dtype=dtype):
        torch.library.opcheck(getattr(torch.ops.lora_ext, op).default, args)


def test_mismatched_dtypes_outside_autocast_are_refused_with_the_rule():
    t = _inputs(torch.bfloat16, torch.float32)
    with pytest.raises(TypeError, match="lora_A has dtype torch.float32 but lora_B has torch.float16"):
        ops.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"].half(), 1.0)
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has torch.bfloat16"):
        ops.lora_linear(t["x"], t["weight"].float(), t["bias"], t["lora_A"], t["lora_B"], 1.0)


# ---------------------------------------------------------------- our layers against PEFT


def _peft_and_ours(tmp_path, base_dtype, **config):
    """PEFT's model with random fp32 adapters (autocast_adapter_dtype=True), and ours loaded
    from PEFT's files (fp32 adapters too), both on a tiny Llama in base_dtype."""
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", **config)
    theirs = peft.get_peft_model(BASES["llama"]().to(base_dtype), peft.LoraConfig(**cfg))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lora_ext.PeftModel.from_pretrained(BASES["llama"]().to(base_dtype), tmp_path, is_trainable=True)
    for model in (theirs, ours):
        adapters = [p for n, p in model.named_parameters() if "lora_" in n]
        assert adapters and all(p.dtype == torch.float32 for p in adapters)
    return ours.train(), theirs.train()


def _step(model, ids, autocast_dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logits = model(input_ids=ids).logits
    grad = random_like(logits.shape, torch.float64, "cpu", seed=6)
    (logits.double() * grad).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_model_matches_peft(ours, theirs, compute_dtype, what, autocast=True):
    """Logits and every gradient against PEFT by the tolerance rule, in compute_dtype.

    The fp32 adapter gradients of a model that runs in half precision (its activations and
    the gradients flowing between layers are half) carry half-precision errors from every
    layer above, in PEFT as here, and the two differ by where each rounds; so the rule, floor
    included, is applied in the precision the model computes in. The ops' own tests hold the
    adapter branch to fp32 precision."""
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    autocast_dtype = compute_dtype if autocast else None
    y, grads = _step(ours, ids, autocast_dtype)
    y_t, grads_t = _step(theirs, ids, autocast_dtype)
    y_o, grads_o = _step(copy.deepcopy(theirs).double(), ids, None)
    assert y.dtype == y_t.dtype
    assert_within_torch_error(y, y_t, y_o, what=f"{what} logits")
    assert grads.keys() == grads_t.keys() and grads
    for name, grad in grads.items():
        assert grad.dtype == grads_t[name].dtype == torch.float32, name
        assert_within_torch_error(grad.to(compute_dtype), grads_t[name].to(compute_dtype), grads_o[name],
                                  what=f"{what} {name}")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32_base", "bf16_base"])
@pytest.mark.parametrize("dtype", HALF)
def test_layers_under_autocast_are_fused_and_match_peft(dtype, base_dtype, use_dora, tmp_path):
    ours, theirs = _peft_and_ours(tmp_path, base_dtype, use_dora=use_dora)
    op = "dora_linear_forward" if use_dora else "lora_linear_forward"
    with DispatchCounter() as counter:
        _assert_model_matches_peft(ours, theirs, dtype, f"autocast {dtype}")
    assert counter.counts[op] == 14 and counter.dtypes[op] == {dtype}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("base_dtype", HALF)
def test_layers_with_fp32_adapters_on_a_half_base_are_fused_and_match_peft(base_dtype, use_dora, tmp_path,
                                                                          monkeypatch):
    ours, theirs = _peft_and_ours(tmp_path, base_dtype, use_dora=use_dora)
    name = "dora_linear" if use_dora else "lora_linear"
    calls = []
    original = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *a, **k: calls.append(a[0].dtype) or original(*a, **k))
    _assert_model_matches_peft(ours, theirs, base_dtype, f"{base_dtype} base", autocast=False)
    assert calls == [base_dtype] * 14


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", HALF)
def test_qlora_layer_under_autocast_matches_peft(dtype, use_dora):
    """QLoRA under autocast: nf4_matmul in the autocast dtype, the adapter branch too, fp32
    adapter gradients; PEFT's dense twin (the dequantised weights) is the reference."""
    from nf4_testing import dequantized_copy

    base = lora_ext.quantize_model(BASES["llama"]())
    dense = dequantized_copy(base)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora)
    theirs = peft.get_peft_model(dense, peft.LoraConfig(**cfg))
    randomize_adapters(theirs)
    ours = lora_ext.get_peft_model(base, lora_ext.LoraConfig(**cfg))
    adapters = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert not ours.load_state_dict(adapters, strict=False).unexpected_keys
    with DispatchCounter() as counter:
        _assert_model_matches_peft(ours.train(), theirs.train(), dtype, f"QLoRA autocast {dtype}")
    assert counter.counts["nf4_matmul"] == 14 and counter.dtypes["nf4_matmul"] == {dtype}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("mode", ["autocast", "mixed"])
def test_compiled_layer_matches_eager(mode, use_dora):
    """Our Linear layer with fp32 adapters, compiled whole (fullgraph) under autocast and on a
    bf16 base: the same outputs and gradients as eager."""
    torch._dynamo.reset()
    base_dtype = torch.float32 if mode == "autocast" else torch.bfloat16
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(40, 24)).to(base_dtype)
    model = lora_ext.get_peft_model(base, lora_ext.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                              use_dora=use_dora))
    randomize_adapters(model)
    layer = model.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 7, 40).to(base_dtype)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            y = layer(x)
        return y.float().square().mean()

    results = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, fullgraph=True))):
        loss = fn(x)
        params = [p for p in layer.parameters() if p.requires_grad]
        results[name] = [loss, *torch.autograd.grad(loss, params)]
    for got, want in zip(results["compiled"], results["eager"]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)
