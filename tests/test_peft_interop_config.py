"""LoraConfig features and task types against the real PEFT, both directions.

Each case builds the adapter in one library, saves it, loads it in the other, and checks
identical files (keys, values, adapter_config.json fields), trainable-parameter counts,
outputs and gradients (tolerance rule). Selection features (patterns, layer choice,
exclusions, "all-linear") also compare which modules were wrapped.
"""
import warnings

import peft
import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          LlamaForTokenClassification, LlamaModel, T5Config, T5ForConditionalGeneration)

import lora_ext
from safetensors.torch import load_file
from lora_testing import assert_within_torch_error_normwise
from peft_twins import (BASES, VOCAB, assert_same_counts, assert_same_files, assert_same_numbers, check_both_ways,
                        inputs, ours_twin, randomize_adapters, run, tiny_llama)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def wrapped(model) -> list[str]:
    """Names of the modules that hold LoRA adapters, in either library."""
    return sorted(name.removeprefix("base_model.model.") for name, m in model.named_modules()
                  if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


def both(kind, base=None, **config):
    """Fresh models from both libraries with one config (adapters as initialised)."""
    base = base or BASES[kind]
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**config))
    ours = lora_ext.get_peft_model(base(), lora_ext.LoraConfig(**config))
    return ours, theirs


# ================================================================ scaling and ranks


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rslora(kind, tmp_path):
    ours, theirs = check_both_ways(kind, tmp_path, use_rslora=True, r=4, lora_alpha=8)
    layer = next(m for m in ours.modules() if isinstance(getattr(m, "scaling", None), dict) and m.scaling)
    assert layer.scaling["default"] == pytest.approx(8 / 2)  # alpha / sqrt(r), not alpha / r


def test_rank_and_alpha_patterns(tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                  rank_pattern={"q_proj": 2, "layers.1.mlp.up_proj": 6}, alpha_pattern={"v_proj": 3})
    ours, theirs = check_both_ways("llama", tmp_path, **config)
    shapes = {n: tuple(p.shape) for n, p in ours.named_parameters() if "lora_" in n}
    assert shapes == {n: tuple(p.shape) for n, p in theirs.named_parameters() if "lora_" in n}
    assert {s[0] for n, s in shapes.items() if "q_proj.lora_A" in n} == {2}
    assert shapes["base_model.model.model.layers.1.mlp.up_proj.lora_A.default.weight"][0] == 6
    assert shapes["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"][0] == 4


# ================================================================ which modules


@pytest.mark.parametrize("kind,pattern,layers", [("llama", "layers", [1]), ("llama", None, 0),
                                                 ("gpt2", "h", [0]), ("gpt2", ["h"], 1)])
def test_layers_to_transform_and_layers_pattern(kind, pattern, layers, tmp_path):
    config = dict(layers_to_transform=layers, layers_pattern=pattern)
    ours, theirs = both(kind, target_modules=["q_proj", "v_proj"] if kind == "llama" else ["c_attn"], **config)
    assert wrapped(ours) == wrapped(theirs) and wrapped(ours)
    index = layers[0] if isinstance(layers, list) else layers
    assert all(f".{index}." in name for name in wrapped(ours))
    check_both_ways(kind, tmp_path, target_modules=["q_proj", "v_proj"] if kind == "llama" else ["c_attn"], **config)


@pytest.mark.parametrize("exclude", [["k_proj"], "model\\.layers\\.0\\..*", ["layers.1.mlp.down_proj", "gate_proj"]])
def test_exclude_modules(exclude, tmp_path):
    ours, theirs = both("llama", target_modules="all-linear", exclude_modules=exclude)
    assert wrapped(ours) == wrapped(theirs)
    assert len(wrapped(ours)) < 14
    check_both_ways("llama", tmp_path, target_modules="all-linear", exclude_modules=exclude)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_all_linear_skips_the_output_head(kind, tmp_path):
    ours, theirs = both(kind, target_modules="all-linear")
    assert wrapped(ours) == wrapped(theirs)
    assert not any("lm_head" in name for name in wrapped(ours))
    assert len(wrapped(ours)) == (14 if kind == "llama" else 8)
    ours, theirs = check_both_ways(kind, tmp_path, target_modules="all-linear")
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules)


