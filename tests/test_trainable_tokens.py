"""trainable_token_indices (PEFT's TrainableTokens through LoraConfig) against the real PEFT:
the layers and state_dict keys it creates, tied output heads, outputs and gradients, saved
files both ways, merging and unloading, several adapters, mixed batches and the errors."""
import copy
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_ext
from lora_ext.layers import TrainableTokensWrapper
from lora_testing import assert_within_torch_error
from peft_twins import (assert_same_files, assert_same_numbers, assert_same_state, inputs, randomize_adapters, run,
                        tiny_gpt2, tiny_llama)

# three tokens the test inputs hold (so gradients reach their rows) and one they do not
_IDS = inputs("llama")["input_ids"].flatten().tolist()
TOKENS = list(dict.fromkeys(_IDS))[:3] + [next(i for i in range(128) if i not in _IDS)]
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
BASES = {"gpt2": tiny_gpt2, "llama": tiny_llama}
EMBEDDING = {"gpt2": "transformer.wte", "llama": "model.embed_tokens"}


class EmbMLP(nn.Module):
    """Two embeddings and a Linear, no transformers config (no tying, no get_input_embeddings)."""

    def __init__(self):
        super().__init__()
        self.emb0 = nn.Embedding(20, 8)
        self.emb1 = nn.Embedding(20, 8)
        self.lin0 = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin0(torch.relu(self.emb0(x) + self.emb1(x))).sum(1)


def emb_mlp(seed: int = 0) -> EmbMLP:
    torch.manual_seed(seed)
    return EmbMLP()


def perturb_tokens(model, seed: int = 11, names=None) -> None:
    """Trainable tokens start as copies of the base rows (a no-op): give them other values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name and (names is None or name.rsplit(".", 1)[-1] in names):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def twins(kind, tmp_path, dtype=torch.float32, **config):
    """PEFT's model (random LoRA, changed tokens), saved, and ours loaded from its folder."""
    def base():
        return BASES[kind]().to(dtype)
    config = {"target_modules": TARGETS[kind], "trainable_token_indices": TOKENS, **config}
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**config))
    randomize_adapters(theirs)
    perturb_tokens(theirs)
    path = Path(tmp_path) / "peft"
    theirs.save_pretrained(path)
    ours = lora_ext.PeftModel.from_pretrained(base(), path, is_trainable=True)
    return ours, theirs, path


# ---------------------------------------------------------------- structure and keys


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_wrappers_keys_and_trainable_parameters_are_peft_s(kind):
    config = dict(target_modules=TARGETS[kind], trainable_token_indices=TOKENS)
    theirs = peft.get_peft_model(BASES[kind](), peft.LoraConfig(**config))
    ours = lora_ext.get_peft_model(BASES[kind](), lora_ext.LoraConfig(**config))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert f"base_model.model.{EMBEDDING[kind]}.token_adapter.trainable_tokens_delta.default" in trainable
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    embeddings = ours.get_input_embeddings()
    assert isinstance(embeddings, TrainableTokensWrapper)
    assert embeddings.token_adapter.token_indices == {"default": TOKENS}
    head = ours.base_model.model.lm_head
    if kind == "gpt2":  # tied head: a wrapper sharing the embedding's adapter
        assert isinstance(head, TrainableTokensWrapper)
        assert head.token_adapter.tied_adapter is embeddings.token_adapter
        assert head.token_adapter.trainable_tokens_delta is embeddings.token_adapter.trainable_tokens_delta
    else:
        assert type(head) is nn.Linear


def test_dict_targets_name_the_layers_and_a_list_needs_an_input_embedding():
    config = dict(target_modules=["lin0"], trainable_token_indices={"emb0": [0, 3], "emb1": [2]})
    theirs = peft.get_peft_model(emb_mlp(), peft.LoraConfig(**config))
    ours = lora_ext.get_peft_model(emb_mlp(), lora_ext.LoraConfig(**config))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.base_model.model.emb1.token_adapter.token_indices == {"default": [2]}
    for lib in (peft, lora_ext):  # a bare list looks for "embed_tokens", which EmbMLP has not
        with pytest.raises(ValueError, match=r"Target modules \{'embed_tokens'\} not found in the base model"):
            lib.get_peft_model(emb_mlp(), lib.LoraConfig(target_modules=["lin0"], trainable_token_indices=[1]))


