"""PeftModel's public surface against the real PEFT: attributes, return values, dtypes,
refusals, PEFT's own state-dict utilities on our models, push_to_hub, unload."""
import warnings
from types import SimpleNamespace

import huggingface_hub
import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict as peft_get_state
from peft.utils import set_peft_model_state_dict as peft_set_state
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification

import lora_ext
from peft_twins import inputs, ours_twin, peft_twin, randomize_adapters, run, tiny_llama

CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def both(**config):
    """(ours, theirs): the same base with the same config in each library."""
    return (lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(**config)),
            peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config)))


# ---------------------------------------------------------------- Embedding over a half base


class EmbedThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.lin = nn.Linear(16, 8)

    def forward(self, x):
        return self.lin(self.emb(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_embedding_over_a_half_base_returns_the_base_dtype(dtype):
    """fp32 adapters (autocast_adapter_dtype) over a half table: the output is the table's
    dtype, as PEFT's, so the half Linear after it takes it."""
    ids = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(0))
    outputs = []
    for lib in (peft, lora_ext):
        torch.manual_seed(0)
        model = lib.get_peft_model(EmbedThenLinear().to(dtype), lib.LoraConfig(r=4, target_modules=["emb"]))
        assert model.base_model.model.emb.lora_embedding_A["default"].dtype == torch.float32
        randomize_adapters(model)
        with torch.no_grad():
            emb = model.base_model.model.emb(ids)
            outputs.append((emb, model(ids)))
    (emb_t, y_t), (emb, y) = outputs
    assert emb.dtype == emb_t.dtype == dtype and y.dtype == y_t.dtype == dtype
    torch.testing.assert_close(emb, emb_t)  # same operations in the same order
    torch.testing.assert_close(y, y_t)


# ---------------------------------------------------------------- public attributes

# PEFT's public PeftModel names that belong to prompt learning (soft prompts), which a LoRA model has not
PROMPT_LEARNING_ONLY = {"get_prompt", "get_prompt_embedding_to_save"}


def test_peft_model_has_peft_public_attributes():
    module_names = set(dir(nn.Module))
    theirs = {n for n in dir(peft.PeftModel) if not n.startswith("_") and n not in module_names}
    missing = sorted(theirs - PROMPT_LEARNING_ONLY - set(dir(lora_ext.PeftModel)))
    assert not missing, missing
    ours, peft_model = both(**CFG)
    for name in ("peft_type", "special_peft_forward_args", "_is_prompt_learning", "active_adapter"):
        assert hasattr(ours, name) and hasattr(peft_model, name), name
    assert ours.peft_type == peft_model.peft_type and ours._is_prompt_learning is peft_model._is_prompt_learning
    assert "adapter_names" in ours.special_peft_forward_args
    assert ours.base_model_torch_dtype == peft_model.base_model_torch_dtype == torch.float32
    assert ours.supports_lora_conversion() is peft_model.supports_lora_conversion() is True


def test_has_active_enabled_adapter_and_modules_to_save_as_peft():
    ours, theirs = both(**CFG)
    for model in (ours, theirs):
        assert model.has_active_enabled_adapter is True
        with model.disable_adapter():
            assert model.has_active_enabled_adapter is False
        assert model.has_active_enabled_adapter is True
    assert ours.modules_to_save is None and theirs.modules_to_save is None
    ours.add_adapter("b", lora_ext.LoraConfig(**CFG, modules_to_save=["lm_head"]))
    theirs.add_adapter("b", peft.LoraConfig(**CFG, modules_to_save=["lm_head"]))
    assert ours.modules_to_save == theirs.modules_to_save == {"lm_head"}


def test_other_param_names_is_a_tuple_as_in_peft():
    ours, theirs = both(**CFG)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    peft_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.other_param_names, tuple) and isinstance(peft_layer.other_param_names, tuple)
    for name in layer.other_param_names:
        assert name in peft_layer.other_param_names
        assert "default" in getattr(layer, name), name  # keyed by adapter, as PEFT's
    ours.add_adapter("b", lora_ext.LoraConfig(**CFG))
    ours.delete_adapter("b")
    assert all("b" not in getattr(layer, name) for name in layer.adapter_layer_names + layer.other_param_names)


def status_fields(status):
    values = dict(vars(status))
    values.pop("module_type")  # lora.Linear there, lora_ext.Linear here
    return values


