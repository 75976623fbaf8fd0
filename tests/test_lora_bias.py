"""lora_bias=True (PEFT's bias on lora_B) against the real PEFT: construction and init, files
both ways, outputs and gradients (the Linear path fused through ops.lora_linear), merging into
the base bias, mixed batches, the errors PEFT raises, and lora_ext.accelerate on PEFT's layers.
"""
import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import ops, reference
from lora_testing import assert_within_torch_error
from peft_twins import (assert_same_numbers, assert_same_state, check_both_ways, inputs, peft_twin,
                        randomize_adapters, run, tiny_gpt2, tiny_llama)

NO_BIAS_WARNING = "`lora_bias=True` was passed but the targeted layer of type"
MERGE_ERROR = "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias"


class ConvNet(nn.Module):
    """Conv1d -> (Conv2d, Conv3d) -> Linear: every layer kind lora_bias applies to."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv1d = nn.Conv1d(3, 6, 3, padding=1, bias=bias)
        self.conv2d = nn.Conv2d(6, 8, 3, padding=1, bias=bias)
        self.conv3d = nn.Conv3d(2, 4, 3, padding=1, bias=bias)
        self.lin = nn.Linear(12, 5, bias=bias)

    def forward(self, x):  # x [B, 3, 16]
        a = torch.relu(self.conv1d(x))
        b = self.conv2d(a.reshape(-1, 6, 4, 4)).mean((2, 3))
        c = self.conv3d(a.reshape(-1, 2, 3, 4, 4)).mean((2, 3, 4))
        return self.lin(torch.cat([b, c], -1))


def conv_net(seed: int = 0, bias: bool = True) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(bias)


CONV_TARGETS = ["conv1d", "conv2d", "conv3d", "lin"]


def conv_inputs(seed: int = 5) -> dict:
    return {"x": torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(seed))}


def lora_bias_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_B" in n and n.endswith(".bias")]


# ---------------------------------------------------------------- construction, init, keys


@pytest.mark.parametrize("init", [True, False])
def test_construction_and_init_give_peft_parameters_and_keys(init):
    """Same torch seed, same config: the same parameters (the lora_B bias drawn by nn.Linear /
    ConvNd in PEFT's order, zeroed by init True) under the same state_dict keys."""
    kwargs = dict(target_modules=CONV_TARGETS, lora_bias=True, lora_alpha=32, init_lora_weights=init)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(conv_net(), peft.LoraConfig(**kwargs))
    torch.manual_seed(1)
    ours = lora_ext.get_peft_model(conv_net(), lora_ext.LoraConfig(**kwargs))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = lora_bias_names(ours)
    assert len(names) == 4 and names == lora_bias_names(theirs)
    biases = [p for n, p in ours.named_parameters() if n in names]
    assert all(p.requires_grad for p in biases)
    assert all((p == 0).all() for p in biases) == (init is True)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    layer = ours.base_model.model.lin
    assert layer.lora_bias == {"default": True} and "lora_bias" in layer.other_param_names


def test_config_round_trips_lora_bias(tmp_path):
    config = lora_ext.LoraConfig(target_modules=["q_proj"], lora_bias=True)
    assert config.to_dict()["lora_bias"] is True
    config.save_pretrained(tmp_path)
    assert lora_ext.LoraConfig.from_pretrained(tmp_path).lora_bias is True
    assert peft.LoraConfig.from_pretrained(tmp_path).lora_bias is True


# ---------------------------------------------------------------- files, outputs, gradients


@pytest.mark.parametrize("kind", ["llama", "gpt2", "conv"])
def test_files_outputs_and_gradients_match_peft_both_ways(kind, tmp_path):
    """The lora_B biases travel as `...lora_B.bias` both ways; outputs and every gradient
    (the lora_B bias's included) match PEFT by the tolerance rule."""
    if kind == "conv":
        config = dict(target_modules=CONV_TARGETS, lora_alpha=32)
        base, model_inputs = conv_net, conv_inputs()
    else:
        config, base, model_inputs = dict(lora_alpha=32), None, inputs(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # llama's Linear layers have no bias: PEFT's warning
        ours, theirs = check_both_ways(kind if kind != "conv" else "embconv", tmp_path, base=base,
                                       model_inputs=model_inputs, lora_bias=True, **config)
    names = lora_bias_names(ours)
    assert names and names == lora_bias_names(theirs)
    assert all(ours.get_parameter(n).abs().sum() > 0 for n in names)  # random, so they count


def test_linear_forward_is_fused_with_the_bias_and_its_gradient_is_right(tmp_path, monkeypatch):
    calls = []
    original = ops.lora_linear
    monkeypatch.setattr(ops, "lora_linear", lambda *a, **k: calls.append(k) or original(*a, **k))
    ours, theirs, _ = peft_twin("gpt2", tmp_path, lora_bias=True, lora_alpha=32)
    ours.train(), theirs.train()
    assert_same_numbers(ours, theirs, inputs("gpt2"), grads=True, what="gpt2 lora_bias")
    assert calls and all(isinstance(k["lora_bias"], torch.Tensor) for k in calls)
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    assert layer.lora_B["default"].bias.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_with_fp32_adapters_matches_peft(dtype, tmp_path):
    """PEFT's autocast_adapter_dtype: fp32 adapters (bias included) over a half base; the bias
    is added in the fp32 adapter branch, as PEFT's lora_B adds it."""
    def base():
        return tiny_gpt2().to(dtype)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(target_modules=["c_attn", "c_fc"], lora_bias=True,
                                                         lora_alpha=32))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lora_ext.PeftModel.from_pretrained(base(), tmp_path, is_trainable=True)
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    assert layer.lora_B["default"].bias.dtype == torch.float32
    ours.train(), theirs.train()
    assert_same_numbers(ours, theirs, inputs("gpt2"), grads=True, what=f"{dtype} base")


def test_two_active_adapters_with_bias_match_peft(tmp_path):
    ours, theirs, _ = peft_twin("gpt2", tmp_path, lora_bias=True, lora_alpha=32)
    for model, lib in ((ours, lora_ext), (theirs, peft)):
        model.add_adapter("other", lib.LoraConfig(target_modules=["c_attn"], r=2, lora_alpha=3, lora_bias=True))
    randomize_adapters(theirs, seed=9, names=("other",))
    ours.load_state_dict(theirs.state_dict())
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "other"])
    ours.train(), theirs.train()
    assert_same_numbers(ours, theirs, inputs("gpt2"), grads=True, what="two adapters")


