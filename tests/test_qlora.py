"""QLoRA: LoRA and DoRA on NF4Linear, against PEFT on a bitsandbytes 4-bit base built from the same
bytes; merging; LoftQ against PEFT's algorithm (run on the CPU).

Model outputs follow the tolerance rule with the dense model (dequantised weights, PEFT's
dense LoRA) in fp64 as the oracle and the same dense model in fp32 as PyTorch's own error.
"""
from __future__ import annotations

import copy
import inspect
import json
import warnings

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import (LoftQConfig, LoraConfig, NF4Linear, PeftModel, get_peft_model, memory_footprint, quantize_model,
                      reference, replace_lora_weights_loftq)
from lora_ext.layers import Linear4bit
from lora_ext.layers.linear import fresh_dropout_seed
from lora_ext.layers.nf4 import lora_delta
from lora_testing import assert_within_torch_error
from nf4_testing import (assert_state_dicts_equal, bnb_copy, bnb_dequantize, dequantized_copy, make_linear,
                         tiny_llama)

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
safetensors = pytest.importorskip("safetensors")

warnings.filterwarnings("ignore", message=".*kernels.*")
IDS = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(7))


def qlora_config(**kwargs) -> dict:
    base = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    base.update(kwargs)
    return base


def randomise_adapters(model: nn.Module, seed: int = 3) -> None:
    """Give every adapter weight (B too, and DoRA magnitudes) values away from their initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.05)


def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_matches_dense_oracle(ours: torch.Tensor, dense_peft: nn.Module, what: str) -> None:
    oracle = logits(copy.deepcopy(dense_peft).double())
    torchs = logits(dense_peft)
    assert_within_torch_error(ours, torchs, oracle, what=what)


def quantized_llama(seed: int = 0, dtype=torch.float32) -> nn.Module:
    return quantize_model(tiny_llama(seed, dtype))


# ---------------------------------------------------------------- the layer


def test_get_peft_model_wraps_nf4_layers_and_counts_parameters_like_peft():
    base = quantized_llama()
    theirs = peft.get_peft_model(bnb_copy(base), peft.LoraConfig(**qlora_config()))
    ours = get_peft_model(base, LoraConfig(**qlora_config()))
    layers = [m for m in ours.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and all(isinstance(m.base_layer, NF4Linear) for m in layers)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad)
    assert "lora_ext.Linear4bit" in repr(layers[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_on_nf4_matches_the_lora_linear_reference_with_dropout(dtype):
    base = NF4Linear.from_linear(make_linear(40, 96, dtype=dtype))
    layer = Linear4bit(base, "default", r=6, lora_alpha=12, lora_dropout=0.25)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    layer.train()
    x = torch.randn(3, 5, 96, dtype=dtype, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    seed = fresh_dropout_seed()
    assert y.dtype == dtype
    grad = torch.randn_like(y)
    y.backward(grad)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    weight, bias = base.dequantize(torch.float32), base.bias.detach().float()

    def run(precision):
        xs = x.detach().to(precision).requires_grad_()
        As, Bs = A.detach().to(precision).requires_grad_(), B.detach().to(precision).requires_grad_()
        out = reference.lora_linear(xs, weight.to(precision), bias.to(precision), As, Bs, 2.0, 0.25, seed, True)
        out.backward(grad.to(precision))
        return out, xs.grad, As.grad, Bs.grad

    oracle = run(torch.float64)
    # PyTorch's own error: the base in the input dtype, the adapter in fp32, as PEFT computes them
    xs = x.detach().requires_grad_()
    As, Bs = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    base_out = nn.functional.linear(xs, weight.to(dtype), bias.to(dtype))
    adapter = reference.lora_linear(xs.float(), torch.zeros(40, 96), None, As, Bs, 2.0, 0.25, seed, True)
    torchs = base_out + adapter.to(dtype)
    torchs.backward(grad)
    assert_within_torch_error(y, torchs, oracle[0], what="QLoRA forward")
    assert_within_torch_error(x.grad, xs.grad, oracle[1], what="QLoRA grad x")
    assert_within_torch_error(A.grad, As.grad, oracle[2], what="QLoRA grad A")
    assert_within_torch_error(B.grad, Bs.grad, oracle[3], what="QLoRA grad B")


def test_lora_delta_gradcheck_with_dropout():
    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, A, B: lora_delta(x, A, B, 0.5, 0.3, 1234), (x, A, B))
    expected = reference.lora_linear(x, torch.zeros(7, 10, dtype=torch.float64), None, A, B, 0.5, 0.3, 1234, True)
    torch.testing.assert_close(lora_delta(x, A, B, 0.5, 0.3, 1234), expected)


def test_backward_keeps_x_and_z_but_no_dropped_copy_of_x():
    base = NF4Linear.from_linear(make_linear(16, 64))
    layer = Linear4bit(base, "default", r=4, lora_alpha=8, lora_dropout=0.5).train()
    x = torch.randn(8, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    activation_sized = [t for t in saved if t.numel() == x.numel() and t.dtype.is_floating_point]
    assert all(t is x or t.data_ptr() == x.data_ptr() for t in activation_sized), (
        "a dropped copy of x is kept for backward")
    assert any(t.shape == (8, 4) for t in saved)  # z = drop(x)·Aᵀ
    assert not any(t.dtype == torch.bool for t in saved)  # no stored mask
    y.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


def test_compiled_qlora_layer_matches_eager():
    base = NF4Linear.from_linear(make_linear(24, 64))
    layer = Linear4bit(base, "default", r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    eager_y = layer(x)
    eager_y.sum().backward()
    eager_grads = (x.grad.clone(), layer.lora_A["default"].weight.grad.clone())
    x.grad = None
    layer.zero_grad()
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close((x.grad, layer.lora_A["default"].weight.grad), eager_grads)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_training_decreases_the_loss_and_leaves_the_base_alone(dtype, use_dora):
    model = get_peft_model(quantized_llama(dtype=dtype), LoraConfig(**qlora_config(lora_dropout=0.1,
                                                                                   use_dora=use_dora)))
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "base_layer" in n}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 128, (4, 16))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    for name, tensor in model.state_dict().items():
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), name


def test_memory_footprint_of_a_qlora_model():
    base = quantized_llama()
    nf4 = memory_footprint(base)
    model = get_peft_model(base, LoraConfig(**qlora_config()))
    after = memory_footprint(model)
    adapters = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    assert after["nf4_bytes"] == nf4["nf4_bytes"] and after["nf4_params"] == nf4["nf4_params"]
    assert after["other_bytes"] == nf4["other_bytes"] + adapters


# ---------------------------------------------------------------- PEFT on bitsandbytes, both ways


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_trained_here_loads_in_peft_on_a_bitsandbytes_base(tmp_path, use_dora, dtype):
    base = quantized_llama(dtype=dtype)
    bnb_base, dense_base = bnb_copy(base), dequantized_copy(base)
    ours = get_peft_model(base, LoraConfig(**qlora_config(use_dora=use_dora)))
    randomise_adapters(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(bnb_base, tmp_path / "ours")
    ours_logits, theirs_logits = logits(ours), logits(theirs)
    dense = peft.PeftModel.from_pretrained(dense_base, tmp_path / "ours")
    assert_matches_dense_oracle(ours_logits, dense, "lora_ext QLoRA")
    assert_matches_dense_oracle(theirs_logits, dense, "PEFT on bitsandbytes")
    # the files PEFT writes for the same model have the same keys
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(ours_file) == sorted(theirs_file)
    for key in ours_file:
        assert torch.equal(ours_file[key], theirs_file[key]), key


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_trained_in_peft_on_bitsandbytes_loads_here(tmp_path, use_dora):
    base = quantized_llama(seed=1)
    bnb_base, dense_base = bnb_copy(base), dequantized_copy(base)
    theirs = peft.get_peft_model(bnb_base, peft.LoraConfig(**qlora_config(use_dora=use_dora)))
    randomise_adapters(theirs, seed=5)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base, tmp_path)
    assert all(isinstance(m, Linear4bit) for n, m in ours.named_modules() if n.endswith("q_proj"))
    dense = peft.PeftModel.from_pretrained(dense_base, tmp_path)
    assert_matches_dense_oracle(logits(ours), dense, "lora_ext QLoRA (PEFT adapter)")


def test_dora_magnitude_initialises_like_peft_on_bitsandbytes():
    base = quantized_llama()
    theirs = peft.get_peft_model(bnb_copy(base), peft.LoraConfig(**qlora_config(use_dora=True)))
    ours = get_peft_model(base, LoraConfig(**qlora_config(use_dora=True)))
    theirs_state = {k: v for k, v in theirs.state_dict().items() if "magnitude" in k}
    ours_state = {k: v for k, v in ours.state_dict().items() if "magnitude" in k}
    assert sorted(ours_state) == sorted(theirs_state) and ours_state
    for key in ours_state:
        torch.testing.assert_close(ours_state[key], theirs_state[key], rtol=1e-6, atol=1e-7)


def test_cached_dora_norm_on_nf4_follows_adapter_changes_in_inference():
    """In eval + no_grad the norm is cached; editing the adapter or its scale must not leave it stale."""
    model = get_peft_model(quantized_llama(), LoraConfig(**qlora_config(use_dora=True)))
    randomise_adapters(model)
    model.eval()  # once: train()/eval() drop the cache, so the forwards below must not call it

    def forward():
        with torch.no_grad():
            return model(input_ids=IDS).logits

    first = forward()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    magnitude = layer.lora_magnitude_vector["default"]
    assert magnitude._norm_cache is not None, "eval + no_grad must cache the norm"
    cached = magnitude._norm_cache[1]
    torch.testing.assert_close(forward(), first, rtol=0, atol=0)
    assert magnitude._norm_cache[1] is cached, "the cached norm must be reused"
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(5.0)
    layer.set_scale("default", 3.0)
    edited = forward()
    for module in model.modules():  # the same model with every cache dropped
        if hasattr(module, "_norm_cache"):
            module._norm_cache = None
    torch.testing.assert_close(edited, forward(), rtol=0, atol=0)
    assert not torch.allclose(edited, first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unload_requantises_as_peft_does(use_dora, dtype):
    base = quantized_llama(dtype=dtype)
    bnb_base = bnb_copy(base)
    ours = get_peft_model(base, LoraConfig(**qlora_config(use_dora=use_dora)))
    randomise_adapters(ours)
    theirs = peft.get_peft_model(bnb_base, peft.LoraConfig(**qlora_config(use_dora=use_dora)))
    peft.set_peft_model_state_dict(theirs, lora_ext.get_peft_model_state_dict(ours))
    before = logits(ours)
    with pytest.warns(UserWarning, match="rounding errors"):
        merged = ours.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_merged = theirs.merge_and_unload()
    layers = {n: m for n, m in merged.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 14 and not any(isinstance(m, Linear4bit) for m in merged.modules())
    for name, layer in layers.items():
        expected = theirs_merged.get_submodule(name)
        assert_state_dicts_equal(layer.state_dict(), expected.state_dict())
    # re-quantising rounds: close to the unmerged model, not equal
    after = logits(merged)
    assert 0 < (after - before).abs().mean() < 0.25 * before.std()


def test_merge_unmerge_and_safe_merge():
    model = get_peft_model(quantized_llama(), LoraConfig(**qlora_config()))
    randomise_adapters(model)
    # the whole model's state dict (4-bit bases included) loads back into itself
    state = model.state_dict()
    model.load_state_dict(state)
    assert_state_dicts_equal(model.state_dict(), state)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    original = layer.base_layer.dequantize()
    expected = original + layer.get_delta_weight("default")
    with pytest.warns(UserWarning, match="Merge lora module to 4-bit"):
        model.merge_adapter()
    assert layer.merged
    merged = layer.base_layer.dequantize()
    assert (merged - expected).abs().max() <= 0.6 * (expected.abs().max())  # one NF4 step at most
    assert torch.equal(merged, NF4Linear.from_linear(_linear_with(expected)).dequantize())
    with pytest.warns(UserWarning, match="Unmerge lora module to 4-bit"):
        model.unmerge_adapter()
    assert not layer.merged
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    before = layer.base_layer.state_dict()
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert_state_dicts_equal(layer.base_layer.state_dict(), before)


def _linear_with(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight.detach())
    return linear


def test_disable_adapter_and_mixed_batches():
    base = quantized_llama()
    plain = logits(copy.deepcopy(base))
    model = get_peft_model(base, LoraConfig(**qlora_config()))
    model.add_adapter("other", LoraConfig(**qlora_config(r=4)))
    randomise_adapters(model)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), plain)
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["default", "__base__", "other"]).logits
        model.set_adapter("other")
        other = model(input_ids=IDS).logits
        model.set_adapter("default")
        default = model(input_ids=IDS).logits
    torch.testing.assert_close(mixed[0], default[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], plain[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], other[2], rtol=1e-5, atol=1e-5)


def test_bitsandbytes_layers_are_taken_over_by_get_peft_model():
    base = bnb_copy(quantized_llama())
    model = get_peft_model(base, LoraConfig(**qlora_config()))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_initialisations_that_need_the_dense_weight_are_refused_on_nf4():
    for init in ("pissa", "olora", "loftq"):
        extra = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if init == "loftq" else {}
        with pytest.raises(ValueError, match="full-precision base weight"):
            get_peft_model(quantized_llama(), LoraConfig(**qlora_config(init_lora_weights=init, **extra)))


# ---------------------------------------------------------------- LoftQ


@pytest.fixture
def peft_loftq_without_scipy(monkeypatch):
    """PEFT's LoraConfig insists that scipy be installed for LoftQ, though nothing here uses it."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: real("json") if name == "scipy" else real(name, *args))


