"""NF4Linear and quantize_model against the real bitsandbytes 0.50 (CPU).

State dicts compare byte for byte with bnb.nn.Linear4bit (quant_type="nf4"), both ways;
forward and backward follow the tolerance rule against an fp64 oracle built from the
dequantised weight; the memory accounting is checked against an independent formula and
against the bytes bitsandbytes stores.
"""
from __future__ import annotations

import copy
import io
import json
import math
import warnings

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import NF4Linear, memory_footprint, ops, quantize_model
from lora_ext.nf4 import parse_quant_state, to_bnb
from lora_testing import assert_within_torch_error
from nf4_testing import assert_state_dicts_equal, bnb_dequantize, bnb_linear4bit, make_linear, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

warnings.filterwarnings("ignore", message=".*kernels.*")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- bitsandbytes layout, both ways

SHAPES = [(96, 128), (33, 7), (5, 64), (130, 258)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", SHAPES)
def test_state_dict_is_bitsandbytes_byte_for_byte(shape, blocksize, double_quant, dtype):
    linear = make_linear(*shape, dtype=dtype)
    ours = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant)
    theirs = bnb_linear4bit(linear, blocksize, double_quant)
    assert_state_dicts_equal(ours.state_dict(), theirs.state_dict())
    assert ours.weight.dtype == torch.uint8 and not ours.weight.requires_grad
    assert tuple(ours.weight.shape) == ((shape[0] * shape[1] + 1) // 2, 1)
    assert ours.dequantize().dtype == dtype
    assert torch.equal(ours.dequantize(), bnb_dequantize(theirs))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitsandbytes_state_dict_loads_into_nf4linear(double_quant, dtype):
    linear = make_linear(40, 72, dtype=dtype)
    theirs = bnb_linear4bit(linear, 128, double_quant)
    state = theirs.state_dict()
    # a layer built with other settings takes the checkpoint's blocksize, nesting and dtype
    ours = NF4Linear(72, 40, blocksize=64, double_quant=not double_quant)
    ours.load_state_dict(state)
    assert (ours.blocksize, ours.double_quant, ours.weight_dtype) == (128, double_quant, dtype)
    assert_state_dicts_equal(ours.state_dict(), state)
    assert torch.equal(ours.dequantize(), bnb_dequantize(theirs))
    built = NF4Linear.from_state_dict(state)
    assert_state_dicts_equal(built.state_dict(), state)
    converted = NF4Linear.from_bnb(theirs)
    assert_state_dicts_equal(converted.state_dict(), state)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4linear_state_dict_loads_into_bitsandbytes(double_quant):
    linear = make_linear(48, 80)
    ours = NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant)
    state = ours.state_dict()
    layer = bnb.nn.Linear4bit(80, 48, quant_type="nf4", device="meta")
    stats = {k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu", module=layer)
    layer.bias = nn.Parameter(state["bias"].clone())
    layer.support_avx512bf16_for_cpu = False
    assert_state_dicts_equal(layer.state_dict(), state)
    assert torch.equal(bnb_dequantize(layer), ours.dequantize())
    # the helper does the same
    assert_state_dicts_equal(to_bnb(ours).state_dict(), state)


def test_state_dict_survives_safetensors_and_torch_save(tmp_path):
    from safetensors.torch import load_file, save_file
    model = nn.Sequential(make_linear(16, 64), nn.ReLU(), make_linear(8, 16))
    quantize_model(model)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    fresh = nn.Sequential(NF4Linear(64, 16), nn.ReLU(), NF4Linear(16, 8))
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert_state_dicts_equal(fresh.state_dict(), model.state_dict())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert_state_dicts_equal(again.state_dict(), model.state_dict())
    assert_state_dicts_equal(copy.deepcopy(model).state_dict(), model.state_dict())


def test_dense_checkpoint_quantises_on_load():
    linear = make_linear(24, 64)
    layer = NF4Linear(64, 24, blocksize=32, double_quant=False)
    layer.load_state_dict(linear.state_dict())
    assert_state_dicts_equal(layer.state_dict(), NF4Linear.from_linear(linear, 32, False).state_dict())


# ---------------------------------------------------------------- forward and backward


def _oracle(layer: NF4Linear, x: torch.Tensor) -> torch.Tensor:
    weight = layer.dequantize(torch.float32).double()
    bias = None if layer.bias is None else layer.bias.double()
    return nn.functional.linear(x.double(), weight, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [0, 1, 7])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_follows_the_tolerance_rule(dtype, rows, bias):
    linear = make_linear(40, 96, dtype=dtype, bias=bias)
    layer = NF4Linear.from_linear(linear)
    x = torch.randn(2, rows, 96, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, rows, 40)
    torchs = nn.functional.linear(x, layer.dequantize(dtype), None if layer.bias is None else layer.bias)
    assert_within_torch_error(y, torchs, _oracle(layer, x), what="NF4Linear forward")


def test_forward_on_non_contiguous_input():
    layer = NF4Linear.from_linear(make_linear(24, 64))
    x = torch.randn(64, 10).T  # [10, 64], not contiguous
    assert not x.is_contiguous()
    torchs = nn.functional.linear(x, layer.dequantize(), layer.bias)
    assert_within_torch_error(layer(x), torchs, _oracle(layer, x), what="non-contiguous x")


def test_compute_dtype_runs_the_matmul_in_it_and_returns_the_input_dtype():
    linear = make_linear(24, 64)
    layer = NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    plain = NF4Linear.from_linear(linear)
    assert torch.equal(y, plain(x.bfloat16()).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_with_respect_to_x(dtype):
    layer = NF4Linear.from_linear(make_linear(40, 96, dtype=dtype))
    x = torch.randn(6, 96, dtype=dtype, requires_grad=True)
    grad = torch.randn(6, 40, dtype=dtype)
    layer(x).backward(grad)
    assert layer.weight.grad is None
    weight = layer.dequantize(dtype)
    torchs = grad @ weight
    oracle = grad.double() @ weight.double()
    assert_within_torch_error(x.grad, torchs, oracle, magnitude=grad.double().abs() @ weight.double().abs(),
                              what="NF4Linear grad x")


def test_trainable_bias_gets_its_gradient():
    layer = NF4Linear.from_linear(make_linear(8, 32))
    x = torch.randn(4, 32)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((8,), 4.0))


def test_dtype_casts_keep_the_statistics_in_fp32():
    layer = NF4Linear.from_linear(make_linear(24, 300))
    before = layer.state_dict()
    layer.half()
    assert layer.nested_absmax.dtype == torch.float32 and layer.quant_map.dtype == torch.float32
    assert layer.bias.dtype == torch.float16 and layer.weight.dtype == torch.uint8
    after = layer.state_dict()
    for key in before:
        if key != "bias":
            assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("double_quant", [True, False])
def test_matches_bitsandbytes_forward_within_the_rule(double_quant):
    # rows of 128 (a multiple of the blocksize): bnb's native CPU kernel is right only there
    linear = make_linear(64, 128)
    ours = NF4Linear.from_linear(linear, double_quant=double_quant)
    theirs = bnb_linear4bit(linear, double_quant=double_quant)
    x = torch.randn(9, 128)
    oracle = _oracle(ours, x)
    assert_within_torch_error(ours(x), theirs(x).detach(), oracle, what="NF4Linear vs bitsandbytes")


# ---------------------------------------------------------------- whole models


def test_quantize_model_replaces_linears_but_keeps_the_head():
    model = tiny_llama()
    dense = copy.deepcopy(model)
    quantize_model(model)
    names = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    dense_names = {n for n, m in dense.named_modules() if isinstance(m, nn.Linear)}
    assert names == dense_names - {"lm_head"}
    assert type(model.lm_head) is nn.Linear
    for name in names:
        expected = NF4Linear.from_linear(dense.get_submodule(name))
        assert_state_dicts_equal(model.get_submodule(name).state_dict(), expected.state_dict())
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        logits, dense_logits = model(ids).logits, dense(ids).logits
    assert logits.shape == dense_logits.shape
    # 4-bit weights move the logits, but not beyond a fraction of their spread
    assert (logits - dense_logits).abs().mean() < 0.25 * dense_logits.std()


def test_quantize_model_target_and_skip_modules():
    model = quantize_model(tiny_llama(), target_modules=["q_proj", "v_proj"], skip_modules=["layers.1.self_attn.v_proj"])
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, NF4Linear))
    assert quantized == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                         "model.layers.1.self_attn.q_proj"]
    regex = quantize_model(tiny_llama(), target_modules=r".*mlp\.(up|down)_proj", blocksize=128,
                           double_quant=False)
    layers = [m for m in regex.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 4 and all(m.blocksize == 128 and not m.double_quant for m in layers)
    with pytest.raises(ValueError, match="no Linear layer matched"):
        quantize_model(tiny_llama(), target_modules=["nope"])


def bnb_llama(model):
    """The model with every Linear but the head replaced by bitsandbytes' own nf4 Linear4bit."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, bnb_linear4bit(module))
    return model


def test_bitsandbytes_model_converts_without_requantising(monkeypatch):
    model = bnb_llama(tiny_llama())
    expected = {n: m.state_dict() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        bnb_logits = model(ids).logits

    def refuse(*args, **kwargs):
        raise AssertionError("quantize_model re-quantised a bitsandbytes layer")

    monkeypatch.setattr(ops, "nf4_quantize", refuse)
    quantize_model(model)
    assert {n for n, m in model.named_modules() if isinstance(m, NF4Linear)} == set(expected)
    for name, state in expected.items():
        assert_state_dicts_equal(model.get_submodule(name).state_dict(), state)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, bnb_logits, rtol=1e-4, atol=1e-4)


def expected_nf4_bytes(out_features: int, in_features: int, blocksize: int, double_quant: bool) -> int:
    """Packed codes, absmax (fp32, or uint8 codes + fp32 nested absmax + fp32 offset), codebooks."""
    n = out_features * in_features
    blocks = math.ceil(n / blocksize)
    size = math.ceil(n / 2) + 16 * 4
    if double_quant:
        size += blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4
    else:
        size += 4 * blocks
    return size


@pytest.mark.parametrize("double_quant", [True, False])
def test_memory_accounting_is_half_a_byte_per_parameter_plus_statistics(double_quant):
    model = tiny_llama()
    dense = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n != "lm_head"}
    other_before = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if not any(n.startswith(k + ".weight") for k in dense))
    quantize_model(model, double_quant=double_quant)
    footprint = memory_footprint(model)
    assert footprint["nf4_params"] == sum(o * i for o, i in dense.values())
    assert footprint["nf4_bytes"] == sum(expected_nf4_bytes(o, i, 64, double_quant) for o, i in dense.values())
    assert footprint["other_bytes"] == other_before + sum(b.numel() * b.element_size() for b in model.buffers()
                                                          if not any(b is x for m in model.modules()
                                                                     if isinstance(m, NF4Linear)
                                                                     for x in m.buffers()))
    # the same number of bytes bitsandbytes stores (its nested offset lives in the JSON as a float)
    for name, (o, i) in dense.items():
        layer = model.get_submodule(name)
        stored = {k: v for k, v in layer.state_dict().items() if k not in ("bias",) and "quant_state" not in k}
        assert layer.quantized_nbytes() == sum(v.numel() * v.element_size() for v in stored.values()) + (
            4 if double_quant else 0)
    # per parameter: half a byte, plus 1 byte (double quant) or 4 bytes (fp32) of absmax per
    # block of 64; the per-layer codebooks (1088 or 64 bytes) fade on a layer of real size
    big = NF4Linear.from_linear(make_linear(512, 1024), double_quant=double_quant)
    per_param = big.quantized_nbytes() / (512 * 1024)
    bound = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    assert bound < per_param < bound + 0.003


# ---------------------------------------------------------------- bad input


def test_fp4_quant_state_is_refused_by_name():
    theirs = bnb_linear4bit(make_linear(16, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="fp4"):
        NF4Linear(64, 16).load_state_dict(theirs.state_dict())
    with pytest.raises(ValueError, match="fp4"):
        NF4Linear.from_state_dict(theirs.state_dict())
    with pytest.raises(ValueError, match="fp4"):
        NF4Linear.from_bnb(theirs)
    model = nn.Sequential(theirs)
    with pytest.raises(ValueError, match="quant_type 'fp4'"):
        quantize_model(model)


@pytest.mark.parametrize("key", ["weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                 "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"])
def test_missing_statistic_is_named(key):
    state = NF4Linear.from_linear(make_linear(16, 64)).state_dict()
    del state[key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        NF4Linear(64, 16).load_state_dict(state)


def test_wrong_blocksize_is_refused():
    with pytest.raises(ValueError, match="blocksize must be one of"):
        NF4Linear.from_linear(make_linear(16, 64), blocksize=48)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_model(nn.Sequential(make_linear(4, 8)), blocksize=100)
    state = NF4Linear.from_linear(make_linear(16, 64), blocksize=64).state_dict()
    meta = json.loads(bytes(state["weight.quant_state.bitsandbytes__nf4"].tolist()))
    meta["blocksize"] = 128
    state["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="wrong blocksize"):
        NF4Linear(64, 16).load_state_dict(state)
    meta["blocksize"] = 100
    state["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        parse_quant_state(state)


def test_packed_size_not_matching_the_shape_is_refused():
    state = NF4Linear.from_linear(make_linear(16, 64)).state_dict()
    state["weight"] = state["weight"][:-1]
    with pytest.raises(ValueError, match="packed bytes"):
        NF4Linear(64, 16).load_state_dict(state)


def test_other_bad_states_are_named():
    state = NF4Linear.from_linear(make_linear(16, 64)).state_dict()
    with pytest.raises(ValueError, match=r"holds a \[16, 64\] weight but this layer is \[32, 32\]"):
        NF4Linear(32, 32).load_state_dict(state)
    tampered = dict(state, **{"weight.quant_map": state["weight.quant_map"].flip(0)})
    with pytest.raises(ValueError, match="NF4 codebook"):
        NF4Linear(64, 16).load_state_dict(tampered)
    broken = dict(state, **{"weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)})
    with pytest.raises(ValueError, match="not the JSON"):
        NF4Linear(64, 16).load_state_dict(broken)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        NF4Linear(64, 16).load_state_dict(dict(state, **{"weight.extra": torch.zeros(1)}))
    with pytest.raises(RuntimeError, match="Missing key"):
        NF4Linear(64, 16).load_state_dict({})


def test_construction_errors():
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="cannot be quantised"):
        NF4Linear.from_linear(make_linear(4, 8).double())
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        NF4Linear(0, 4)
    with pytest.raises(TypeError, match="compute_dtype"):
        NF4Linear(4, 4, compute_dtype=torch.int8)
    assert "NF4Linear" in repr(lora_ext.NF4Linear(8, 4)) and "blocksize=64" in repr(NF4Linear(8, 4))


def test_quantize_model_refuses_a_model_with_lora_layers():
    model = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already holds LoRA layers"):
        quantize_model(model)


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_layers_equal_cpu_and_bitsandbytes_cuda(double_quant):
    linear = make_linear(96, 128)
    cpu = NF4Linear.from_linear(linear, double_quant=double_quant)
    gpu = NF4Linear.from_linear(copy.deepcopy(linear).cuda(), double_quant=double_quant)
    assert_state_dicts_equal({k: v.cpu() for k, v in gpu.state_dict().items()}, cpu.state_dict())
    assert_state_dicts_equal({k: v.cpu() for k, v in copy.deepcopy(cpu).cuda().state_dict().items()},
                             cpu.state_dict())
    theirs = bnb_linear4bit(linear, double_quant=double_quant, device="cuda")
    assert_state_dicts_equal({k: v.cpu() for k, v in gpu.state_dict().items()},
                             {k: v.cpu() for k, v in theirs.state_dict().items()})
    x = torch.randn(9, 128, device="cuda")
    oracle = _oracle(cpu, x.cpu())
    assert_within_torch_error(gpu(x), theirs(x).detach(), oracle, what="NF4Linear on CUDA vs bitsandbytes")