def test_layer_and_model_status_as_peft():
    ours, theirs = both(**CFG, modules_to_save=["lm_head"])
    for model in (ours, theirs):
        model.add_adapter("b", type(model.peft_config["default"])(**CFG))
        model.merge_adapter(["default"])
    layers, peft_layers = ours.get_layer_status(), theirs.get_layer_status()
    assert [status_fields(s) for s in layers] == [status_fields(s) for s in peft_layers]
    assert [s.module_type for s in layers][:1] == ["lora_ext.Linear"]
    assert vars(ours.get_model_status()) | {"adapter_model_type": None} == \
        vars(theirs.get_model_status()) | {"adapter_model_type": None}
    assert ours.get_model_status().adapter_model_type == "LoraModel"


def test_set_requires_grad_and_set_adapter_inference_mode_as_peft():
    ours, theirs = both(**CFG)
    for model in (ours, theirs):
        model.add_adapter("b", type(model.peft_config["default"])(**CFG))
        model.set_requires_grad("b")
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs) and any(".b." in n for n in trainable(ours))
    for model in (ours, theirs):
        model.set_requires_grad(["default", "b"], requires_grad=False)
    assert trainable(ours) == trainable(theirs) == []
    for model in (ours, theirs):
        model.set_adapter("b", inference_mode=True)
    assert trainable(ours) == trainable(theirs) == []
    for model in (ours, theirs):
        model.set_adapter("b")
    assert trainable(ours) == trainable(theirs) and all(".b." in n for n in trainable(ours))


# ---------------------------------------------------------------- adapters


def test_a_second_adapter_with_bias_is_refused_as_in_peft():
    for lib in (peft, lora_ext):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(**CFG, bias="lora_only"))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="supports only 1 adapter with bias. When using multiple adapters, "
                                             "set bias to 'none' for all adapters"):
            model.add_adapter("b", lib.LoraConfig(**CFG, bias="all"))
        assert list(model.peft_config) == ["default"]
        assert model.state_dict().keys() == before.keys()
        model.add_adapter("c", lib.LoraConfig(**CFG))  # bias="none" is fine
    ours = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(**CFG))
    ours.add_adapter("b", lora_ext.LoraConfig(**CFG, bias="all"))  # one adapter with bias is fine


@pytest.mark.parametrize("saver", [peft_twin, ours_twin])
def test_load_adapter_returns_the_load_result_as_peft(saver, tmp_path):
    _, _, path = saver("llama", tmp_path)
    ours, theirs = both(**CFG)
    result, peft_result = ours.load_adapter(path, "second"), theirs.load_adapter(path, "second")
    assert result.missing_keys == peft_result.missing_keys == []
    assert result.unexpected_keys == peft_result.unexpected_keys == []
    assert type(result).__name__ == type(peft_result).__name__ == "_IncompatibleKeys"


def test_non_strict_state_dict_load_lists_missing_keys_as_peft(tmp_path):
    _, _, path = peft_twin("llama", tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    kept = {k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj" not in k}
    save_file(kept, path / "adapter_model.safetensors")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**CFG))
    peft_result = theirs.load_adapter(path, "second")
    ours = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(**CFG))
    ours.add_adapter("second", lora_ext.LoraConfig.from_pretrained(path))
    result = lora_ext.set_peft_model_state_dict(ours, kept, "second", strict=False)
    assert sorted(result.missing_keys) == sorted(peft_result.missing_keys) != []
    assert result.unexpected_keys == peft_result.unexpected_keys == []


# ---------------------------------------------------------------- PEFT's own state-dict utilities


@pytest.mark.parametrize("config", [dict(CFG), dict(CFG, use_dora=True, bias="lora_only"),
                                    dict(r=4, target_modules=["embed_tokens", "o_proj"], bias="all")])
def test_peft_state_dict_utilities_work_on_our_model(config, tmp_path):
    ours, theirs, _ = peft_twin("llama", tmp_path, **config)
    mine, peft_state = peft_get_state(ours), peft_get_state(theirs)
    assert mine.keys() == peft_state.keys() == lora_ext.get_peft_model_state_dict(ours).keys()
    for key in mine:
        torch.testing.assert_close(mine[key], peft_state[key], rtol=0, atol=0, msg=key)
    fresh = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(**config))
    result = peft_set_state(fresh, peft_state)
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if "lora_" in k]
    fresh.eval(), theirs.eval()
    torch.testing.assert_close(run(fresh, inputs("llama"))[0], run(theirs, inputs("llama"))[0])


# ---------------------------------------------------------------- unload