def test_regex_target_modules(tmp_path):
    regex = r".*layers\.1\.self_attn\.(q|v)_proj"
    ours, theirs = both("llama", target_modules=regex)
    assert wrapped(ours) == wrapped(theirs) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    check_both_ways("llama", tmp_path, target_modules=regex)


# ================================================================ trained extras


@pytest.mark.parametrize("kind,modules", [("llama", ["lm_head"]), ("embconv", ["head"]), ("gpt2", ["ln_f"])])
def test_modules_to_save(kind, modules, tmp_path):
    targets = {"llama": ["q_proj"], "embconv": ["emb", "conv"], "gpt2": ["c_attn"]}[kind]
    ours, theirs = check_both_ways(kind, tmp_path, target_modules=targets, modules_to_save=modules)
    saved = ours.state_dict()
    assert any("modules_to_save.default" in k for k in saved)
    assert saved.keys() == theirs.state_dict().keys()


def test_modules_to_save_trained_values_cross_over(tmp_path):
    """A modules_to_save copy that was trained (differs from the base) arrives intact."""
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    theirs.save_pretrained(tmp_path)
    ours = lora_ext.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert_same_numbers(ours, theirs.eval(), inputs("llama"), what="trained lm_head copy")
    with ours.disable_adapter(), theirs.disable_adapter():
        assert torch.equal(run(ours, inputs("llama"))[0], run(theirs, inputs("llama"))[0])


@pytest.mark.parametrize("kind", ["gpt2", "embconv"])
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_all_and_lora_only(kind, bias, tmp_path):
    targets = ["c_attn"] if kind == "gpt2" else ["conv"]
    ours, theirs = both(kind, target_modules=targets, bias=bias)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert any(n.endswith("bias") for n in trainable)
    check_both_ways(kind, tmp_path, target_modules=targets, bias=bias)


# ================================================================ layer replication


def test_layer_replication_shares_base_weights_as_peft(tmp_path):
    def base():
        return tiny_llama(layers=5)
    config = dict(target_modules=["q_proj", "v_proj"], layer_replication=[[0, 4], [2, 5]])
    ours, theirs = both("llama", base=base, **config)
    layers = ours.get_base_model().model.layers
    assert len(layers) == len(theirs.get_base_model().model.layers) == 7
    assert ours.get_base_model().config.num_hidden_layers == theirs.get_base_model().config.num_hidden_layers
    # 0,1,2,3,2,3,4: layers 4 and 5 reuse the base weights of layers 2 and 3, not their LoRA
    for copy_index, source in ((4, 2), (5, 3), (6, 4)):
        ours_q = layers[copy_index].self_attn.q_proj
        assert ours_q.base_layer.weight is layers[source].self_attn.q_proj.base_layer.weight or copy_index == 6
        assert ours_q.lora_A["default"].weight is not layers[source].self_attn.q_proj.lora_A["default"].weight
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert_same_counts(ours, theirs)
    check_both_ways("llama", tmp_path, base=base, **config)


# ================================================================ task types


def seq_cls():
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, num_labels=3, pad_token_id=0, attn_implementation="eager"))


def token_cls():
    torch.manual_seed(0)
    return LlamaForTokenClassification(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, num_labels=3, pad_token_id=0, attn_implementation="eager"))


def feature_extraction():
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, attn_implementation="eager"))


def tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


SEQ2SEQ_INPUTS = {"input_ids": torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1)),
                  "decoder_input_ids": torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))}


@pytest.mark.parametrize("task,base,targets,model_inputs,peft_class", [
    ("CAUSAL_LM", tiny_llama, ["q_proj", "v_proj"], None, "PeftModelForCausalLM"),
    ("SEQ_CLS", seq_cls, ["q_proj", "v_proj"], None, "PeftModelForSequenceClassification"),
    ("TOKEN_CLS", token_cls, ["q_proj", "v_proj"], None, "PeftModelForTokenClassification"),
    ("SEQ_2_SEQ_LM", tiny_t5, ["q", "v"], SEQ2SEQ_INPUTS, "PeftModelForSeq2SeqLM"),
    ("FEATURE_EXTRACTION", feature_extraction, ["q_proj", "v_proj"], None, "PeftModelForFeatureExtraction"),
])
def test_task_types(task, base, targets, model_inputs, peft_class, tmp_path):
    ours, theirs = check_both_ways("llama", tmp_path, base=base, model_inputs=model_inputs, task_type=task,
                                   target_modules=targets)
    assert type(ours).__name__ == type(theirs).__name__ == peft_class
    assert ours.peft_config["default"].task_type == theirs.peft_config["default"].task_type == task
    if task in ("SEQ_CLS", "TOKEN_CLS"):  # the head is trained in full, as in PEFT
        assert set(ours.peft_config["default"].modules_to_save) == set(theirs.peft_config["default"].modules_to_save)
        assert any("score.modules_to_save" in n for n, p in ours.named_parameters() if p.requires_grad)