# ---------------------------------------------------------------- numbers and files


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_outputs_and_gradients_match_peft(kind, tmp_path):
    ours, theirs, _ = twins(kind, tmp_path)
    ours.eval(), theirs.eval()
    assert_same_numbers(ours, theirs, inputs(kind), what=f"{kind} eval")
    ours.train(), theirs.train()
    assert_same_numbers(ours, theirs, inputs(kind), grads=True, what=f"{kind} train")
    _, grads = run(ours, inputs(kind), grads=True)
    delta = grads[f"base_model.model.{EMBEDDING[kind]}.token_adapter.trainable_tokens_delta.default"]
    assert delta.shape == (len(TOKENS), 64) and delta.abs().sum() > 0


def test_only_the_chosen_rows_change_the_output():
    model = lora_ext.get_peft_model(emb_mlp(), lora_ext.LoraConfig(target_modules=["lin0"],
                                                                    trainable_token_indices={"emb0": [3]}))
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    before = model.base_model.model.emb0(x).detach()
    perturb_tokens(model)
    after = model.base_model.model.emb0(x).detach()
    changed = (after != before).any(-1)
    assert changed.tolist() == (x == 3).tolist()
    assert torch.equal(after[0, 2], model.base_model.model.emb0.token_adapter.trainable_tokens_delta["default"][0])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_saved_files_are_peft_s_both_ways(kind, tmp_path):
    ours, theirs, path = twins(kind, tmp_path)
    ours.save_pretrained(tmp_path / "resaved")
    assert_same_files(tmp_path / "resaved", path)
    saved = load_file(str(path / "adapter_model.safetensors"))
    token_keys = [k for k in saved if "token" in k]
    assert token_keys == [f"base_model.model.{EMBEDDING[kind]}.token_adapter.trainable_tokens_delta"]
    # and the other way: a lora-ext adapter (its own values) loads in PEFT with the same numbers
    ours2 = lora_ext.get_peft_model(BASES[kind](), lora_ext.LoraConfig(target_modules=TARGETS[kind],
                                                                        trainable_token_indices=TOKENS))
    randomize_adapters(ours2, seed=4)
    perturb_tokens(ours2, seed=5)
    ours2.save_pretrained(tmp_path / "ours")
    theirs2 = peft.PeftModel.from_pretrained(BASES[kind](), tmp_path / "ours")
    theirs2.save_pretrained(tmp_path / "peft_resaved")
    assert_same_files(tmp_path / "ours", tmp_path / "peft_resaved")
    ours2.eval()
    assert_same_numbers(ours2, theirs2, inputs(kind), what=f"{kind} from ours")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_keeps_fp32_tokens_as_peft(dtype, tmp_path):
    ours, theirs, _ = twins("gpt2", tmp_path, dtype=dtype)
    for model in (ours, theirs):
        layer = model.get_input_embeddings().token_adapter
        assert layer.trainable_tokens_delta["default"].dtype == torch.float32
        assert layer.trainable_tokens_original["default"].dtype == torch.float32
    ours.eval(), theirs.eval()
    assert_same_numbers(ours, theirs, inputs("gpt2"), what=f"{dtype}")


# ---------------------------------------------------------------- merge, unload, disable


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_merge_unmerge_and_merge_and_unload_match_peft(kind, tmp_path):
    ours, theirs, _ = twins(kind, tmp_path)
    ours.eval(), theirs.eval()
    base_state = {k: v.clone() for k, v in ours.state_dict().items()}
    unmerged = run(ours, inputs(kind))[0]
    ours.merge_adapter()
    theirs.merge_adapter()
    assert_same_state(ours, theirs)
    assert ours.get_input_embeddings().token_adapter.merged_adapters == ["default"]
    torch.testing.assert_close(run(ours, inputs(kind))[0], unmerged, rtol=1e-4, atol=1e-5)
    ours.unmerge_adapter()
    for key, value in ours.state_dict().items():
        if "token_adapter" in key:  # the original rows are back, bit for bit
            assert torch.equal(value, base_state[key]), key
        else:  # W + s·BA - s·BA rounds
            torch.testing.assert_close(value, base_state[key], rtol=1e-5, atol=1e-6, msg=key)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(merged_ours.get_input_embeddings()) is nn.Embedding
    assert_same_state(merged_ours, merged_theirs)
    torch.testing.assert_close(run(merged_ours, inputs(kind))[0], unmerged, rtol=1e-4, atol=1e-5)
    if kind == "gpt2":  # still tied: one weight
        assert merged_ours.lm_head.weight is merged_ours.get_input_embeddings().weight


