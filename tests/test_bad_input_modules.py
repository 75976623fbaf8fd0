"""Bad input to the public modules and configs: a clear Python exception naming the problem.

The per-op cases live beside each op's tests; these are the user-facing entry points
(LoraConfig, get_peft_model, adapter management, the forward of an adapted model).
"""
import math

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoraConfig

transformers = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64))


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(r=0), ValueError, "positive integer"),
    (dict(r=-3), ValueError, "positive integer"),
    (dict(r=2.5), ValueError, "positive integer"),
    (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be a float in \[0, 1\)"),
    (dict(lora_dropout=-0.01), ValueError, r"lora_dropout must be a float in \[0, 1\)"),
    (dict(lora_alpha=math.inf), ValueError, "lora_alpha must be finite"),
    (dict(lora_alpha=math.nan), ValueError, "lora_alpha must be finite"),
    (dict(lora_alpha="16"), TypeError, "lora_alpha must be a number"),
    (dict(alpha_pattern={"q_proj": math.inf}), ValueError, "alpha_pattern values must be finite"),
    (dict(rank_pattern={"q_proj": 0}), ValueError, "rank_pattern values must be positive"),
    (dict(target_modules=5), TypeError, "target_modules must be"),
    (dict(bias="some"), ValueError, "bias must be 'none', 'all' or 'lora_only'"),
    (dict(init_lora_weights="uniform"), ValueError, "Unknown initialization init_lora_weights='uniform'"),
    (dict(init_lora_weights="corda"), ValueError, "init_lora_weights='corda' is not supported by lora-ext"),
    (dict(task_type="IMAGE_GEN"), ValueError, "task_type 'IMAGE_GEN' is not supported"),
    (dict(layer_replication=[[4, 2]]), ValueError, "layer_replication"),
])
def test_bad_config_values_are_named(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        LoraConfig(**kwargs)


def test_target_modules_matching_nothing_names_the_targets():
    with pytest.raises(ValueError, match="nonexistent_proj"):
        lora_ext.get_peft_model(tiny_llama(), LoraConfig(target_modules=["nonexistent_proj"]))


def test_unknown_and_duplicate_adapter_names():
    model = lora_ext.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="missing"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match="missing"):
        model.delete_adapter("missing")
    with pytest.raises(ValueError, match="default"):
        model.add_adapter("default", LoraConfig(r=2, target_modules=["q_proj"]))


def test_wrong_input_width_fails_in_python_not_in_the_kernel():
    layer = nn.Sequential(nn.Linear(16, 8))
    model = lora_ext.get_peft_model(layer, LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises((RuntimeError, ValueError), match="16"):
        model(torch.randn(3, 12))


def test_input_dtype_differing_from_the_weights_is_named_as_in_peft():
    layer = nn.Sequential(nn.Linear(16, 8))
    model = lora_ext.get_peft_model(layer, LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(RuntimeError, match="BFloat16 and Float"):
        model(torch.randn(3, 16, dtype=torch.bfloat16))


def test_loftq_config_without_loftq_init_is_ignored_with_peft_warning():
    with pytest.warns(UserWarning, match="`loftq_config` specified but will be ignored"):
        config = LoraConfig(loftq_config={"loftq_bits": 4})
    assert config.loftq_config == {}


def test_loftq_on_an_already_wrapped_embedding_is_refused_by_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.lin = nn.Linear(8, 8)

    model = lora_ext.get_peft_model(Net(), LoraConfig(r=2, target_modules=["emb", "lin"]))
    loftq = LoraConfig(r=2, target_modules=["emb"], init_lora_weights="loftq",
                       loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.raises(ValueError, match="'loftq' is supported for linear layers only"):
        model.add_adapter("lq", loftq)
