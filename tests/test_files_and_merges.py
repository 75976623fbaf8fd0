"""Adapter files that are damaged, hostile or interrupted, and merges that would break a model."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_ext
from lora_ext import serialization

transformers = pytest.importorskip("transformers")


def tiny_llama(hidden: int = 64):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128))


def saved_adapter(tmp_path, name="adapter", r=4):
    model = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    for pname, param in model.named_parameters():
        if "lora_B" in pname:
            param.data.normal_()
    path = tmp_path / name
    model.save_pretrained(path)
    return path, model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    state, types = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key in state:
        assert torch.equal(after[key], state[key]), key
    assert [type(m) for m in model.modules()] == types


# ---------------------------------------------------------------- damaged files


def test_truncated_safetensors_is_a_clear_error_and_the_model_is_untouched(tmp_path):
    path, _ = saved_adapter(tmp_path)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        lora_ext.PeftModel.from_pretrained(base, path)
    assert_unchanged(base, before)


def test_corrupted_safetensors_header(tmp_path):
    path, _ = saved_adapter(tmp_path)
    data = bytearray((path / "adapter_model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header
    (path / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="safetensors"):
        lora_ext.PeftModel.from_pretrained(tiny_llama(), path)


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_wrong_keys_or_shapes_are_listed_and_nothing_is_loaded(tmp_path, damage):
    path, _ = saved_adapter(tmp_path)
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = sorted(tensors)[0]
    if damage == "missing":
        del tensors[key]
        match = r"missing keys \(1\).*" + key.replace(".", r"\.")
    elif damage == "extra":
        tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
        match = r"unexpected keys \(1\).*up_proj"
    else:
        tensors[key] = torch.zeros(3, 64)
        match = r"has shape \(3, 64\) in the file but the model expects \(4, 64\)"
    save_file(tensors, file)
    peft_model = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(r=4, target_modules=["q_proj"]))
    before = snapshot(peft_model)
    with pytest.raises(ValueError, match=match):
        peft_model.load_adapter(path, adapter_name="other")
    assert "other" not in peft_model.peft_config
    assert_unchanged(peft_model, before)


def test_adapter_for_a_different_model_size(tmp_path):
    path, _ = saved_adapter(tmp_path)
    with pytest.raises(ValueError, match="expects"):
        lora_ext.PeftModel.from_pretrained(tiny_llama(hidden=32), path)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"peft_type": "LORA", "r": "eight"}', "r"),
    ('{"peft_type": "LORA", "lora_dropout": 2.0}', "lora_dropout"),
    ('{"peft_type": "PREFIX_TUNING"}', "PREFIX_TUNING"),
    ('{"peft_type": "LORA", "use_qalora": true}', "use_qalora"),
])
def test_malformed_adapter_config(tmp_path, content, match):
    path, _ = saved_adapter(tmp_path)
    (path / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        lora_ext.PeftModel.from_pretrained(tiny_llama(), path)


def test_folder_that_is_not_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json' at"):
        lora_ext.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        lora_ext.PeftModel.from_pretrained(tiny_llama(), tmp_path)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_files_are_never_loaded_unsafely(tmp_path, monkeypatch):
    path, _ = saved_adapter(tmp_path)
    os.remove(path / "adapter_model.safetensors")
    with open(path / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Boom()}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="could not be loaded safely"):
        lora_ext.PeftModel.from_pretrained(tiny_llama(), path)
    assert not (tmp_path / "pwned.txt").exists()


def test_bin_adapters_written_with_safe_serialization_false_load(tmp_path):
    _, model = saved_adapter(tmp_path)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    loaded = lora_ext.PeftModel.from_pretrained(tiny_llama(), tmp_path / "bin")
    ids = torch.randint(0, 128, (2, 5))
    model.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["a/b", "..", "x\\y", "__base__", ""])
def test_adapter_names_that_would_escape_the_folder_or_are_reserved(tmp_path, name):
    model = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter_name"):
        model.add_adapter(name, lora_ext.LoraConfig(r=4, target_modules=["q_proj"]))


# ---------------------------------------------------------------- atomic saves


def test_an_interrupted_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    path, model = saved_adapter(tmp_path)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    for pname, param in model.named_parameters():
        if "lora_A" in pname:
            param.data.add_(1.0)

    real_write = os.fdopen

    def failing_fdopen(fd, mode="r", *args, **kwargs):
        handle = real_write(fd, mode, *args, **kwargs)
        original = handle.write

        def write(data):
            original(data[: len(data) // 2])
            raise OSError("disk full (simulated)")
        handle.write = write
        return handle

    monkeypatch.setattr(serialization.os, "fdopen", failing_fdopen)
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(path)
    monkeypatch.undo()
    after = {f: (path / f).read_bytes() for f in os.listdir(path)}
    assert after == before  # no temporary files left, old files byte-identical
    loaded = lora_ext.PeftModel.from_pretrained(tiny_llama(), path)
    assert loaded is not None


# ---------------------------------------------------------------- safe merges


def test_safe_merge_refuses_non_finite_weights_and_leaves_the_model_unchanged():
    model = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer = model.get_base_model().model.layers[1].self_attn.v_proj
    layer.lora_B["default"].weight.data[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert_unchanged(model, before)
    assert not any(m.merged for _, m in model.base_model.lora_layers())
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)
    assert_unchanged(model, before)
