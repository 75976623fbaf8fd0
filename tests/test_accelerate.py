"""lora_ext.accelerate / restore against the real PEFT, on tiny random transformers models.

Every comparison of the fused path with PEFT uses the tolerance rule (lora_testing):
our error against an fp64 run of the same PEFT model is at most 2x PEFT's own error.
Paths that fall back to PEFT's forward must match PEFT to the bit.
"""
import copy
import logging
import pickle
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import lora_ext
from lora_ext import ops, reference
from lora_ext.accelerate import accelerated_layers, fused_lora_linear_class
from lora_testing import DispatchCounter, assert_within_torch_error

VOCAB, BATCH, SEQ = 128, 2, 8
LAYERS_PER_BLOCK = {"llama": 7, "gpt2": 4}  # q,k,v,o,gate,up,down / c_attn,c_proj,c_fc,c_proj


def tiny_model(kind: str, dtype=torch.float32) -> nn.Module:
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                          max_position_embeddings=64, attn_implementation="eager")
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                         eos_token_id=0, attn_implementation="eager")
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype)


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    """PEFT starts with B = 0 (a no-op adapter); give every A and B random values so
    the adapter term is visible in outputs and in every gradient. Scales as a trained
    adapter might have: A like nn.Linear's init, B like the base weights (std 0.02), so
    the adapter term is of the order of the base term."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def peft_model(kind="llama", dropout=0.0, dtype=torch.float32, adapters=("default",), **config):
    autocast = config.pop("autocast", False)
    torch.manual_seed(0)
    base = tiny_model(kind, dtype)
    cfg = dict(r=8, lora_alpha=12, target_modules="all-linear", lora_dropout=dropout)
    cfg.update(config)
    model = peft.get_peft_model(base, peft.LoraConfig(**cfg), adapter_name=adapters[0],
                                autocast_adapter_dtype=autocast)
    for i, name in enumerate(adapters[1:]):
        model.add_adapter(name, peft.LoraConfig(**{**cfg, "r": 4 + i, "lora_alpha": 7}))
    randomize_adapters(model)
    return model


def token_ids(seed=5):
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def output_grad(dtype, seed=6):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, SEQ, VOCAB, generator=gen, dtype=torch.float64).to(dtype)


def forward_backward(model, ids, backward=True):
    """(logits, {name: grad} of every lora_A / lora_B parameter)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    grads = {}
    if backward:
        (logits * output_grad(logits.dtype)).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if ("lora_A" in n or "lora_B" in n) and p.requires_grad}
    return logits.detach(), grads