def test_unload_puts_the_base_embedding_back_untouched(tmp_path):
    ours, _, _ = twins("llama", tmp_path)
    weight = ours.get_input_embeddings().token_adapter.base_layer.weight.detach().clone()
    model = ours.unload()
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert torch.equal(model.get_input_embeddings().weight, weight)


def test_safe_merge_refuses_non_finite_tokens_and_changes_nothing(tmp_path):
    ours, _, _ = twins("llama", tmp_path)
    layer = ours.get_input_embeddings().token_adapter
    with torch.no_grad():
        layer.trainable_tokens_delta["default"][0, 0] = float("nan")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


def test_disable_adapter_gives_the_base_model(tmp_path):
    ours, _, _ = twins("gpt2", tmp_path)
    ours.eval()
    want = run(tiny_gpt2().eval(), inputs("gpt2"))[0]
    with ours.disable_adapter():
        got = run(ours, inputs("gpt2"))[0]
        assert ours.get_input_embeddings().weight is ours.get_input_embeddings().original_module.weight
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------- several adapters


def test_set_adapter_activates_and_trains_only_that_adapters_tokens():
    for lib in (peft, lora_ext):  # PEFT's test_set_adapter_non_overlapping_trainable_token_indices, both ways
        model = lib.get_peft_model(emb_mlp(), lib.LoraConfig(target_modules=["lin0"]))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb0": [0]}))
        emb = model.base_model.model.emb0
        delta = emb.token_adapter.trainable_tokens_delta["other"]
        assert emb.active_adapters == [] and delta.requires_grad is False
        model.set_adapter("other")
        assert emb.active_adapters == ["other"] and delta.requires_grad is True
        model.set_adapter("default")
        assert emb.active_adapters == [] and delta.requires_grad is False


def test_two_adapters_on_one_embedding_cannot_be_active_together():
    for lib in (peft, lora_ext):
        model = lib.get_peft_model(emb_mlp(), lib.LoraConfig(target_modules=["lin0"],
                                                             trainable_token_indices={"emb0": [0]}))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb0": [0]}))
        with pytest.raises(ValueError, match="Only one adapter can be set at a time for TrainableTokensWrapper"):
            model.base_model.set_adapter(["default", "other"])
        # on different embeddings they can
        model = lib.get_peft_model(emb_mlp(), lib.LoraConfig(target_modules=["lin0"],
                                                             trainable_token_indices={"emb0": [0]}))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb1": [0]}))
        model.base_model.set_adapter(["default", "other"])


def test_overlapping_rows_of_two_active_adapters_raise():
    model = lora_ext.get_peft_model(emb_mlp(), lora_ext.LoraConfig(target_modules=["lin0"],
                                                                    trainable_token_indices={"emb0": [0, 1]}))
    model.add_adapter("other", lora_ext.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb0": [1]}))
    layer = model.base_model.model.emb0.token_adapter
    layer.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="Token indices of adapter other are already defined"):
        model(torch.tensor([[0, 1]]))


def test_delete_adapter_removes_its_tokens_everywhere():
    """PEFT's test_delete_adapter_multiple_adapters_with_trainable_token_indices, on a tied model."""
    model = lora_ext.get_peft_model(tiny_gpt2(), lora_ext.LoraConfig(target_modules=["c_attn"],
                                                                      trainable_token_indices=[0, 1]),
                                    adapter_name="adapter0")
    model.add_adapter("adapter1", lora_ext.LoraConfig(target_modules=["c_attn"]))
    model.add_adapter("adapter2", lora_ext.LoraConfig(target_modules=["c_attn"], trainable_token_indices=[1, 3]))
    wte, head = model.base_model.model.transformer.wte, model.base_model.model.lm_head
    ids = inputs("gpt2")
    for layer in (wte, head):
        assert set(layer.token_adapter.trainable_tokens_delta) == {"adapter0", "adapter2"}
    model(**ids)
    model.delete_adapter("adapter0")
    assert model.active_adapters == ["adapter1"]
    for layer in (wte, head):
        assert set(layer.token_adapter.trainable_tokens_delta) == {"adapter2"}
        assert set(layer.token_adapter.trainable_tokens_original) == {"adapter2"}
    model(**ids)
    model.delete_adapter("adapter1")
    assert model.active_adapters == ["adapter2"] and wte.active_adapters == ["adapter2"]
    model.delete_adapter("adapter2")
    assert set(wte.token_adapter.trainable_tokens_delta) == set()