def tiny_classifier():
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_labels=3, pad_token_id=0))


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unload_keeps_the_trained_classifier_head_as_peft(how):
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    heads, logits = [], []
    for lib in (peft, lora_ext):
        model = lib.get_peft_model(tiny_classifier(), lib.LoraConfig(r=4, target_modules=["q_proj"],
                                                                      task_type="SEQ_CLS"))
        with torch.no_grad():  # "training" changed the head's copy
            model.base_model.model.score.modules_to_save["default"].weight.mul_(3.0)
        trained = model.base_model.model.score.modules_to_save["default"].weight.clone()
        base = getattr(model, how)()
        assert isinstance(base.score, nn.Linear)
        torch.testing.assert_close(base.score.weight, trained)
        heads.append(base.score.weight.detach())
        logits.append(base.eval()(ids).logits.detach())
    torch.testing.assert_close(heads[0], heads[1])
    torch.testing.assert_close(logits[0], logits[1])


# ---------------------------------------------------------------- push_to_hub (the Hub client stubbed)


class FakeHubApi:
    """Records the calls push_to_hub makes and checks the folder it uploads."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=f"user/{repo_id}" if "/" not in repo_id else repo_id)

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path
        files = sorted(p.name for p in Path(folder_path).iterdir())
        # the folder is a PEFT adapter: PEFT loads it as it is being uploaded
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), folder_path)
        self.calls.append(("upload_folder", repo_id, files, kwargs, loaded))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")


def test_push_to_hub_saves_then_uploads_one_commit(monkeypatch):
    FakeHubApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHubApi)
    ours, _ = both(**CFG)
    randomize_adapters(ours)
    info = ours.push_to_hub("my-adapter", commit_message="first", private=True, token="t", revision="dev",
                            tags=["mine"])
    assert info.commit_url.endswith("user/my-adapter/commit/1")
    (create, repo, create_kwargs), branch, upload = FakeHubApi.calls
    assert create == "create_repo" and repo == "my-adapter"
    assert create_kwargs["private"] is True and create_kwargs["token"] == "t" and create_kwargs["exist_ok"]
    assert branch == ("create_branch", dict(repo_id="user/my-adapter", branch="dev", token="t", exist_ok=True))
    _, repo_id, files, kwargs, loaded = upload
    assert repo_id == "user/my-adapter"
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert kwargs["commit_message"] == "first" and kwargs["revision"] == "dev" and kwargs["token"] == "t"
    ours.eval(), loaded.eval()
    torch.testing.assert_close(run(ours, inputs("llama"))[0], run(loaded, inputs("llama"))[0])


def test_saved_model_card_names_the_library_and_base_like_peft(tmp_path):
    ours, theirs = both(**CFG, task_type="CAUSAL_LM")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    card = huggingface_hub.ModelCard.load(tmp_path / "ours" / "README.md")
    peft_card = huggingface_hub.ModelCard.load(tmp_path / "theirs" / "README.md")
    for key in ("library_name", "tags", "pipeline_tag", "base_model"):
        assert card.data.get(key) == peft_card.data.get(key), key
    assert "lora-ext" in card.text
    ours.save_pretrained(tmp_path / "ours")  # an existing card is updated, not duplicated
    assert huggingface_hub.ModelCard.load(tmp_path / "ours" / "README.md").text.count("lora-ext") == 1


# ---------------------------------------------------------------- PEFT's wording


def _two_adapters(lib, **second):
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(**CFG, modules_to_save=["lm_head"]))
    model.add_adapter("b", lib.LoraConfig(**{**CFG, "modules_to_save": ["lm_head"], **second}))
    return model


def _merged_then_deleted(lib):
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(**CFG))
    model.merge_adapter()
    model.delete_adapter("default")


ERROR_CASES = {
    "duplicate adapter": lambda lib: lib.get_peft_model(tiny_llama(), lib.LoraConfig(**CFG)).add_adapter(
        "default", lib.LoraConfig(**CFG)),
    "delete a merged adapter": _merged_then_deleted,
    "unsupported target module": lambda lib: lib.get_peft_model(
        tiny_llama(), lib.LoraConfig(r=4, target_modules=["input_layernorm"])),
    "weighted linear with two ranks": lambda lib: _two_adapters(lib, r=8).add_weighted_adapter(
        ["default", "b"], [1.0, 1.0], "x", combination_type="linear"),
    "weighted over shared modules_to_save": lambda lib: _two_adapters(lib).add_weighted_adapter(
        ["default", "b"], [1.0, 1.0], "x", combination_type="svd"),
    "no adapter folder": lambda lib: lib.PeftModel.from_pretrained(tiny_llama(), "/nonexistent/adapter"),
    "unknown initialisation": lambda lib: lib.get_peft_model(
        tiny_llama(), lib.LoraConfig(**CFG, init_lora_weights="nope")),
    "set an unknown adapter": lambda lib: lib.get_peft_model(tiny_llama(), lib.LoraConfig(**CFG)).set_adapter("x"),
}


def _peft_wording(message: str) -> str:
    # PEFT lists its own module types after this point; ours lists ours
    return message.split(" Currently, only the following")[0] + (
        " Currently, only the following" if "Currently, only the following" in message else "")


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_texts_are_peft_s(case):
    """The same exception type, and PEFT's sentence within ours (users and tests match on it)."""
    raised = []
    for lib in (peft, lora_ext):
        with pytest.raises(Exception) as info:
            ERROR_CASES[case](lib)
        raised.append(info.value)
    theirs, ours = raised
    assert type(ours) is type(theirs)
    assert _peft_wording(str(theirs)) in str(ours), (str(theirs), str(ours))