def test_mixed_batch_adds_each_rows_bias_as_peft(tmp_path):
    ours, theirs, _ = peft_twin("gpt2", tmp_path, lora_bias=True, lora_alpha=32)
    for model, lib in ((ours, lora_ext), (theirs, peft)):
        model.add_adapter("plain", lib.LoraConfig(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8))
    randomize_adapters(theirs, seed=9, names=("plain",))
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    ids = inputs("gpt2")["input_ids"].repeat(2, 1)
    names = ["default", "__base__", "plain", "default"]
    y = ours(input_ids=ids, adapter_names=names).logits
    y_t = theirs(input_ids=ids, adapter_names=names).logits
    y_o = copy.deepcopy(theirs).double()(input_ids=ids, adapter_names=names).logits
    assert_within_torch_error(y, y_t, y_o, what="mixed batch")
    alone = ours(input_ids=ids[:1]).logits  # row 0 is "default": its bias is in
    torch.testing.assert_close(y[:1], alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- merging


@pytest.mark.parametrize("kind", ["gpt2", "conv"])
@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_folds_scaled_bias_into_the_base_bias_as_peft(kind, safe_merge, tmp_path):
    config = dict(target_modules=CONV_TARGETS, base=conv_net) if kind == "conv" else {}
    model_inputs = conv_inputs() if kind == "conv" else inputs(kind)
    ours, theirs, _ = peft_twin("embconv" if kind == "conv" else kind, tmp_path, lora_bias=True, lora_alpha=32,
                                **config)
    ours.eval(), theirs.eval()
    unmerged = run(ours, model_inputs)[0]
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    ours.merge_adapter(safe_merge=safe_merge)
    theirs.merge_adapter(safe_merge=safe_merge)
    assert_same_state(ours, theirs)
    torch.testing.assert_close(run(ours, model_inputs)[0], unmerged, rtol=1e-4, atol=1e-5)
    ours.unmerge_adapter()
    for name, value in before.items():
        torch.testing.assert_close(ours.get_parameter(name), value, rtol=1e-5, atol=1e-6, msg=name)
    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    assert_same_state(merged_ours, merged_theirs)
    torch.testing.assert_close(run(merged_ours, model_inputs)[0], unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bias_free_base_warns_then_merge_raises_and_changes_nothing(kind, safe_merge):
    if kind == "linear":
        base, targets, layer_type = tiny_llama(), ["q_proj", "v_proj"], "Linear"
    else:
        base, targets, layer_type = conv_net(bias=False), CONV_TARGETS, "Conv1d"
    for lib in (peft, lora_ext):
        with pytest.warns(UserWarning, match=f"{NO_BIAS_WARNING} {layer_type} has no bias"):
            model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(target_modules=targets, lora_bias=True))
        with pytest.raises(RuntimeError, match=MERGE_ERROR):
            model.merge_adapter(safe_merge=safe_merge)
    # ours raises before touching anything (PEFT's unsafe merge has already added the weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=MERGE_ERROR):
        model.merge_adapter(safe_merge=safe_merge)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(layer.merged for _, layer in model.base_model.lora_layers())


def test_safe_merge_refuses_a_non_finite_bias_and_leaves_the_layer_alone(tmp_path):
    ours, _, _ = peft_twin("gpt2", tmp_path, lora_bias=True)
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B["default"].bias[0] = float("inf")
    bias = layer.base_layer.bias.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.bias, bias) and not layer.merged