def peft_loftq_init_on_cpu():
    """PEFT's own loftq_init with its device fixed to the CPU (PEFT hard-codes cuda/xpu)."""
    from peft.utils import loftq_utils
    source = inspect.getsource(loftq_utils.loftq_init)
    patched = source.replace('compute_device = "xpu" if is_xpu_available() else "cuda"', 'compute_device = "cpu"')
    assert patched != source, "PEFT's loftq_init changed; update the CPU patch"
    namespace = dict(vars(loftq_utils))
    exec(compile(patched.replace("@torch.no_grad()\n", ""), "<peft loftq_init on cpu>", "exec"), namespace)
    return torch.no_grad()(namespace["loftq_init"])


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_init_matches_peft(num_iter):
    # rows of 128: bnb's native CPU dequantise (which PEFT calls) is right only for rows that
    # are a multiple of the blocksize, see nf4_testing.bnb_dequantize
    weight = torch.randn(48, 128) * 0.05
    q_peft, a_peft, b_peft = peft_loftq_init_on_cpu()(weight, num_bits=4, reduced_rank=6, num_iter=num_iter)
    q, a, b = lora_ext.loftq.loftq_init(weight, 4, 6, num_iter)
    assert torch.equal(q, q_peft)
    torch.testing.assert_close(a, a_peft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, b_peft, rtol=1e-5, atol=1e-6)


