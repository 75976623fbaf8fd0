"""DoRA layers against the real PEFT, both directions: outputs, gradients of lora_A, lora_B and
the magnitude, merged weights, saved files, cached-norm inference, refused combinations."""
import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_ext
from lora_ext import reference
from lora_ext.layers import linear as linear_layer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1, bias=False)
        self.conv3 = nn.Conv2d(6, 5, (3, 2), stride=2)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


MODELS = {  # name: (factory, target_modules, input maker)
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], lambda: torch.randint(0, 97, (2, 7))),
    "gpt2_conv1d": (tiny_gpt2, ["c_attn", "c_proj"], lambda: torch.randint(0, 97, (2, 7))),
    "llama_embedding": (tiny_llama, ["embed_tokens", "o_proj"], lambda: torch.randint(0, 97, (2, 7))),
    "conv2d": (ConvNet, ["conv1", "conv2", "conv3"], lambda: torch.randn(2, 3, 9, 8)),
}


def config_kwargs(targets, **extra):
    return dict(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, use_dora=True,
                init_lora_weights=False) | extra


def output(model, inputs):
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def randomise_magnitudes(model):
    """Trained-looking magnitudes (at init they equal the norm, which hides g-1 terms)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=gen))


def peft_and_ours(name, tmp_path, **extra):
    """A PEFT DoRA model with random adapters, and the same adapter loaded into lora-ext."""
    factory, targets, make_input = MODELS[name]
    base = factory()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs(targets, **extra)))
    randomise_magnitudes(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lora_ext.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    return base, theirs, ours, make_input()


def trainable_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_peft_adapter_trains_identically_in_lora_ext(name, use_rslora, tmp_path):
    _, theirs, ours, inputs = peft_and_ours(name, tmp_path, use_rslora=use_rslora)
    theirs.train()
    ours.train()
    y_theirs, y_ours = output(theirs, inputs), output(ours, inputs)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    y_theirs.square().mean().backward()
    y_ours.square().mean().backward()
    grads_theirs, grads_ours = trainable_grads(theirs), trainable_grads(ours)
    assert grads_ours.keys() == grads_theirs.keys()
    kinds = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
    assert {k for k in kinds if any(k + "." in n for n in grads_ours)} >= {"lora_magnitude_vector"}
    for key, grad in grads_theirs.items():
        torch.testing.assert_close(grads_ours[key], grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_our_adapter_loads_in_peft_with_peft_keys(name, tmp_path):
    factory, targets, make_input = MODELS[name]
    base = factory()
    ours = lora_ext.get_peft_model(copy.deepcopy(base), lora_ext.LoraConfig(**config_kwargs(targets)))
    reference_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs(targets)))
    randomise_magnitudes(ours)
    ours.save_pretrained(tmp_path / "ours")
    reference_model.save_pretrained(tmp_path / "peft")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_file.keys() == peft_file.keys()
    assert any(k.endswith("lora_magnitude_vector") for k in ours_file)
    for key in ours_file:
        assert ours_file[key].shape == peft_file[key].shape, key
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    inputs = make_input()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(output(ours, inputs), output(theirs, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_initial_magnitude_is_peft_s(name):
    """With B = 0 the magnitude starts as ‖W‖ per output feature, in PEFT's shape."""
    factory, targets, _ = MODELS[name]
    base = factory()
    kwargs = config_kwargs(targets, init_lora_weights=True)
    ours = lora_ext.get_peft_model(copy.deepcopy(base), lora_ext.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    mags_theirs = {n: p for n, p in theirs.named_parameters() if "magnitude" in n}
    mags_ours = {n: p for n, p in ours.named_parameters() if "magnitude" in n}
    assert mags_ours.keys() == mags_theirs.keys() and mags_ours
    for key, value in mags_theirs.items():
        assert mags_ours[key].requires_grad
        torch.testing.assert_close(mags_ours[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_merged_weights_equal_peft_s_and_unmerge_restores(name, tmp_path):
    base, theirs, ours, inputs = peft_and_ours(name, tmp_path)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        unmerged = output(ours, inputs)
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        ours.merge_adapter()
        torch.testing.assert_close(output(ours, inputs), unmerged, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        for key, value in ours.state_dict().items():  # fp32 round trip through W + ΔW, |ΔW| >> |W| here
            torch.testing.assert_close(value, before[key], rtol=1e-5, atol=1e-5, msg=key)
        merged_ours = ours.merge_and_unload()
        merged_theirs = theirs.merge_and_unload()
        state_theirs = merged_theirs.state_dict()
        for key, value in merged_ours.state_dict().items():
            torch.testing.assert_close(value, state_theirs[key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(output(merged_ours, inputs), unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_with_the_same_mask_equals_peft(p, tmp_path, monkeypatch):
    """PEFT's dropout branch (second GEMM on drop(x), base output with bias on x), fed the mask
    our Philox dropout draws: outputs and gradients agree."""
    _, theirs, ours, inputs = peft_and_ours("llama", tmp_path, lora_dropout=p)
    seed = 1234
    monkeypatch.setattr(linear_layer, "fresh_dropout_seed", lambda: seed)

    class PhiloxDropout(nn.Module):
        def forward(self, x):
            return reference.lora_dropout(x, p, seed) if self.training else x

    for module in theirs.modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            module.lora_dropout["default"] = PhiloxDropout()
    theirs.train()
    ours.train()
    y_theirs, y_ours = output(theirs, inputs), output(ours, inputs)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    y_theirs.square().mean().backward()
    y_ours.square().mean().backward()
    grads_theirs, grads_ours = trainable_grads(theirs), trainable_grads(ours)
    for key, grad in grads_theirs.items():
        torch.testing.assert_close(grads_ours[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_cached_norm_inference_follows_adapter_changes(tmp_path):
    _, theirs, ours, inputs = peft_and_ours("llama", tmp_path)
    theirs.eval()
    ours.eval()
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    magnitude = layer.lora_magnitude_vector["default"]
    with torch.no_grad():
        first = output(ours, inputs)
        assert magnitude._norm_cache is not None, "eval + no_grad must cache the norm"
        cached = magnitude._norm_cache[1]
        torch.testing.assert_close(output(ours, inputs), first, rtol=0, atol=0)
        assert magnitude._norm_cache[1] is cached, "the cached norm must be reused"
        for model in (ours, theirs):  # edit the adapter in place, in eval mode
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(1.5)
        torch.testing.assert_close(output(ours, inputs), output(theirs, inputs), rtol=1e-5, atol=1e-5)
    ours.train()
    assert magnitude._norm_cache is None


def test_bf16_base_with_peft_adapter(tmp_path):
    factory, targets, make_input = MODELS["llama"]
    base = factory().to(torch.bfloat16)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs(targets)))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lora_ext.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    inputs = make_input()
    with torch.no_grad():
        y_theirs, y_ours = output(theirs.eval(), inputs).float(), output(ours.eval(), inputs).float()
    # both are bf16 computations of the same function; compare against their spread
    scale = y_theirs.abs().max()
    assert (y_ours - y_theirs).abs().max() <= 0.05 * scale


@pytest.mark.parametrize("name", ["llama", "llama_embedding", "conv2d"])
def test_mixed_batch_adapter_names_with_dora_is_refused_like_peft(name, tmp_path):
    _, theirs, ours, inputs = peft_and_ours(name, tmp_path)
    theirs.eval()
    ours.eval()
    names = ["default", "__base__"]
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled."):
        theirs(inputs, adapter_names=names)
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled."):
        ours(inputs, adapter_names=names)
    layer = next(m for m in ours.modules() if isinstance(m, lora_ext.layers.LoraLayer))
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled."):
        layer(inputs if name != "llama" else torch.randn(2, 7, 32), adapter_names=names)


def test_dora_and_lora_adapters_active_together_equal_peft(tmp_path):
    factory, targets, make_input = MODELS["llama"]
    base = factory()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs(targets)), adapter_name="d")
    theirs.add_adapter("l", peft.LoraConfig(**config_kwargs(targets, use_dora=False)))
    randomise_magnitudes(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lora_ext.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft" / "d", adapter_name="d")
    ours.load_adapter(tmp_path / "peft" / "l", adapter_name="l")
    for model in (theirs, ours):
        model.base_model.set_adapter(["l", "d"])
        model.eval()
    inputs = make_input()
    with torch.no_grad():
        torch.testing.assert_close(output(ours, inputs), output(theirs, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2_conv1d", "conv2d"])
def test_two_dora_adapters_active_and_merged_equal_peft(name, tmp_path):
    factory, targets, make_input = MODELS[name]
    base = factory()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs(targets)), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**config_kwargs(targets, r=3)))
    randomise_magnitudes(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lora_ext.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft" / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "peft" / "b", adapter_name="b")
    inputs = make_input()
    for model in (theirs, ours):
        model.base_model.set_adapter(["a", "b"])
        model.eval()
    with torch.no_grad():
        unmerged = output(ours, inputs)
        torch.testing.assert_close(unmerged, output(theirs, inputs), rtol=1e-5, atol=1e-5)
        merged_ours = ours.merge_and_unload(adapter_names=["a", "b"])
        merged_theirs = theirs.merge_and_unload(adapter_names=["a", "b"])
        state_theirs = merged_theirs.state_dict()
        for key, value in merged_ours.state_dict().items():
            torch.testing.assert_close(value, state_theirs[key], rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(output(merged_ours, inputs), unmerged, rtol=1e-4, atol=1e-4)


def test_grouped_conv_dora_cannot_be_merged_as_in_peft():
    """DoRA on a grouped conv trains and runs (tests/test_conv_nd.py); merging it is refused, as PEFT does."""
    for lib in (peft, lora_ext):
        model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
        model = lib.get_peft_model(model, lib.LoraConfig(r=2, target_modules=["0"], use_dora=True))
        with pytest.raises(NotImplementedError, match="groups > 1"):
            model.merge_adapter()
