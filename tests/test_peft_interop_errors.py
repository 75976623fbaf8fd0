"""Bad input, side by side with PEFT: the same exception type, PEFT's wording where it has
one, and a model left exactly as it was by any failed injection or load."""
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_ext
from peft_twins import inputs, ours_twin, peft_twin, randomize_adapters, run, tiny_gpt2, tiny_llama


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    state, types = before
    after = model.state_dict()
    assert after.keys() == state.keys(), sorted(after.keys() ^ state.keys())
    for key in state:
        assert torch.equal(after[key], state[key]), key
    assert [type(m) for m in model.modules()] == types


@pytest.mark.parametrize("targets", [["nope"], "nothing.*here"])
def test_target_modules_matching_nothing(targets):
    for lib in (peft, lora_ext):
        base = tiny_llama()
        before = snapshot(base)
        with pytest.raises(ValueError, match="not found in the base model"):
            lib.get_peft_model(base, lib.LoraConfig(target_modules=targets))
        if lib is lora_ext:
            assert_unchanged(base, before)


def test_add_adapter_matching_nothing_leaves_the_model_as_it_was():
    model = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="not found in the base model"):
        model.add_adapter("x", lora_ext.LoraConfig(target_modules=["nope"]))
    assert list(model.peft_config) == ["default"]
    assert_unchanged(model, before)


def test_unknown_adapter_names_as_peft():
    for lib in (peft, lora_ext):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["q_proj"]))
        with pytest.raises(ValueError, match="Adapter nope not found"):
            model.set_adapter("nope")
        with pytest.raises(ValueError, match="Adapter nope does not exist"):
            model.delete_adapter("nope")
        with pytest.raises(ValueError, match="non-existing adapter"):
            model.eval()(**inputs("llama"), adapter_names=["nope", "default"])
        with pytest.raises(ValueError, match="invalid `selected_adapters`"):
            model.save_pretrained("/nonexistent-dir-never-written", selected_adapters=["nope"])
    # PEFT silently ignores an unknown name here; lora-ext refuses rather than merge nothing
    model = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="nope"):
        model.merge_and_unload(adapter_names=["nope"])


def test_duplicate_adapter_name_as_peft(tmp_path):
    for lib in (peft, lora_ext):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["q_proj"]))
        with pytest.raises(ValueError, match="Adapter with name 'default' already exists"):
            model.add_adapter("default", lib.LoraConfig(target_modules=["v_proj"]))
    # load_adapter: PEFT overwrites the loaded adapter in place; lora-ext refuses and keeps it
    model = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    before = snapshot(model)
    with pytest.raises(ValueError, match="Adapter with name 'default' already exists"):
        model.load_adapter(tmp_path, adapter_name="default")
    assert_unchanged(model, before)


def test_path_that_is_not_an_adapter(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights_only").mkdir()
    save_file({"x": torch.zeros(1)}, tmp_path / "weights_only" / "adapter_model.safetensors")
    for lib in (peft, lora_ext):
        base = tiny_llama()
        before = snapshot(base)
        for folder in ("empty", "weights_only", "missing"):
            with pytest.raises(ValueError, match="adapter_config.json"):
                lib.PeftModel.from_pretrained(base, tmp_path / folder)
        if lib is lora_ext:
            assert_unchanged(base, before)


def test_config_without_weights(tmp_path):
    lora_ext.LoraConfig(target_modules=["q_proj"]).save_pretrained(tmp_path)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        lora_ext.PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


def edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("saver", [peft_twin, ours_twin])
def test_shape_mismatch_names_the_key_and_leaves_the_model(saver, tmp_path):
    _, _, path = saver("llama", tmp_path)
    edit_config(path, r=8)
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(tiny_llama(), path)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"lora_A.weight.*shape \(4, \d+\).*expects \(8, \d+\)"):
        lora_ext.PeftModel.from_pretrained(base, path)
    assert_unchanged(base, before)


def test_adapter_for_another_base_size(tmp_path):
    _, _, path = peft_twin("gpt2", tmp_path)
    model = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(target_modules=["c_attn", "q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="not found in the base model|does not match the model"):
        model.load_adapter(path, adapter_name="gpt2")
    assert list(model.peft_config) == ["default"]
    assert_unchanged(model, before)


@pytest.mark.parametrize("saver", [peft_twin, ours_twin])
def test_missing_keys_are_listed_and_nothing_is_loaded(saver, tmp_path):
    _, _, path = saver("llama", tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    dropped = sorted(k for k in tensors if "layers.1.self_attn.v_proj" in k)
    save_file({k: v for k, v in tensors.items() if k not in dropped}, path / "adapter_model.safetensors")
    # PEFT only warns about missing adapter keys, and runs with freshly initialised ones
    with pytest.warns(UserWarning, match="missing adapter keys"):
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(tiny_llama(), path)
    model = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="missing keys") as info:
        model.load_adapter(path, adapter_name="second")
    assert dropped[0] in str(info.value)
    assert list(model.peft_config) == ["default"]
    assert_unchanged(model, before)


def test_failed_load_then_a_good_load_matches_peft(tmp_path):
    """After a refused load the model still loads the right adapter and equals PEFT."""
    ours_bad, _, bad = ours_twin("gpt2", tmp_path / "bad", r=8)
    _, theirs, good = peft_twin("gpt2", tmp_path / "good")
    edit_config(bad, r=4)
    model = lora_ext.get_peft_model(tiny_gpt2(), lora_ext.LoraConfig(target_modules=["c_fc"]), adapter_name="first")
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(bad, adapter_name="x")
    model.load_adapter(good, adapter_name="default")
    model.set_adapter("default")
    theirs.eval(), model.eval()
    y, _ = run(model, inputs("gpt2"))
    y_t, _ = run(theirs, inputs("gpt2"))
    torch.testing.assert_close(y, y_t, rtol=1e-4, atol=1e-5)


def test_unsupported_peft_feature_in_a_peft_config_is_named(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], use_qalora=True))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="use_qalora"):
        lora_ext.PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)