def loftq_model(num_iter: int, r: int = 8):
    dense = tiny_llama()
    config = LoraConfig(r=r, lora_alpha=r, target_modules="all-linear",
                        init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=num_iter))
    return dense, get_peft_model(copy.deepcopy(dense), config)


def _errors(dense, model) -> tuple[float, float]:
    quant = total = 0.0
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, lora_ext.layers.Linear):
            w = dense.get_submodule(name).weight
            q = layer.base_layer.weight
            delta = layer.get_delta_weight("default")
            quant += torch.linalg.norm(w - q).item() ** 2
            total += torch.linalg.norm(w - (q + delta)).item() ** 2
    return quant ** 0.5, total ** 0.5


def test_loftq_lowers_the_error_and_more_iterations_do_not_raise_it():
    errors = []
    for num_iter in (1, 2, 5):
        dense, model = loftq_model(num_iter)
        quant, total = _errors(dense, model)
        assert total < quant
        for name, layer in model.base_model.model.named_modules():
            if isinstance(layer, lora_ext.layers.Linear):
                w = dense.get_submodule(name).weight
                q = layer.base_layer.weight
                assert torch.linalg.norm(w - q - layer.get_delta_weight("default")) < torch.linalg.norm(w - q), name
        errors.append(total)
    assert errors[1] <= errors[0] * (1 + 1e-6) and errors[2] <= errors[1] * (1 + 1e-6), errors