def test_unmerging_an_unmerged_model_warns_as_peft():
    for lib in (peft, lora_ext):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(**CFG))
        with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
            warnings.simplefilter("always")
            model.unmerge_adapter()


def test_save_pretrained_without_huggingface_hub_writes_the_adapter_without_a_card(monkeypatch, tmp_path):
    import lora_ext.hub
    monkeypatch.setattr(lora_ext.hub, "available", lambda: False)
    ours, _ = both(**CFG)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------- tuner and layer attributes


def test_targeted_module_names_as_peft():
    ours, theirs = both(**CFG)
    assert ours.targeted_module_names == theirs.targeted_module_names
    assert ours.targeted_parameter_names == theirs.targeted_parameter_names == []
    for model in (ours, theirs):
        model.add_adapter("b", type(model.peft_config["default"])(r=4, target_modules=["v_proj", "o_proj"]))
    assert ours.targeted_module_names == theirs.targeted_module_names  # each module once


def test_unmatched_rank_and_alpha_patterns_warn_as_peft():
    for lib in (peft, lora_ext):
        with pytest.warns(RuntimeWarning, match=r"The following rank_pattern keys did not match any targeted "
                                                r"module and were ignored: \['nope'\]"):
            warnings.simplefilter("always")
            lib.get_peft_model(tiny_llama(), lib.LoraConfig(**CFG, rank_pattern={"nope": 2, "q_proj": 2}))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_set_scale_scale_layer_and_unscale_layer_as_peft(use_rslora):
    ours, theirs = both(**CFG, use_rslora=use_rslora)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    peft_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.use_rslora == peft_layer.use_rslora == {"default": use_rslora}
    for step in (lambda l: l.set_scale("default", 3.0), lambda l: l.scale_layer(0.5),
                 lambda l: l.unscale_layer(2.0), lambda l: l.unscale_layer()):
        step(layer), step(peft_layer)
        assert layer.scaling == pytest.approx(peft_layer.scaling)


