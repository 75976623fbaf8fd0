"""LoRA on Conv1d/2d/3d through ops.lora_conv (one convolution with the merged weight): PEFT's
lora.ConvNd accelerated and lora_ext's own conv layers, against the real PEFT by the
tolerance rule; what must keep PEFT's three convolutions does so bit for bit, with the reason."""
import copy
import re
import warnings

import peft
import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import ops
from lora_ext.accelerate import _static_reason, accelerated_layers, fused_lora_conv_classes
from lora_testing import assert_within_torch_error

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Net(nn.Module):
    def __init__(self, dims=2, **conv_kwargs):
        super().__init__()
        conv_kwargs = {"kernel_size": 3, "padding": 1, **conv_kwargs}
        self.conv = CONVS[dims](4, 6, **conv_kwargs)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.tanh(self.conv(x))
        return self.head(y.flatten(2).mean(-1))


def peft_net(dims=2, dtype=torch.float32, adapters=("default",), conv_kwargs=None, train_base=False, **config):
    torch.manual_seed(0)
    net = Net(dims, **(conv_kwargs or {})).to(dtype)
    config = {"target_modules": ["conv"], "r": 2, "lora_alpha": 4, "init_lora_weights": False, **config}
    model = peft.get_peft_model(net, peft.LoraConfig(**config), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, peft.LoraConfig(**config))
    if train_base:
        model.base_model.model.conv.base_layer.weight.requires_grad_(True)
    return model


def inputs(dims=2, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((2, 4, *(7,) * dims), generator=gen).to(dtype)


def forward_backward(model, x):
    y = model(x)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.float().square().sum(), [p for n, p in model.named_parameters() if p.requires_grad])
    return y, dict(zip(names, grads))