def test_loftq_base_is_on_the_nf4_grid():
    _, model = loftq_model(2)
    for layer in model.modules():
        if isinstance(layer, lora_ext.layers.Linear):
            q = layer.base_layer.weight
            again = NF4Linear.from_linear(_linear_with(q), double_quant=False).dequantize()
            assert torch.equal(again, q)


def test_loftq_matches_peft_model_wide(monkeypatch, peft_loftq_without_scipy):
    from peft.tuners.lora import layer as peft_layer
    monkeypatch.setattr(peft_layer, "loftq_init", peft_loftq_init_on_cpu())
    dense, ours = loftq_model(2)
    theirs = peft.get_peft_model(copy.deepcopy(dense), peft.LoraConfig(
        r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=2)))
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert sorted(ours_state) == sorted(theirs_state)
    for key in ours_state:
        if "lora_" in key:
            torch.testing.assert_close(ours_state[key], theirs_state[key], rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(ours_state[key], theirs_state[key]), key


def test_loftq_config_round_trips_like_peft(tmp_path, peft_loftq_without_scipy):
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=3))
    config.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 3}
    assert written["init_lora_weights"] == "loftq"
    theirs = peft.LoraConfig.from_pretrained(tmp_path / "ours")
    assert theirs.loftq_config == {"loftq_bits": 4, "loftq_iter": 3}
    peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="loftq",
                    loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=3)).save_pretrained(tmp_path / "peft")
    peft_written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_written["loftq_config"] == written["loftq_config"]
    assert LoraConfig.from_pretrained(tmp_path / "peft").loftq_config == {"loftq_bits": 4, "loftq_iter": 3}