# ---------------------------------------------------------------- errors


def test_embedding_refuses_lora_bias_as_peft():
    from peft_twins import tiny_embconv
    for lib in (peft, lora_ext):
        with pytest.raises(ValueError, match="lora_bias=True is not supported for Embedding"):
            lib.get_peft_model(tiny_embconv(), lib.LoraConfig(target_modules=["emb"], lora_bias=True))


@pytest.mark.parametrize("extra, message", [
    (dict(use_dora=True), "lora_bias=True is not supported for DoRA"),
    (dict(init_lora_weights="gaussian"), "only supported with init_lora_weights=True or False"),
    (dict(init_lora_weights="pissa"), "only supported with init_lora_weights=True or False"),
])
def test_config_errors_are_peft_errors(extra, message):
    for lib in (peft, lora_ext):
        with pytest.raises(ValueError, match=message):
            lib.LoraConfig(target_modules=["q_proj"], lora_bias=True, **extra)


# ---------------------------------------------------------------- the op


def _peft_arithmetic(x, weight, bias, A, B, scaling, p, seed, training, lora_bias):
    """PEFT's Linear: base(x) in the base dtype + lora_B(lora_A(drop(x))) * s in the adapters'
    dtype (lora_B's bias included), rounded once to the base dtype; the op's Philox mask."""
    xa = x.to(A.dtype)
    dropped = xa * reference.dropout_mask(xa, p, seed) / (1 - p)
    branch = nn.functional.linear(nn.functional.linear(dropped, A), B, lora_bias) * scaling
    return (nn.functional.linear(x, weight, bias) + branch).to(x.dtype)


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16_base_fp32_adapters"])
def test_op_lora_bias_matches_reference_with_gradients(mixed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64)
    weight, bias = torch.randn(12, 16, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen,
                                                                                        dtype=torch.float64)
    A, B = torch.randn(4, 16, generator=gen, dtype=torch.float64), torch.randn(12, 4, generator=gen,
                                                                               dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    grad_y = torch.randn(3, 5, 12, generator=gen, dtype=torch.float64)
    base_dtype = torch.bfloat16 if mixed else torch.float32

    def run_with(fn, base_dt, adapter_dt):
        leaves = [t.to(dt).requires_grad_() for t, dt in ((x, base_dt), (weight, base_dt), (bias, base_dt),
                                                           (A, adapter_dt), (B, adapter_dt), (b, adapter_dt))]
        y = fn(*leaves[:5], 1.7, 0.3, 11, training=True, lora_bias=leaves[5])
        y.backward(grad_y.to(y.dtype))
        return [y] + [t.grad for t in leaves]

    ours = run_with(ops.lora_linear, base_dtype, torch.float32)
    torchs = run_with(_peft_arithmetic, base_dtype, torch.float32)
    oracle = run_with(reference.lora_linear, torch.float64, torch.float64)
    for name, o, t, r in zip(["y", "x", "weight", "bias", "A", "B", "lora_bias"], ours, torchs, oracle):
        assert_within_torch_error(o, t, r, what=name)


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16_base_fp32_adapters"])
def test_op_lora_bias_compiles_fullgraph_and_gradchecks(mixed):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    base_dtype = torch.bfloat16 if mixed else torch.float32
    x, W = torch.randn(2, 5, 8, generator=gen).to(base_dtype), torch.randn(6, 8, generator=gen).to(base_dtype)
    A, B = torch.randn(3, 8, generator=gen), torch.randn(6, 3, generator=gen)
    b = torch.randn(6, generator=gen).requires_grad_()

    def step(b):
        return ops.lora_linear(x, W, None, A, B, 0.5, 0.2, 9, lora_bias=b).float().square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    want, got = step(b), compiled(b)
    torch.testing.assert_close(got, want)
    # inductor keeps the gradient of the bf16 output in fp32 where eager rounds it to bf16
    tolerance = dict(rtol=1.6e-2, atol=1e-5) if mixed else {}
    torch.testing.assert_close(torch.autograd.grad(got, b)[0], torch.autograd.grad(want, b)[0], **tolerance)
    if not mixed:  # fp64 gradcheck of every input, lora_bias included
        leaves = [t.double().requires_grad_() for t in (x, W, A, B, b)]
        assert torch.autograd.gradcheck(
            lambda x, W, A, B, b: ops.lora_linear(x, W, None, A, B, 0.5, 0.2, 9, lora_bias=b), leaves)


def test_op_refuses_a_bad_lora_bias():
    x, W, A, B = torch.randn(2, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match=r"lora_bias must have shape \[6\]"):
        ops.lora_linear(x, W, None, A, B, 1.0, lora_bias=torch.zeros(5))
    with pytest.raises(TypeError, match="lora_bias has dtype torch.float64 but lora_A has torch.float32"):
        ops.lora_linear(x, W, None, A, B, 1.0, lora_bias=torch.zeros(6, dtype=torch.float64))
    with pytest.raises(TypeError, match="lora_bias must be a Tensor or None"):
        ops.lora_linear(x, W, None, A, B, 1.0, lora_bias=[0.0] * 6)


# ---------------------------------------------------------------- accelerate


@pytest.mark.parametrize("kind, dtype", [("llama", torch.float32), ("gpt2", torch.float32),
                                         ("gpt2", torch.bfloat16)])
def test_accelerate_fuses_peft_lora_bias_layers(kind, dtype, monkeypatch):
    calls = []
    original = ops.lora_linear
    monkeypatch.setattr(ops, "lora_linear", lambda *a, **k: calls.append(k) or original(*a, **k))
    base = (tiny_llama if kind == "llama" else tiny_gpt2)().to(dtype)
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["c_attn", "c_proj", "c_fc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # llama: PEFT's no-bias warning
        model = peft.get_peft_model(base, peft.LoraConfig(target_modules=targets, lora_bias=True, lora_alpha=32))
    randomize_adapters(model)
    model.train()
    theirs = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back
        lora_ext.accelerate(model)
    assert_same_numbers(model, theirs, inputs(kind), grads=True, what=f"accelerate {kind} {dtype}")
    assert calls and all(k["lora_bias"] is not None for k in calls)


# ---------------------------------------------------------------- 4-bit base


def test_nf4_base_adds_and_merges_the_scaled_bias():
    """Over an NF4 base (PEFT's lora.bnb.Linear4bit) the forward adds scaling·b as PEFT's
    lora_B does. Merging folds scaling·b into the base bias, which keeps the merged output
    equal to the unmerged one up to the 4-bit rounding of the weight (PEFT 0.21's 4-bit merge
    adds b without the scaling)."""
    from lora_ext.nf4 import NF4Linear

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = NF4Linear.from_linear(nn.Linear(64, 32), double_quant=False)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = lora_ext.get_peft_model(Net(), lora_ext.LoraConfig(target_modules=["lin"], lora_bias=True,
                                                                lora_alpha=32, init_lora_weights=False))
    model.eval()
    layer = model.base_model.model.lin
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    s, A, B, b = layer.scaling["default"], layer.lora_A["default"].weight, layer.lora_B["default"].weight, \
        layer.lora_B["default"].bias
    base = layer.base_layer
    want = x @ base.dequantize().T + base.bias + s * ((x @ A.T) @ B.T + b)
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    bias_before = base.bias.detach().clone()
    with pytest.warns(UserWarning):  # PEFT's 4-bit rounding warning
        model.merge_adapter()
    torch.testing.assert_close(base.bias, bias_before + s * b.detach())
    # the weight was re-quantised (4-bit rounding); the bias is plain: merged, the layer is W' x + b'
    torch.testing.assert_close(model(x), x @ base.dequantize().T + base.bias, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning):
        model.unmerge_adapter()
    torch.testing.assert_close(base.bias, bias_before)