def assert_matches_peft(ours, theirs, oracle, what=""):
    (y, grads), (y_t, grads_t), (y_o, grads_o) = ours, theirs, oracle
    assert_within_torch_error(y, y_t, y_o, what=f"{what} logits")
    assert grads.keys() == grads_t.keys() == grads_o.keys() and grads
    for name in grads:
        assert_within_torch_error(grads[name], grads_t[name], grads_o[name], what=f"{what} {name}")


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of ops.lora_linear, to prove which path a forward took."""
    calls = []
    original = ops.lora_linear

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)
    monkeypatch.setattr(ops, "lora_linear", spy)
    return calls


def n_lora_layers(kind):
    return 2 * LAYERS_PER_BLOCK[kind]


# ================================================================ swapping in place


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_swaps_every_lora_linear_in_place_without_copies(kind, caplog):
    model = peft_model(kind)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    state = {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="lora_ext.accelerate"):
        assert lora_ext.accelerate(model) is model
    swapped = accelerated_layers(model)
    assert len(swapped) == n_lora_layers(kind)
    assert f"swapped {n_lora_layers(kind)} LoRA layer(s)" in caplog.text
    after = dict(model.named_modules())
    assert after.keys() == modules.keys()
    assert all(after[k] is modules[k] for k in modules)  # the same objects, class switched
    assert all(isinstance(after[n], PeftLoraLinear) for n in swapped)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()} == state


def test_gpt2_conv1d_layers_are_peft_linear_with_fan_in_fan_out():
    model = peft_model("gpt2")
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert type(layer) is PeftLoraLinear and type(layer.base_layer) is Conv1D
    assert layer.fan_in_fan_out is True


def test_accelerate_twice_is_a_no_op(caplog):
    model = peft_model()
    lora_ext.accelerate(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    with caplog.at_level(logging.INFO, logger="lora_ext.accelerate"):
        lora_ext.accelerate(model)
    assert "swapped 0 LoRA layer(s) (14 already swapped)" in caplog.text
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_model_without_lora_linear_warns_and_is_returned_unchanged():
    model = tiny_model("llama")
    classes = [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match="nothing to swap: the model has no peft.tuners.lora.layer.Linear"):
        assert lora_ext.accelerate(model) is model
    assert [type(m) for m in model.modules()] == classes


def test_model_with_only_embedding_lora_is_swapped_without_warning():
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=["embed_tokens"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lora_ext.accelerate(model) is model
    assert accelerated_layers(model) == ["base_model.model.model.embed_tokens"]


def test_model_with_only_an_unfused_kind_warns_and_names_the_layer():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 6)

        def forward(self, x):
            return self.lin(x)

    # LoRA on a raw parameter (target_parameters): a lora.ParamWrapper, a kind not fused here
    model = peft.get_peft_model(Net(), peft.LoraConfig(target_modules=[], target_parameters=["lin.weight"]))
    with pytest.warns(UserWarning, match=r"nothing to swap.*a lora.ParamWrapper layer .*1 layer: base_model\.model\.lin\)"):
        assert lora_ext.accelerate(model) is model


def test_accelerate_rejects_a_non_module():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        lora_ext.accelerate("model")


def test_restore_rejects_a_non_module():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        lora_ext.restore(42)


def test_restore_switches_back_and_matches_peft_bitwise():
    model = peft_model()
    ids = token_ids()
    want = forward_backward(model, ids)
    lora_ext.accelerate(model)
    assert lora_ext.restore(model) is model
    assert accelerated_layers(model) == []
    assert sum(type(m) is PeftLoraLinear for m in model.modules()) == 14
    got = forward_backward(model, ids)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(got[1][n], want[1][n]) for n in want[1])


def test_restore_of_a_model_never_accelerated_changes_nothing():
    model = peft_model()
    classes = [type(m) for m in model.modules()]
    lora_ext.restore(model)
    assert [type(m) for m in model.modules()] == classes


# ================================================================ numerics vs PEFT


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("adapters", [("default",), ("default", "other")], ids=["one", "two"])
def test_train_mode_matches_peft(kind, adapters, fused_calls):
    model = peft_model(kind, adapters=adapters)
    model.base_model.set_adapter(list(adapters))
    model.train()
    oracle_model = copy.deepcopy(model).double()
    ids = token_ids()
    theirs = forward_backward(model, ids)
    oracle = forward_backward(oracle_model, ids)
    lora_ext.accelerate(model)
    ours = forward_backward(model, ids)
    assert len(fused_calls) == n_lora_layers(kind)
    assert len(ours[1]) == 2 * len(adapters) * n_lora_layers(kind)  # every A and B has a grad
    assert_matches_peft(ours, theirs, oracle, kind)


def test_eval_mode_matches_peft(fused_calls):
    model = peft_model(dropout=0.3).eval()
    oracle_model = copy.deepcopy(model).double()
    ids = token_ids()
    theirs, oracle = forward_backward(model, ids), forward_backward(oracle_model, ids)
    lora_ext.accelerate(model)
    ours = forward_backward(model, ids)
    assert all(call["training"] is False for call in fused_calls) and fused_calls
    assert_matches_peft(ours, theirs, oracle, "eval")


def test_bf16_model_with_bf16_adapters_is_fused_and_matches_peft(fused_calls):
    model = peft_model(dtype=torch.bfloat16)  # autocast_adapter_dtype=False: bf16 adapters
    oracle_model = copy.deepcopy(model).double()
    ids = token_ids()
    theirs, oracle = forward_backward(model, ids), forward_backward(oracle_model, ids)
    lora_ext.accelerate(model)
    ours = forward_backward(model, ids)
    assert len(fused_calls) == 14
    assert_matches_peft(ours, theirs, oracle, "bf16")


def test_disable_adapter_context_matches_peft(fused_calls):
    model = peft_model()
    ids = token_ids()
    with model.disable_adapter():
        want = forward_backward(model, ids, backward=False)[0]
    lora_ext.accelerate(model)
    with model.disable_adapter():
        got = forward_backward(model, ids, backward=False)[0]
    assert fused_calls == []
    assert torch.equal(got, want)
    forward_backward(model, ids, backward=False)  # enabled again: fused
    assert len(fused_calls) == 14


def test_merged_and_unmerged_match_peft(fused_calls):
    model = peft_model().eval()
    ids = token_ids()
    unmerged_peft = forward_backward(model, ids, backward=False)[0]
    oracle = forward_backward(copy.deepcopy(model).double(), ids, backward=False)[0]
    model.merge_adapter()
    merged_peft = forward_backward(model, ids, backward=False)[0]
    model.unmerge_adapter()
    lora_ext.accelerate(model)
    model.merge_adapter()
    assert torch.equal(forward_backward(model, ids, backward=False)[0], merged_peft)
    assert fused_calls == []  # merged: the base layer alone, as in PEFT
    model.unmerge_adapter()
    unmerged_ours = forward_backward(model, ids, backward=False)[0]
    assert len(fused_calls) == 14
    assert_within_torch_error(unmerged_ours, unmerged_peft, oracle, what="after unmerge")


def test_set_adapter_switches_what_the_fused_layer_computes(fused_calls):
    model = peft_model(adapters=("default", "other")).eval()
    ids = token_ids()
    want = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        want[name] = forward_backward(model, ids, backward=False)[0]
    lora_ext.accelerate(model)
    for name in ("other", "default"):
        model.set_adapter(name)
        got = forward_backward(model, ids, backward=False)[0]
        torch.testing.assert_close(got, want[name], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want["default"], want["other"])


def test_optimizer_built_before_accelerate_still_trains_the_adapters():
    model = peft_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lora_ext.accelerate(model)
    forward_backward(model, token_ids())
    opt.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad
               and not torch.equal(p, before[n])]
    assert len(changed) == len(before) == 28


def test_save_pretrained_is_identical_before_and_after(tmp_path):
    model = peft_model()
    model.save_pretrained(tmp_path / "before")
    lora_ext.accelerate(model)
    model.save_pretrained(tmp_path / "after")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()


@pytest.mark.parametrize("shape", [(0, 64), (3, 0, 64), "transposed"])
def test_empty_and_non_contiguous_inputs_match_peft(shape, fused_calls):
    model = peft_model().eval()
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    if shape == "transposed":
        x = torch.randn(64, 5).t()
        assert not x.is_contiguous()
    else:
        x = torch.randn(shape)
    want = layer(x)
    lora_ext.accelerate(model)
    got = layer(x)
    assert len(fused_calls) == 1 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ================================================================ fallbacks to PEFT's forward


def _assert_falls_back_bitwise(model, fused_calls, ids=None, **forward_kwargs):
    ids = token_ids() if ids is None else ids
    want = forward_backward(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_ext.accelerate(model)
    got = forward_backward(model, ids)
    assert fused_calls == []
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(got[1][n], want[1][n]) for n in want[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapters", [("default",), ("default", "other")], ids=["one", "two"])
def test_half_base_with_fp32_adapters_is_fused_and_matches_peft(dtype, adapters, fused_calls):
    """PEFT's default autocast_adapter_dtype=True: fp32 adapters over a half base, no autocast.
    The op runs the adapter branch in fp32 as PEFT does; gradients come in fp32."""
    model = peft_model(dtype=dtype, autocast=True, adapters=adapters)
    model.base_model.set_adapter(list(adapters))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    oracle_model = copy.deepcopy(model).double()
    ids = token_ids()
    theirs, oracle = forward_backward(model, ids), forward_backward(oracle_model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: every layer is fused
        lora_ext.accelerate(model)
    ours = forward_backward(model, ids)
    assert len(fused_calls) == 14
    assert ours[0].dtype == theirs[0].dtype
    assert all(g.dtype == torch.float32 for g in ours[1].values())
    assert_matches_peft(ours, theirs, oracle, f"{dtype} base, fp32 adapters")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dora_is_fused_and_matches_peft(kind, train, monkeypatch):
    """PEFT's DoRA layers (Linear and Conv1D) run ops.dora_linear, with PEFT's numbers."""
    calls = []
    original = ops.dora_linear
    monkeypatch.setattr(ops, "dora_linear", lambda *a, **k: calls.append(a) or original(*a, **k))
    model = peft_model(kind, dropout=0.1, use_dora=True)
    model.train(train)
    if train:  # dropout masks differ from PEFT's: compare without dropout, train mode
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    oracle_model = copy.deepcopy(model).double()
    ids = token_ids()
    theirs, oracle = forward_backward(model, ids), forward_backward(oracle_model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: every layer is fused
        lora_ext.accelerate(model)
    ours = forward_backward(model, ids)
    assert len(calls) == n_lora_layers(kind)
    assert_matches_peft(ours, theirs, oracle, f"{kind} DoRA")


def test_dora_with_two_active_adapters_falls_back(fused_calls):
    model = peft_model(use_dora=True, adapters=("default", "other"))
    model.base_model.set_adapter(["default", "other"])
    _assert_falls_back_bitwise(model, fused_calls)


def _forward_backward_autocast(model, ids, dtype):
    with torch.autocast("cpu", dtype=dtype):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
    (logits.float() * output_grad(torch.float32)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if ("lora_A" in n or "lora_B" in n) and p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32_base", "bf16_base"])
@pytest.mark.parametrize("adapters", [("default",), ("default", "other")], ids=["one", "two"])
def test_cpu_autocast_is_fused_and_matches_peft(dtype, base_dtype, adapters, fused_calls):
    """transformers' Trainer with bf16=True / fp16=True: the forward under torch.autocast, fp32
    adapters (PEFT's default). The fused op runs in the autocast dtype (its autocast rule) and
    the fp32 adapters get fp32 gradients, with PEFT's numbers by the tolerance rule."""
    model = peft_model(dtype=base_dtype, autocast=True, adapters=adapters)
    model.base_model.set_adapter(list(adapters))
    model.train()
    oracle_model = copy.deepcopy(model).double()
    ids = token_ids()
    theirs = _forward_backward_autocast(model, ids, dtype)
    oracle = forward_backward(oracle_model, ids)
    lora_ext.accelerate(model)
    with DispatchCounter() as counter:
        ours = _forward_backward_autocast(model, ids, dtype)
    assert len(fused_calls) == 14
    assert counter.counts["lora_linear_forward"] == 14  # the C++ op itself, not a fallback
    assert counter.dtypes["lora_linear_forward"] == {dtype}  # ... in the autocast dtype
    assert ours[0].dtype == theirs[0].dtype
    for name, grad in ours[1].items():
        assert grad.dtype == torch.float32, name
    assert_matches_peft(ours, theirs, oracle, f"autocast {dtype}")


def test_cpu_autocast_with_dropout_trains_through_the_fused_op(fused_calls):
    """Dropout masks differ from PEFT's (another generator), so this checks the path, the
    dtypes and that a mask was drawn: the fused op in bf16, fp32 adapter gradients."""
    model = peft_model(dropout=0.1, autocast=True).train()
    lora_ext.accelerate(model)
    with DispatchCounter() as counter:
        _, grads = _forward_backward_autocast(model, token_ids(), torch.bfloat16)
    assert len(fused_calls) == 14 and all(call["training"] for call in fused_calls)
    assert counter.dtypes["lora_linear_forward"] == {torch.bfloat16}
    assert counter.counts["lora_linear_backward"] == 14
    assert len(grads) == 28 and all(g.dtype == torch.float32 and g.isfinite().all() for g in grads.values())


def test_hook_on_an_inner_module_falls_back_and_still_fires(fused_calls):
    model = peft_model()
    seen = []
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_A["default"].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    lora_ext.accelerate(model)
    forward_backward(model, token_ids())
    assert seen == [(BATCH, SEQ, 8)]
    assert len(fused_calls) == 13  # every other layer is still fused


def test_hook_on_the_lora_layer_itself_still_fires(fused_calls):
    model = peft_model()
    seen = []
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    lora_ext.accelerate(model)
    forward_backward(model, token_ids())
    assert seen == [(BATCH, SEQ, 64)] and len(fused_calls) == 14


def test_mixed_batch_adapter_names_falls_back_and_matches_peft(fused_calls):
    model = peft_model(adapters=("default", "other")).eval()
    ids = token_ids()
    names = ["other", "__base__"]
    want = model(input_ids=ids, adapter_names=names).logits
    lora_ext.accelerate(model)
    got = model(input_ids=ids, adapter_names=names).logits
    assert fused_calls == [] and torch.equal(got, want)


# ================================================================ dropout


def test_dropout_mask_is_the_philox_mask_of_a_seed_from_torch_rng():
    model = peft_model(dropout=0.25).train()
    lora_ext.accelerate(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 64)
    torch.manual_seed(11)
    got = layer(x)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
    want = reference.lora_linear(x, layer.base_layer.weight, layer.base_layer.bias,
                                 layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                 layer.scaling["default"], 0.25, seed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    no_dropout = reference.lora_linear(x, layer.base_layer.weight, None,
                                       layer.lora_A["default"].weight,
                                       layer.lora_B["default"].weight, layer.scaling["default"])
    assert not torch.allclose(got, no_dropout, atol=1e-3)


def test_dropout_is_reproducible_with_the_same_torch_seed():
    model = peft_model(dropout=0.2, adapters=("default", "other"))
    model.base_model.set_adapter(["default", "other"])
    model.train()
    lora_ext.accelerate(model)
    ids = token_ids()
    runs = []
    for seed in (21, 21, 22):
        torch.manual_seed(seed)
        runs.append(forward_backward(model, ids))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    assert not torch.allclose(runs[0][0], runs[2][0])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputes_the_same_mask(use_reentrant):
    model = peft_model(dropout=0.3).train()
    lora_ext.accelerate(model)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x0 = torch.randn(4, 64)
    results = []
    for checkpointed in (False, True):
        x = x0.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(31)
        if checkpointed:
            y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=use_reentrant)
        else:
            y = layer(x)
        torch.manual_seed(99)  # the recomputation must not depend on the RNG state here
        (y * y).sum().backward()
        results.append((y.detach(), x.grad, layer.lora_A["default"].weight.grad,
                        layer.lora_B["default"].weight.grad))
    for plain, ckpt in zip(*results):
        assert torch.equal(plain, ckpt)


def test_model_gradient_checkpointing_gives_the_same_gradients():
    model = peft_model(dropout=0.3).train()
    lora_ext.accelerate(model)
    ids = token_ids()
    torch.manual_seed(41)
    plain = forward_backward(model, ids)
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(41)
    ckpt = forward_backward(model, ids)
    assert torch.equal(plain[0], ckpt[0])
    assert plain[1].keys() == ckpt[1].keys()
    assert all(torch.equal(plain[1][n], ckpt[1][n]) for n in plain[1])


# ================================================================ compile, copy, pickle


def test_compiled_accelerated_layer_fullgraph_matches_eager():
    model = peft_model().eval()
    lora_ext.accelerate(model)
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    x = torch.randn(2, 3, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compiled_accelerated_model_matches_eager_in_training(dropout, fused_calls):
    model = peft_model("gpt2", dropout=dropout).train()
    lora_ext.accelerate(model)
    ids = token_ids()
    torch.manual_seed(51)
    eager = forward_backward(model, ids)
    compiled = torch.compile(model.base_model.model, backend="inductor")
    torch.manual_seed(51)
    model.zero_grad(set_to_none=True)
    logits = compiled(input_ids=ids).logits
    (logits * output_grad(logits.dtype)).sum().backward()
    torch.testing.assert_close(logits, eager[0], rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        if name in eager[1]:
            torch.testing.assert_close(p.grad, eager[1][name], rtol=1e-4, atol=1e-5)


def test_deepcopy_of_an_accelerated_model_stays_accelerated_and_independent():
    model = peft_model().eval()
    lora_ext.accelerate(model)
    clone = copy.deepcopy(model)
    assert len(accelerated_layers(clone)) == 14
    ids = token_ids()
    assert torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(clone.parameters(), model.parameters()))


def test_pickle_round_trip_of_an_accelerated_layer():
    model = peft_model().eval()
    lora_ext.accelerate(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    copy_ = pickle.loads(pickle.dumps(layer))
    assert type(copy_) is fused_lora_linear_class()
    x = torch.randn(3, 128)
    assert torch.equal(copy_(x), layer(x))