def test_replace_lora_weights_loftq_matches_peft_svd_of_the_residual(tmp_path):
    from peft.utils.loftq_utils import _low_rank_decomposition
    dense = tiny_llama()
    dense.save_pretrained(tmp_path, safe_serialization=True)
    base = quantize_model(copy.deepcopy(dense))
    bnb_base = bnb_copy(base)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    replace_lora_weights_loftq(model, model_path=str(tmp_path))
    for name, layer in model.base_model.model.named_modules():
        if not isinstance(layer, Linear4bit):
            continue
        w = dense.get_submodule(name).weight.detach()
        q = bnb_dequantize(bnb_base.get_submodule(name))
        expected = _low_rank_decomposition(w - q, reduced_rank=8)
        torch.testing.assert_close(layer.lora_A["default"].weight, expected["R"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B["default"].weight, expected["L"], rtol=1e-4, atol=1e-6)
        assert torch.linalg.norm(w - q - layer.get_delta_weight("default")) < torch.linalg.norm(w - q)


def test_replace_lora_weights_loftq_callback_can_roll_back(tmp_path):
    dense = tiny_llama()
    dense.save_pretrained(tmp_path, safe_serialization=True)
    model = get_peft_model(quantize_model(copy.deepcopy(dense)),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    seen = []

    def keep_only_q(peft_model, module_name):
        seen.append(module_name)
        return module_name.endswith("q_proj")

    replace_lora_weights_loftq(model, model_path=str(tmp_path / "model.safetensors"), callback=keep_only_q)
    assert sorted(seen) == sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                                  if isinstance(m, Linear4bit))
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, before[name]) == ("v_proj" in name), name