@pytest.fixture
def conv_calls(monkeypatch):
    """Counts calls of ops.lora_conv and ops.dora_conv, to prove which path a forward took."""
    calls = []
    for name in ("lora_conv", "dora_conv"):
        def spy(*args, _original=getattr(ops, name), _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(ops, name, spy)
    return calls


CASES = {
    "conv1d": dict(dims=1),
    "conv2d": dict(dims=2),
    "conv3d": dict(dims=3),
    "conv2d stride 2 no padding": dict(conv_kwargs={"stride": 2, "padding": 0}),
    "conv2d padding valid, kernel 1": dict(conv_kwargs={"kernel_size": 1, "padding": "valid"}),
    "conv2d trained base weight": dict(train_base=True),
    "conv2d rslora": dict(use_rslora=True),
    "conv2d dropout in eval": dict(lora_dropout=0.3, eval=True),
    "bf16 with bf16 adapters": dict(dtype=torch.bfloat16, autocast_adapter_dtype=False),
    "conv1d DoRA": dict(dims=1, use_dora=True),
    "conv2d DoRA": dict(use_dora=True),
    "conv3d DoRA, eval": dict(dims=3, use_dora=True, eval=True),
    "conv2d DoRA, dropout in eval, stride 2": dict(use_dora=True, lora_dropout=0.2, eval=True,
                                                  conv_kwargs={"stride": 2, "padding": 0}),
    "conv2d DoRA, trained base weight": dict(use_dora=True, train_base=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_accelerated_conv_matches_peft(case, conv_calls):
    case = dict(case)
    autocast_adapter_dtype = case.pop("autocast_adapter_dtype", True)
    evaluate = case.pop("eval", False)
    theirs = peft_net(**case)
    if not autocast_adapter_dtype:  # adapters in the base dtype
        theirs = theirs.to(case["dtype"])
    if evaluate:
        theirs.eval()
    oracle = copy.deepcopy(theirs).double()
    ours = lora_ext.accelerate(copy.deepcopy(theirs))
    assert accelerated_layers(ours) == ["base_model.model.conv"]
    x = inputs(case.get("dims", 2), case.get("dtype", torch.float32))
    y, grads = forward_backward(ours, x)
    assert len(conv_calls) == 1
    y_t, grads_t = forward_backward(theirs, x)
    y_o, grads_o = forward_backward(oracle, x.double())
    assert y.dtype == y_t.dtype
    assert_within_torch_error(y, y_t, y_o, what="output")
    assert grads.keys() == grads_t.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        assert_within_torch_error(grads[name], grads_t[name], grads_o[name], what=name)


def test_dropout_in_training_runs_peft(conv_calls):
    theirs = peft_net(lora_dropout=0.3)
    ours = lora_ext.accelerate(copy.deepcopy(theirs))
    torch.manual_seed(5)
    y = ours(inputs())
    torch.manual_seed(5)
    assert torch.equal(y, theirs(inputs()))
    assert not conv_calls
    ours.eval()
    ours(inputs())
    assert len(conv_calls) == 1


def _build(name):
    if name == "groups":
        return peft_net(conv_kwargs={"groups": 2})
    if name == "dilation":
        return peft_net(conv_kwargs={"kernel_size": 1, "padding": 0, "dilation": 2})  # PEFT runs only this
    if name == "padding_mode":
        return peft_net(conv_kwargs={"padding_mode": "reflect"})
    if name == "same":
        return peft_net(conv_kwargs={"padding": "same"})
    if name == "two adapters":
        model = peft_net(adapters=("a", "b"))
        model.base_model.set_adapter(["a", "b"])
        return model
    if name == "DoRA in fp32 over bf16":
        return peft_net(dtype=torch.bfloat16, use_dora=True)
    if name == "fp32 adapters over bf16":
        return peft_net(dtype=torch.bfloat16)
    raise ValueError(name)


FALLBACKS = {
    "groups": "a grouped convolution (groups > 1: no merged weight B·A)",
    "dilation": "a dilated convolution (lora_A convolves undilated)",
    "padding_mode": "padding_mode='reflect' (lora_A pads with zeros)",
    "same": "padding='same'",
    "two adapters": "several active adapters on a Conv layer",
    "DoRA in fp32 over bf16": "adapter 'default': a DoRA magnitude in torch.float32 over a torch.bfloat16 base",
    "fp32 adapters over bf16": "adapter 'default': adapter in torch.float32 on cpu, base layer in torch.bfloat16 "
                               "on cpu (fused: one dtype)",
}


@pytest.mark.parametrize("name,reason", FALLBACKS.items(), ids=FALLBACKS.keys())
def test_unsupported_cases_run_peft_bitwise_and_name_the_reason(name, reason, conv_calls):
    theirs = _build(name)
    ours = copy.deepcopy(theirs)
    with pytest.warns(UserWarning, match=re.escape(f"LoRA layers will run PEFT's own forward: {reason}")):
        warnings.simplefilter("always")
        lora_ext.accelerate(ours)
    assert _static_reason(ours.base_model.model.conv) == reason
    x = inputs(dtype=ours.base_model.model.conv.base_layer.weight.dtype)
    y, grads = forward_backward(ours, x)
    y_t, grads_t = forward_backward(theirs, x)
    assert not conv_calls
    assert torch.equal(y, y_t)
    assert all(torch.equal(grads[n], grads_t[n]) for n in grads_t)


def test_merge_disable_and_restore(conv_calls):
    theirs = peft_net()
    ours = lora_ext.accelerate(copy.deepcopy(theirs))
    x = inputs()
    with ours.disable_adapter(), theirs.disable_adapter():
        assert torch.equal(ours(x), theirs(x))
    ours.base_model.merge_adapter()
    theirs.base_model.merge_adapter()
    assert torch.equal(ours(x), theirs(x))
    assert not conv_calls
    assert type(ours.base_model.model.conv) is fused_lora_conv_classes()[type(theirs.base_model.model.conv)]
    lora_ext.restore(ours)
    assert type(ours.base_model.model.conv) is type(theirs.base_model.model.conv)


# ================================================================ lora_ext's own conv layers


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_own_conv_layer_runs_the_op_and_matches_peft(dims, train, use_dora, conv_calls):
    theirs = peft_net(dims, use_dora=use_dora)
    config = peft.LoraConfig(target_modules=["conv"], r=2, lora_alpha=4, use_dora=use_dora).to_dict()
    torch.manual_seed(0)
    ours = lora_ext.get_peft_model(Net(dims), lora_ext.LoraConfig.from_dict(config))
    ours.load_state_dict(theirs.state_dict())
    ours.train(train), theirs.train(train)
    oracle = copy.deepcopy(theirs).double()
    x = inputs(dims)
    y, grads = forward_backward(ours, x)
    assert conv_calls == ["dora_conv" if use_dora else "lora_conv"]
    y_t, grads_t = forward_backward(theirs, x)
    y_o, grads_o = forward_backward(oracle, x.double())
    assert_within_torch_error(y, y_t, y_o, what="output")
    assert grads.keys() == grads_t.keys()
    for name in grads:
        assert_within_torch_error(grads[name], grads_t[name], grads_o[name], what=name)