# ================================================================ loading by name, generating


@pytest.mark.parametrize("saver", ["peft", "ours"])
def test_auto_peft_model_for_causal_lm_from_a_local_base(saver, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    lib = peft if saver == "peft" else lora_ext
    model = lib.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                               lib.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    ours = lora_ext.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert ours.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    assert type(ours).__name__ == type(theirs).__name__ == "PeftModelForCausalLM"
    assert not ours.training and not theirs.training
    assert_same_counts(ours, theirs)
    assert_same_numbers(ours, theirs, inputs("llama"), what="AutoPeftModelForCausalLM")
    model.eval()
    torch.testing.assert_close(run(ours, inputs("llama"))[0], run(model, inputs("llama"))[0], rtol=1e-5, atol=1e-5)


def test_generate_passthrough_equals_peft(tmp_path):
    ours, theirs = check_both_ways("llama", tmp_path, task_type="CAUSAL_LM", grads=False)
    prompt = inputs("llama")["input_ids"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out, out_t = ours.generate(input_ids=prompt, **kwargs), theirs.generate(input_ids=prompt, **kwargs)
    assert out.shape == (prompt.shape[0], prompt.shape[1] + 6)
    assert torch.equal(out, out_t)
    with ours.disable_adapter():
        base_out = ours.generate(input_ids=prompt, **kwargs)
    assert torch.equal(base_out, tiny_llama().generate(input_ids=prompt, **kwargs))


def test_inference_mode_loads_frozen_in_both(tmp_path):
    ours, theirs = check_both_ways("gpt2", tmp_path, grads=False)
    frozen_ours = lora_ext.PeftModel.from_pretrained(BASES["gpt2"](), tmp_path / "from_ours" / "ours")
    frozen_theirs = peft.PeftModel.from_pretrained(BASES["gpt2"](), tmp_path / "from_ours" / "ours")
    assert frozen_ours.get_nb_trainable_parameters()[0] == 0
    assert_same_counts(frozen_ours, frozen_theirs)
    assert frozen_ours.peft_config["default"].inference_mode is True
    assert_same_files(tmp_path / "from_ours" / "ours", tmp_path / "from_ours" / "resaved")


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION",
                                  "QUESTION_ANS"])
def test_task_model_forward_signatures_are_peft_s(task):
    """transformers' Trainer drops the dataset columns a forward does not name."""
    import inspect
    name = {"CAUSAL_LM": "PeftModelForCausalLM", "SEQ_CLS": "PeftModelForSequenceClassification",
            "TOKEN_CLS": "PeftModelForTokenClassification", "SEQ_2_SEQ_LM": "PeftModelForSeq2SeqLM",
            "FEATURE_EXTRACTION": "PeftModelForFeatureExtraction",
            "QUESTION_ANS": "PeftModelForQuestionAnswering"}[task]
    assert inspect.signature(getattr(lora_ext, name).forward) == inspect.signature(getattr(peft, name).forward)