def test_loftq_bad_input():
    with pytest.raises(NotImplementedError, match="loftq_bits=8"):
        lora_ext.loftq.loftq_init(torch.randn(8, 8), 8, 2, 1)
    with pytest.raises(ValueError, match="loftq_iter must be a positive int"):
        lora_ext.loftq.loftq_init(torch.randn(8, 8), 4, 2, 0)
    with pytest.raises(ValueError, match="lacks 'loftq_iter'"):
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq",
                                                loftq_config={"loftq_bits": 4}))
    with pytest.warns(UserWarning, match="without the LoRA scaling"):
        get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                init_lora_weights="loftq", loftq_config=LoftQConfig()))
    with pytest.raises(ValueError, match="no 4-bit LoRA layer"):
        replace_lora_weights_loftq(get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])),
                                   model_path="unused")
    model = get_peft_model(quantized_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        replace_lora_weights_loftq(model, model_path="/nonexistent/folder")
    with pytest.raises(ValueError, match="pass model_path"):
        replace_lora_weights_loftq(model)


@pytest.mark.gpu
@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_trains_on_cuda_and_matches_the_cpu_forward(use_dora):
    base = quantized_llama()
    ours_cpu = get_peft_model(base, LoraConfig(**qlora_config(use_dora=use_dora)))
    randomise_adapters(ours_cpu)
    ours_gpu = copy.deepcopy(ours_cpu).cuda()
    for key, value in ours_gpu.state_dict().items():
        assert torch.equal(value.cpu(), ours_cpu.state_dict()[key]), key
    torch.testing.assert_close(_cuda_logits(ours_gpu), logits(ours_cpu), rtol=1e-3, atol=1e-3)
    params = [p for p in ours_gpu.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 128, (4, 16), device="cuda")
    ours_gpu.train()
    losses = []
    for _ in range(6):
        loss = ours_gpu(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def _cuda_logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS.cuda()).logits.cpu()


def test_qlora_train_benchmark_family_runs_and_checks_every_contestant():
    from lora_ext import benchmark as harness
    family = harness.get_family("qlora_train")
    cases = family.cases("quick", features=64, tokens=32)
    assert all(c.family == "qlora_train" for c in cases)
    doc = harness.run_benchmark(family, cases, "cpu", repeats=2, warmup=1, progress=False)
    (res,) = doc["results"]
    assert set(res["measurements"]) == {"dense", "peft_bnb", "lora_ext"}, res["skipped"]
    assert all(c["ok"] for c in res["check"].values()), res["check"]
    info = res["info"]
    assert info["lora_ext"]["trainable_parameters"] == info["peft_bnb"]["trainable_parameters"] > 0
    # under a byte per weight even at this size, where the per-layer codebooks weigh most
    assert info["lora_ext"]["nf4_bytes"] < info["lora_ext"]["nf4_params"]


def test_activation_checkpointing_regenerates_the_same_dropout_masks():
    model = get_peft_model(quantized_llama(), LoraConfig(**qlora_config(lora_dropout=0.3)))
    randomise_adapters(model)
    twin = copy.deepcopy(model)
    twin.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 128, (2, 8))
    grads = []
    for m in (model, twin):
        m.train()
        torch.manual_seed(21)
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