def _two_layer_models():
    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ours = lora_ext.get_peft_model(base(), lora_ext.LoraConfig(r=2, target_modules=["0", "2"]))
    theirs = peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules=["0", "2"]))
    layers = lambda model: [m for m in model.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
    return (ours, layers(ours)), (theirs, layers(theirs))


def test_disable_adapter_block_restores_the_layers_state_as_peft():
    for model, layers in _two_layer_models():
        assert len(layers) == 2
        model.base_model.disable_adapter_layers()           # all disabled before: stay disabled
        with model.disable_adapter():
            pass
        assert all(layer.disable_adapters for layer in layers), type(model)
        model.base_model.enable_adapter_layers()            # all enabled before: enabled again
        with model.disable_adapter():
            assert all(layer.disable_adapters for layer in layers)
        assert not any(layer.disable_adapters for layer in layers), type(model)
        layers[0].enable_adapters(False)                    # a mix: warns, then all enabled
        msg = "The model contains some adapter layers that are enabled and others that are disabled"
        with pytest.warns(UserWarning, match=msg), model.disable_adapter():
            pass
        assert not any(layer.disable_adapters for layer in layers), type(model)


def test_merging_again_warns_as_peft():
    for model, layers in _two_layer_models():
        model.eval()
        model.merge_adapter()
        with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
            model.merge_adapter()
        assert all(layer.merged_adapters == ["default"] for layer in layers), type(model)


def test_deleting_an_unmerged_adapter_keeps_the_merged_one_as_peft():
    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    for library in (lora_ext, peft):
        config = library.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
        model = library.get_peft_model(base(), config, adapter_name="adapter0")
        model.add_adapter("adapter1", library.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
        model.set_adapter("adapter1")
        layers = [m for m in model.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
        model.merge_adapter()
        with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['adapter1'\] while they are merged"):
            model.delete_adapter("adapter1")
        assert [layer._all_available_adapter_names() for layer in layers] == [["adapter0", "adapter1"]] * 2
        model.delete_adapter("adapter0")
        assert [layer.merged_adapters for layer in layers] == [["adapter1"]] * 2, library.__name__
        assert model.active_adapters == ["adapter1"]
        assert [layer._all_available_adapter_names() for layer in layers] == [["adapter1"]] * 2


def test_merge_adapter_without_names_merges_each_layer_s_own_active_adapters_as_peft():
    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    merged = []
    for library in (lora_ext, peft):
        model = library.get_peft_model(base(), library.LoraConfig(r=2, target_modules=["0", "2"]), adapter_name="a")
        model.add_adapter("b", library.LoraConfig(r=2, target_modules=["0", "2"]))
        layers = [m for m in model.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
        layers[0].set_adapter("b")          # this layer alone runs "b"
        model.merge_adapter()
        merged.append([layer.merged_adapters for layer in layers])
    assert merged[0] == merged[1] == [["b"], ["a"]]


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("modules_to_save", [None, ["1"]])
def test_load_adapter_trainability_as_peft(is_trainable, modules_to_save, tmp_path):
    # load_adapter(is_trainable=False) into a frozen model leaves every parameter frozen, as PEFT
    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    trainable = []
    for library in (lora_ext, peft):
        folder = tmp_path / library.__name__
        library.get_peft_model(base(), library.LoraConfig(target_modules=["0"], modules_to_save=modules_to_save)
                               ).save_pretrained(folder)
        model = library.PeftModel.from_pretrained(base(), folder, is_trainable=is_trainable)
        before = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        model.load_adapter(folder, adapter_name="other", is_trainable=is_trainable)
        trainable.append((before, sorted(n for n, p in model.named_parameters() if p.requires_grad)))
    assert trainable[0] == trainable[1]


def test_grouped_conv_dora_runs_under_inference_mode_as_peft():
    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    x = torch.randn(2, 4, 6, 6)
    outputs = []
    for library in (lora_ext, peft):
        torch.manual_seed(1)
        model = library.get_peft_model(base(), library.LoraConfig(r=2, target_modules=["0"], use_dora=True,
                                                                   init_lora_weights=False)).eval()
        with torch.inference_mode():
            outputs.append((model(x), model(x)))     # twice: the eval-mode norm cache
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[0][1], outputs[0][0], rtol=0, atol=0)


def _deep_mlp():
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module() for _ in range(3)])
    for layer in model.layers:
        layer.lin0, layer.lin1 = nn.Linear(8, 8), nn.Linear(8, 8)
    return model


def test_modules_to_save_with_several_adapters_as_peft():
    for library in (lora_ext, peft):
        config = lambda saved: library.LoraConfig(target_modules=["layers.0.lin0"], modules_to_save=saved)
        model = library.get_peft_model(_deep_mlp(), config(None))
        model.add_adapter("other", config(["layers.0.lin1"]))    # 'default' stays active
        wrapper = model.base_model.model.layers[0].lin1
        assert wrapper.active_adapters == [], library.__name__
        assert wrapper.modules_to_save["other"].weight.requires_grad is False
        model.set_adapter("other")
        assert wrapper.active_adapters == ["other"] and wrapper.modules_to_save["other"].weight.requires_grad
        model.set_adapter("default")
        assert wrapper.active_adapters == [] and not wrapper.modules_to_save["other"].weight.requires_grad
        # copies of one module cannot be active together; of different modules they can
        model = library.get_peft_model(_deep_mlp(), config(["layers.0.lin1", "layers.1.lin1"]))
        model.add_adapter("other", config(["layers.2.lin1", "layers.1.lin1"]))
        with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
            model.base_model.set_adapter(["default", "other"])
        model = library.get_peft_model(_deep_mlp(), config(["layers.0.lin1"]))
        model.add_adapter("other", config(["layers.1.lin1"]))
        model.base_model.set_adapter(["default", "other"])
        assert model.base_model.model.layers[1].lin1.active_adapters == ["other"]