@pytest.mark.parametrize("saver", ["peft", "ours"])
def test_auto_peft_model_uses_the_auto_mapping_of_a_config_without_task_type(saver, tmp_path):
    import json
    tiny_llama().save_pretrained(tmp_path / "base")
    lib = peft if saver == "peft" else lora_ext
    model = lib.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                               lib.LoraConfig(target_modules=["q_proj"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    ours = lora_ext.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    theirs = peft.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    assert type(ours.get_base_model()) is type(theirs.get_base_model()) is LlamaForCausalLM
    assert_same_numbers(ours, theirs, inputs("llama"), what="AutoPeftModel")
    for auto in (lora_ext.AutoPeftModelForCausalLM, peft.AutoPeftModelForCausalLM):
        auto.from_pretrained(tmp_path / "adapter")  # no task type: any task class may load it
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["auto_mapping"]["parent_library"] = "os"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    for auto in (lora_ext.AutoPeftModel, peft.AutoPeftModel):
        with pytest.raises(ValueError, match="not in the import allowlist"):
            auto.from_pretrained(tmp_path / "adapter")


def test_auto_peft_model_class_must_fit_the_task_type(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = lora_ext.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                    lora_ext.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    for lib in (lora_ext, peft):
        with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForCausalLM"):
            lib.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
        with pytest.raises(ValueError, match="Cannot use `AutoPeftModel` with a task type"):
            lib.AutoPeftModel.from_pretrained(tmp_path / "adapter")


def test_unload_equals_peft(tmp_path):
    ours, theirs = check_both_ways("gpt2", tmp_path, grads=False, modules_to_save=["ln_f"])
    base_ours, base_theirs = ours.unload(), theirs.unload()
    assert type(base_ours) is type(base_theirs)
    a, b = base_ours.state_dict(), base_theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind,targets", [("llama", ["embed_tokens", "q_proj"]), ("llama", ["lm_head", "v_proj"]),
                                          ("gpt2", ["wte", "c_attn"]), ("llama", r".*(embed_tokens|q_proj)")])
def test_targeted_embeddings_save_their_base_weights_as_peft(kind, targets, tmp_path):
    """PEFT's save_embedding_layers="auto": a targeted embed_tokens/lm_head saves its base weight."""
    ours, theirs = check_both_ways(kind, tmp_path, target_modules=targets)
    saved = set(load_file(tmp_path / "from_ours" / "ours" / "adapter_model.safetensors"))
    expected_base = {"llama": {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}}.get(kind, {})
    for short, module in expected_base.items():
        if short in str(targets):
            assert f"base_model.model.{module}.base_layer.weight" in saved


def test_resized_vocabulary_saves_both_embeddings_as_peft(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")

    def base():
        model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
        model.resize_token_embeddings(VOCAB + 8)
        return model
    check_both_ways("llama", tmp_path, base=base, target_modules=["q_proj"], grads=False)
    saved = set(load_file(tmp_path / "from_ours" / "ours" / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= saved


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_adapters_cross_over(kind, tmp_path):
    """lora_magnitude_vector keys and values, DoRA outputs and gradients, both ways."""
    ours, theirs = check_both_ways(kind, tmp_path, use_dora=True)
    assert any("lora_magnitude_vector" in k for k in ours.state_dict())


def test_whole_model_rule_is_normwise_and_still_catches_a_wrong_adapter(tmp_path):
    """Twin models are compared normwise (lora_testing's docstring: per-element max errors of
    a whole model are two random draws, and PEFT's failed the element-wise rule against ours
    in 3 of 30 seeds on AVX-512 and on AVX2 alike). One adapter weight off by 1e-3 of its
    value must still fail it."""
    ours, theirs, _ = ours_twin("llama", tmp_path, use_dora=True)
    ours.train(), theirs.train()
    assert_same_numbers(ours, theirs, inputs("llama"), grads=True, what="unchanged")
    weight = dict(ours.named_parameters())["base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"]
    with torch.no_grad():
        weight[3, 1] *= 1 + 1e-3
    with pytest.raises(AssertionError, match="our rms error .* exceeds 2 x PyTorch's own rms error"):
        assert_same_numbers(ours, theirs, inputs("llama"), grads=True, what="one weight off")


def test_normwise_rule_bounds_the_rms_error():
    oracle = torch.linspace(-1, 1, 1000, dtype=torch.float64)
    noise = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-6
    torchs = (oracle + noise).float()
    assert_within_torch_error_normwise((oracle + 1.9 * noise.flip(0)).float(), torchs, oracle)
    with pytest.raises(AssertionError, match="rms error"):
        assert_within_torch_error_normwise((oracle + 2.5 * noise.flip(0)).float(), torchs, oracle)
    with pytest.raises(AssertionError, match="rms error"):  # one element far off fails it too
        assert_within_torch_error_normwise((oracle + noise).float().index_fill(0, torch.tensor([7]), 0.5), torchs,
                                           oracle)