def test_mixed_batch_uses_each_rows_tokens_as_peft(tmp_path):
    ours, theirs, _ = twins("llama", tmp_path)
    for model, lib in ((ours, lora_ext), (theirs, peft)):
        model.add_adapter("other", lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[2, 3, 5]))
    perturb_tokens(theirs, seed=12, names=("other",))
    randomize_adapters(theirs, seed=9, names=("other",))
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    ids = inputs("llama")["input_ids"].repeat(2, 1)
    ids[:, 0] = 5  # a row that both adapters train
    names = ["default", "other", "__base__", "default"]
    y = ours(input_ids=ids, adapter_names=names).logits
    y_t = theirs(input_ids=ids, adapter_names=names).logits
    y_o = copy.deepcopy(theirs).double()(input_ids=ids, adapter_names=names).logits
    assert_within_torch_error(y, y_t, y_o, what="mixed batch")


# ---------------------------------------------------------------- errors


def test_modules_to_save_and_trainable_tokens_on_one_layer_is_peft_s_error():
    for lib in (peft, lora_ext):
        with pytest.raises(ValueError, match="The embedding layer is already marked to be trained fully"):
            lib.get_peft_model(emb_mlp(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["emb0"],
                                                         trainable_token_indices={"emb0": [1]}))


def test_bad_token_indices_are_named():
    with pytest.raises(ValueError, match="out of range for a layer of 20 tokens"):
        lora_ext.get_peft_model(emb_mlp(), lora_ext.LoraConfig(target_modules=["lin0"],
                                                                trainable_token_indices={"emb0": [3, 20]}))
    with pytest.raises(ValueError, match="trainable_token_indices must be a list of token ids"):
        lora_ext.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb0": ["a"]})
    base = emb_mlp()
    with pytest.raises(TypeError, match="trainable_token_indices cannot be applied to modules of type"):
        lora_ext.get_peft_model(base, lora_ext.LoraConfig(target_modules=["emb0"],
                                                           trainable_token_indices={"emb0": [1]}))
    assert type(base.emb0) is nn.Embedding  # the failed injection left the model as it was


def test_loaded_for_inference_the_tokens_are_frozen_and_reported_as_peft(tmp_path):
    _, theirs, path = twins("gpt2", tmp_path)
    frozen = lora_ext.PeftModel.from_pretrained(tiny_gpt2(), path)  # is_trainable=False
    assert not any(p.requires_grad for p in frozen.parameters())
    loaded_by_peft = peft.PeftModel.from_pretrained(tiny_gpt2(), path)

    def token_rows(model):
        return [(s.name, s.active_adapters, s.requires_grad, s.available_adapters) for s in model.get_layer_status()
                if "token_adapter" in s.name]
    assert token_rows(frozen) == token_rows(loaded_by_peft) and len(token_rows(frozen)) == 2  # wte and tied lm_head
    assert frozen.get_model_status().num_adapter_layers == loaded_by_peft.get_model_status().num_adapter_layers


@pytest.mark.parametrize("tied", [True, False], ids=["same_rows_tied", "other_rows_untied"])
def test_naming_embedding_and_tied_head_follows_peft(tied):
    """Both tied layers named: equal rows keep them tied (one adapter), other rows give each its own."""
    indices = {"wte": [1, 2], "lm_head": [1, 2] if tied else [3]}
    models = []
    for lib in (peft, lora_ext):
        model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(target_modules=["c_attn"],
                                                               trainable_token_indices=indices))
        perturb_tokens(model)
        models.append(model.eval())
    theirs, ours = models
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    head = ours.base_model.model.lm_head.token_adapter
    assert (head.tied_adapter is ours.get_input_embeddings().token_adapter) == tied
    assert_same_numbers(ours, theirs, inputs("gpt2"), what=f"tied={tied}")
