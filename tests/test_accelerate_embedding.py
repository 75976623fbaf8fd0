"""Embedding LoRA through ops.lora_embedding: PEFT's lora.Embedding accelerated
(FusedLoraEmbedding) and lora_ext's own Embedding layer, against the real PEFT by the
tolerance rule; the cases that must keep PEFT's forward do so bit for bit, with the reason."""
import copy
import re
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.layer import Embedding as PeftLoraEmbedding
from torch import nn

import lora_ext
from lora_ext import ops
from lora_ext.accelerate import _static_reason, accelerated_layers, fused_lora_embedding_class
from lora_testing import assert_within_torch_error


class Net(nn.Module):
    def __init__(self, num=40, dim=24, **embedding_kwargs):
        super().__init__()
        self.emb = nn.Embedding(num, dim, **embedding_kwargs)
        self.head = nn.Linear(dim, 5)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def peft_net(dtype=torch.float32, adapters=("default",), train_base=False, embedding_kwargs=None, **config):
    torch.manual_seed(0)
    net = Net(**(embedding_kwargs or {})).to(dtype)
    config = {"target_modules": ["emb"], "r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    model = peft.get_peft_model(net, peft.LoraConfig(**config), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, peft.LoraConfig(**config))
    if train_base:
        model.base_model.model.emb.base_layer.weight.requires_grad_(True)
    return model


def ids(seed=1, shape=(3, 10), num=40):
    gen = torch.Generator().manual_seed(seed)
    out = torch.randint(0, num, shape, generator=gen)
    out[0, :3] = 1  # repeated tokens (and the padding index where one is set)
    return out


def forward_backward(model, x):
    y = model(x)
    grads = torch.autograd.grad(y.float().square().sum(), [p for _, p in model.named_parameters() if p.requires_grad])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return y, dict(zip(names, grads))


@pytest.fixture
def embedding_calls(monkeypatch):
    """Counts calls of ops.lora_embedding, to prove which path a forward took."""
    calls = []
    original = ops.lora_embedding

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    monkeypatch.setattr(ops, "lora_embedding", spy)
    return calls


CASES = {
    "fp32": dict(),
    "bf16 base, fp32 adapters": dict(dtype=torch.bfloat16),
    "fp16 base, fp16 adapters": dict(dtype=torch.float16, autocast_adapter_dtype=False),
    "padding_idx, trained table": dict(embedding_kwargs={"padding_idx": 1}, train_base=True),
    "rslora": dict(use_rslora=True, lora_alpha=3),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_accelerated_embedding_matches_peft(case, embedding_calls):
    case = dict(case)
    autocast_adapter_dtype = case.pop("autocast_adapter_dtype", True)
    theirs = peft_net(**case)
    if not autocast_adapter_dtype:  # PEFT's autocast_adapter_dtype=False: adapters stay in the base dtype
        theirs = theirs.to(case["dtype"])
    oracle = copy.deepcopy(theirs).double()
    ours = lora_ext.accelerate(copy.deepcopy(theirs))
    assert accelerated_layers(ours) == ["base_model.model.emb"]
    x = ids()
    y, grads = forward_backward(ours, x)
    assert len(embedding_calls) == 1
    y_t, grads_t = forward_backward(theirs, x)
    y_o, grads_o = forward_backward(oracle, x)
    assert y.dtype == y_t.dtype
    assert_within_torch_error(y, y_t, y_o, what="output")
    assert grads.keys() == grads_t.keys() and any("lora_embedding_A" in n for n in grads)
    for name in grads:
        assert grads[name].dtype == grads_t[name].dtype
        assert_within_torch_error(grads[name], grads_t[name], grads_o[name], what=name)


def test_padding_rows_get_no_gradient_as_in_peft():
    theirs = peft_net(embedding_kwargs={"padding_idx": 1}, train_base=True)
    ours = lora_ext.accelerate(copy.deepcopy(theirs))
    _, grads = forward_backward(ours, ids())
    _, grads_t = forward_backward(theirs, ids())
    prefix = "base_model.model.emb."
    for model_grads in (grads, grads_t):
        assert torch.equal(model_grads[prefix + "base_layer.weight"][1], torch.zeros(24))
        assert torch.equal(model_grads[prefix + "lora_embedding_A.default"][:, 1], torch.zeros(4))


def _build(name):
    if name == "max_norm":
        return peft_net(embedding_kwargs={"max_norm": 1.0})
    if name == "two active adapters":
        model = peft_net(adapters=("a", "b"))
        model.base_model.set_adapter(["a", "b"])
        return model
    if name == "DoRA":
        return peft_net(use_dora=True)
    if name == "embed_scale":
        model = peft_net()
        model.base_model.model.emb.base_layer.embed_scale = 2.0
        return model
    if name == "scale_grad_by_freq":
        return peft_net(embedding_kwargs={"scale_grad_by_freq": True})
    raise ValueError(name)


FALLBACKS = {
    "max_norm": "max_norm (the lookup renormalises the tables in place)",
    "two active adapters": "several active adapters on an Embedding layer",
    "DoRA": "adapter 'default': a LoRA variant (DoraEmbeddingVariant)",
    "embed_scale": "an embed_scale on the base layer",
    "scale_grad_by_freq": "sparse or scale_grad_by_freq lookups",
}


@pytest.mark.parametrize("name,reason", FALLBACKS.items(), ids=FALLBACKS.keys())
def test_unsupported_cases_run_peft_bitwise_and_name_the_reason(name, reason, embedding_calls):
    theirs = _build(name)
    ours = copy.deepcopy(theirs)
    with pytest.warns(UserWarning, match=re.escape(f"1 of 1 LoRA layers will run PEFT's own forward: {reason}")):
        warnings.simplefilter("always")
        lora_ext.accelerate(ours)
    assert _static_reason(ours.base_model.model.emb) == reason
    x = ids()
    y, grads = forward_backward(ours, x)
    y_t, grads_t = forward_backward(theirs, x)
    assert not embedding_calls
    assert torch.equal(y, y_t)
    assert all(torch.equal(grads[n], grads_t[n]) for n in grads_t)


def test_merged_disabled_and_mixed_batch_calls_run_peft(embedding_calls):
    theirs = peft_net()
    ours = lora_ext.accelerate(copy.deepcopy(theirs))
    x = ids()
    with ours.disable_adapter(), theirs.disable_adapter():
        assert torch.equal(ours(x), theirs(x))
    ours.eval(), theirs.eval()
    names = ["default", "__base__", "default"]
    assert torch.equal(ours(x, adapter_names=names), theirs(x, adapter_names=names))
    ours.base_model.merge_adapter()
    theirs.base_model.merge_adapter()
    assert torch.equal(ours(x), theirs(x))
    assert not embedding_calls


def test_restore_gives_back_peft_embedding():
    model = lora_ext.accelerate(peft_net())
    assert type(model.base_model.model.emb) is fused_lora_embedding_class()
    lora_ext.restore(model)
    assert type(model.base_model.model.emb) is PeftLoraEmbedding
    assert accelerated_layers(model) == []


def test_embedding_added_later_is_accelerated(embedding_calls):
    model = lora_ext.accelerate(peft_net(target_modules=["head"]))
    model.add_adapter("emb", peft.LoraConfig(target_modules=["emb"], r=2, init_lora_weights=False))
    model.base_model.set_adapter("emb")
    assert type(model.base_model.model.emb) is fused_lora_embedding_class()
    model(ids())
    assert len(embedding_calls) == 1


# ================================================================ lora_ext's own Embedding layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_own_embedding_layer_runs_the_op_and_matches_peft(dtype, embedding_calls):
    theirs = peft_net(dtype=dtype, embedding_kwargs={"padding_idx": 3})
    config = peft.LoraConfig(target_modules=["emb"], r=4, lora_alpha=8).to_dict()
    torch.manual_seed(0)
    ours = lora_ext.get_peft_model(Net(padding_idx=3).to(dtype), lora_ext.LoraConfig.from_dict(config))
    ours.load_state_dict(theirs.state_dict())
    oracle = copy.deepcopy(theirs).double()
    x = ids()
    x[1, :2] = 3
    y, grads = forward_backward(ours, x)
    assert len(embedding_calls) == 1
    y_t, grads_t = forward_backward(theirs, x)
    y_o, grads_o = forward_backward(oracle, x)
    assert_within_torch_error(y, y_t, y_o, what="output")
    assert grads.keys() == grads_t.keys()
    for name in grads:
        assert grads[name].dtype == grads_t[name].dtype
        assert_within_torch_error(grads[name], grads_t[name], grads_o[name], what=name)
